"""Tests of the networks package: high-pass layer, restoration / skip-decay nets, detector, losses, scoring."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from networks.detector import FrequencyAwareDetector
from networks.ensemble import AveragedAnomalyMap
from networks.frequency import ButterworthHighPass
from networks.losses import DetectorLoss, RestorationLoss, SegmentationLoss
from networks.restoration import RestorationNet
from networks.scoring import anomaly_map_from_logits, image_scores, msgms_map, smooth_map
from networks.skip_decay_unet import SkipDecayUNet

SMALL_RESTORATION = (4, 8, 8)
SMALL_SEGMENTATION = (4, 8, 8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cosine_image(size: int, cycles: int) -> torch.Tensor:
    """(1, 1, size, size) cosine with ``cycles`` periods along the width: a single frequency at distance ``cycles``."""
    cols = torch.arange(size, dtype=torch.float64)
    return torch.cos(2 * math.pi * cycles * cols / size).expand(size, size)[None, None].clone()


def gain(highpass: ButterworthHighPass, image: torch.Tensor) -> float:
    return float(highpass(image).pow(2).sum().sqrt() / image.pow(2).sum().sqrt())


# ---------------------------------------------------------------- frequency


def test_highpass_zeroes_constant_and_keeps_checkerboard():
    highpass = ButterworthHighPass()
    constant = torch.full((1, 1, 64, 64), 0.7)
    assert highpass(constant).abs().max() < 1e-4
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checkerboard = (((rows + cols) % 2) * 2 - 1).float()[None, None]  # zero-mean, highest frequency
    out = highpass(checkerboard)
    assert out.pow(2).sum() / checkerboard.pow(2).sum() > 0.9


def fair_reference(image: np.ndarray, d0: float, order: int) -> np.ndarray:
    """FAIR's data_loaderbhpf.py recipe: fftshift, centred Butterworth high-pass, ifftshift, real part."""
    rows, cols = image.shape
    r, c = np.ogrid[:rows, :cols]
    dist = np.sqrt((r - rows // 2) ** 2 + (c - cols // 2) ** 2)
    h = 1 / (1 + (d0 / (dist + 1e-6)) ** (2 * order))
    shifted = np.fft.fftshift(np.fft.fft2(image)) * h
    return np.real(np.fft.ifft2(np.fft.ifftshift(shifted)))


@pytest.mark.parametrize("shape", [(64, 64), (63, 65), (48, 80)])
def test_highpass_equals_fftshift_recipe(shape):
    highpass = ButterworthHighPass(cutoff=30.0, order=2, reference_size=256)
    image = np.random.default_rng(0).random(shape)
    expected = fair_reference(image, highpass.scaled_cutoff(*shape), order=2)
    out = highpass(torch.from_numpy(image)[None])
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)  # the filter itself is float32


def test_highpass_cutoff_scales_with_size_and_order_matters():
    order2 = ButterworthHighPass(cutoff=30.0, order=2)
    assert order2.scaled_cutoff(256, 256) == 30.0
    assert order2.scaled_cutoff(64, 128) == 7.5
    # a frequency at the cutoff (D = D0) passes with gain 1/2 at every size: D0 = 8 px at 64, 32 px at 256
    scaled = ButterworthHighPass(cutoff=32.0, order=2)
    assert gain(scaled, cosine_image(64, 8)) == pytest.approx(0.5, abs=1e-4)
    assert gain(scaled, cosine_image(256, 32)) == pytest.approx(0.5, abs=1e-4)
    assert gain(scaled, cosine_image(256, 8)) < 0.01  # the same 8 cycles are far below the cutoff at 256
    # half the cutoff: 1 / (1 + 2 ** (2n)) -> 0.2 for the paper's n = 1, 1/17 for FAIR's n = 2
    order1 = ButterworthHighPass(cutoff=30.0, order=1)
    assert gain(order1, cosine_image(256, 15)) == pytest.approx(0.2, abs=1e-3)
    assert gain(order2, cosine_image(256, 15)) == pytest.approx(1 / 17, abs=1e-3)
    image = torch.rand(1, 1, 64, 64)
    assert (order1(image) - order2(image)).abs().max() > 1e-2


def test_highpass_has_no_state_and_handles_layouts_and_dtypes():
    highpass = ButterworthHighPass()
    assert list(highpass.parameters()) == [] and highpass.state_dict() == {}
    batch = torch.rand(3, 2, 32, 32)
    out = highpass(batch)
    assert out.shape == batch.shape and out.dtype == torch.float32
    torch.testing.assert_close(highpass(batch[1]), out[1])  # a single (C, H, W) slice
    assert len(highpass._filters) == 1  # cached per (H, W, device)
    assert highpass(batch.double()).dtype == torch.float64
    assert highpass(batch.bfloat16()).dtype == torch.bfloat16
    meta = highpass(MetaTensor(batch[0], meta={"filename_or_obj": "slice.nii.gz"}))
    assert isinstance(meta, MetaTensor) and meta.meta["filename_or_obj"] == "slice.nii.gz"
    with pytest.raises(ValueError):
        ButterworthHighPass(order=0)


# ---------------------------------------------------------------- restoration / skip-decay U-Net


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (64, 96)])
def test_network_shapes(size):
    x = torch.rand(2, 1, *size)
    restoration = RestorationNet(features=(4, 8, 8, 16, 16)).eval()
    assert restoration(x).shape == (2, 1, *size)
    segmentation = SkipDecayUNet(in_channels=1, out_channels=2, features=(4, 8, 8, 16, 16, 16)).eval()
    assert segmentation(x).shape == (2, 2, *size)


def test_network_rejects_indivisible_size_and_supports_3d():
    with pytest.raises(ValueError, match="divisible by 16"):
        RestorationNet(features=(4, 8, 8, 8, 8))(torch.rand(1, 1, 40, 40))
    net3d = SkipDecayUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(2, 4, 4)).eval()
    assert net3d(torch.rand(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_widths_come_from_the_tuple():
    assert n_params(RestorationNet(features=(4, 8, 8))) < n_params(RestorationNet(features=(8, 16, 16)))
    assert n_params(SkipDecayUNet(features=(4, 8, 8))) < n_params(SkipDecayUNet(features=(4, 8, 8, 8)))
    net = SkipDecayUNet(features=(4, 8, 16))
    assert len(net.encoder.blocks) == 3 and len(net.decoder) == 2
    assert net.decoder[0].convs.conv_0.conv.in_channels == 2 * 8


def capture(module: torch.nn.Module, store: list, inputs: bool = False):
    """Hook that appends a module's output (or its first input) to ``store``."""
    if inputs:
        return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))
    return module.register_forward_hook(lambda m, args, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("additive_skips", [True, False])
def test_restoration_skips(additive_skips):
    net = RestorationNet(features=(4, 8, 8), additive_skips=additive_skips).eval()
    encoded, upsampled, seen = [], [], []
    capture(net.encoder.blocks[0], encoded)
    capture(net.decoder[-1].upsample, upsampled)
    capture(net.decoder[-1].convs, seen, inputs=True)
    net(torch.rand(1, 1, 32, 32))
    expected = upsampled[0] + encoded[0] if additive_skips else upsampled[0]
    torch.testing.assert_close(seen[0], expected)


def test_alpha_changes_output_and_is_saved():
    net = SkipDecayUNet(in_channels=1, features=(4, 8, 8)).eval()
    x = torch.rand(1, 1, 32, 32)
    assert float(net.alpha) == 1.0 and "alpha" in net.state_dict()
    full = net(x)
    net.set_alpha(0.0)
    assert (net(x) - full).abs().max() > 1e-4
    state = net.state_dict()
    other = SkipDecayUNet(in_channels=1, features=(4, 8, 8)).eval()
    other.load_state_dict(state)
    assert float(other.alpha) == 0.0
    with pytest.raises(ValueError):
        net.set_alpha(1.5)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_skip_block_sees_mixed_concat(alpha):
    net = SkipDecayUNet(in_channels=1, features=(4, 8, 8)).eval()
    net.set_alpha(alpha)
    encoded, decoded, seen = [], [], []
    capture(net.encoder.blocks[1], encoded)
    capture(net.decoder[0].upsample, decoded)
    capture(net.decoder[0].convs, seen, inputs=True)
    net(torch.rand(1, 1, 32, 32))
    mixed = alpha * encoded[0] + (1 - alpha) * decoded[0]
    torch.testing.assert_close(seen[0], torch.cat([mixed, decoded[0]], dim=1))
    if alpha == 1.0:  # exactly a plain concat U-Net
        assert torch.equal(seen[0], torch.cat([encoded[0], decoded[0]], dim=1))


def test_detach_decoder_copy_cuts_gradient_at_alpha_one():
    grads = {}
    for detach in (False, True):
        torch.manual_seed(1)
        net = SkipDecayUNet(in_channels=1, features=(4, 8, 8), detach_decoder_copy=detach)
        net(torch.rand(2, 1, 32, 32)).sum().backward()
        grads[detach] = net.decoder[0].upsample.conv.conv.weight.grad
    # alpha = 1: D enters only through the concatenated copy, which WDMT detaches
    assert grads[False].abs().sum() > 0 and grads[True].abs().sum() == 0


def test_paper_preset_size():
    model = FrequencyAwareDetector.from_preset("paper")
    restoration, segmentation = n_params(model.restoration), n_params(model.segmentation)
    print(f"paper preset: restoration {restoration / 1e6:.1f}M, segmentation {segmentation / 1e6:.1f}M parameters")
    assert 60e6 < restoration < 100e6 and 25e6 < segmentation < 50e6  # recorded: 78.3M and 36.9M
    assert n_params(FrequencyAwareDetector.from_preset("default")) < 5e6


# ---------------------------------------------------------------- detector


def small_detector(**kwargs) -> FrequencyAwareDetector:
    options = {"restoration_features": SMALL_RESTORATION, "segmentation_features": SMALL_SEGMENTATION, **kwargs}
    return FrequencyAwareDetector(**options)


def test_detector_default_preset_modes():
    image = torch.rand(2, 1, 64, 64)
    model = FrequencyAwareDetector.from_preset("default").eval()
    restored, logits = model(image)
    assert restored.shape == (2, 1, 64, 64) and logits.shape == (2, 2, 64, 64)
    mapper = FrequencyAwareDetector.from_preset("default", output="anomaly_map").eval()
    mapper.load_state_dict(model.state_dict())  # the mode changes no weights
    amap = mapper(image)
    assert amap.shape == (2, 1, 64, 64) and 0 <= amap.min() and amap.max() <= 1
    torch.testing.assert_close(amap, torch.softmax(logits, dim=1)[:, 1:2])
    with pytest.raises(ValueError):
        FrequencyAwareDetector.from_preset("huge")
    with pytest.raises(ValueError):
        small_detector(output="map")
    with pytest.raises(ValueError):
        FrequencyAwareDetector(restoration_features=None, segmentation_features=None)


def test_detector_wiring():
    model = small_detector().eval()
    image = torch.rand(1, 1, 32, 32)
    seg_inputs = []
    capture(model.segmentation, seg_inputs, inputs=True)
    restored, _ = model(image)
    torch.testing.assert_close(restored, model.restoration(model.highpass(image)))
    torch.testing.assert_close(seg_inputs[0], torch.cat([restored, image], dim=1))  # DRAEM order: restored first
    plain = small_detector(use_highpass=False).eval()
    plain.load_state_dict(model.state_dict())  # the high-pass adds no state
    assert plain.highpass is None
    torch.testing.assert_close(plain(image)[0], model.restoration(image))


def test_detector_ablations():
    image = torch.rand(2, 1, 32, 32)
    wd = small_detector(restoration_features=None).eval()
    restored, logits = wd(image)
    assert restored is None and logits.shape == (2, 2, 32, 32)
    assert wd.segmentation.encoder.blocks[0].conv_0.conv.in_channels == 1
    restoration_only = small_detector(segmentation_features=None).eval()
    restored, logits = restoration_only(image)
    assert logits is None and restored.shape == (2, 1, 32, 32)
    assert restoration_only.alpha is None
    restoration_only.set_alpha(0.0)  # no-op
    restoration_only.output = "anomaly_map"
    torch.testing.assert_close(restoration_only(image), msgms_map(image, restored))


def test_detector_alpha_and_gradients_reach_both_nets():
    model = small_detector().train()
    model.set_alpha(0.25)
    assert model.alpha == 0.25 and float(model.segmentation.alpha) == 0.25
    image, mask = torch.rand(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    restored, logits = model(image)
    SegmentationLoss()(logits, mask).backward()  # the segmentation loss alone trains the restoration net too
    for subnet in (model.restoration, model.segmentation):
        grads = [p.grad for p in subnet.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_detector_export():
    model = small_detector(output="anomaly_map").eval()
    image = torch.rand(1, 1, 32, 32)
    expected = model(image)
    traced = torch.jit.trace(model, image)
    torch.testing.assert_close(traced(image), expected)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(image), expected)
    restored, logits = torch.jit.script(small_detector().eval())(image)
    assert restored.shape == (1, 1, 32, 32) and logits.shape == (1, 2, 32, 32)


# ---------------------------------------------------------------- losses


def test_restoration_loss_known_values():
    loss = RestorationLoss()
    image = torch.rand(2, 1, 32, 32)
    assert loss(image, image) < 1e-6
    a, b = 0.2, 0.6  # constant images: SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01**2
    ssim = (2 * a * b + c1) / (a**2 + b**2 + c1)
    value = loss(torch.full((1, 1, 32, 32), a), torch.full((1, 1, 32, 32), b))
    assert float(value) == pytest.approx((a - b) ** 2 + 1 - ssim, abs=1e-4)  # float32 variances
    mse_only = RestorationLoss(ssim_weight=0.0)(torch.full((1, 1, 32, 32), a), torch.full((1, 1, 32, 32), b))
    assert float(mse_only) == pytest.approx((a - b) ** 2, abs=1e-6)


def test_float32_under_autocast():
    restored, clean = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    expected_loss, expected_map = RestorationLoss()(restored, clean), msgms_map(clean, restored)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(RestorationLoss()(restored, clean), expected_loss)
        torch.testing.assert_close(msgms_map(clean, restored), expected_map)


def test_segmentation_loss_hand_computed():
    # two pixels, both anomalous; p(anomaly) = 3/4 and 1/4
    logits = torch.tensor([[[[0.0, math.log(3)]], [[math.log(3), 0.0]]]])  # (1, 2, 1, 2)
    mask = torch.ones(1, 1, 1, 2)
    l1 = (0.25 + 0.75) / 2
    focal = (-(0.25**2) * math.log(0.75) - 0.75**2 * math.log(0.25)) / 2
    assert float(SegmentationLoss(focal_weight=0.0)(logits, mask)) == pytest.approx(l1, abs=1e-6)
    assert float(SegmentationLoss(l1_weight=0.0)(logits, mask)) == pytest.approx(focal, abs=1e-6)
    assert float(SegmentationLoss()(logits, mask)) == pytest.approx(l1 + focal, abs=1e-6)


def draem_focal(probabilities: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5):
    """DRAEM loss.py FocalLoss on softmax probabilities (alpha None, smooth 1e-5, mean over pixels)."""
    num_class = probabilities.shape[1]
    p = probabilities.permute(0, 2, 3, 1).reshape(-1, num_class)
    one_hot = torch.nn.functional.one_hot(mask.reshape(-1).long(), num_class).float()
    one_hot = one_hot.clamp(smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def test_focal_matches_draem_per_pixel_mean():
    logits = torch.randn(2, 2, 16, 16) * 2
    mask = (torch.rand(2, 1, 16, 16) > 0.6).float()
    ours = SegmentationLoss(l1_weight=0.0)(logits, mask)
    assert float(ours) == pytest.approx(float(draem_focal(torch.softmax(logits, 1), mask)), rel=1e-3)


def test_detector_loss_terms():
    loss = DetectorLoss(restoration_weight=2.0)
    clean, mask = torch.rand(1, 1, 32, 32), (torch.rand(1, 1, 32, 32) > 0.5).float()
    restored, logits = torch.rand(1, 1, 32, 32), torch.randn(1, 2, 32, 32)
    out = loss(restored, logits, clean, mask)
    assert float(out["loss"]) == pytest.approx(float(2 * out["restoration"] + out["segmentation"]), rel=1e-6)
    assert float(out["restoration"]) == pytest.approx(float(RestorationLoss()(restored, clean)), rel=1e-6)
    assert set(loss(None, logits, clean, mask)) == {"loss", "segmentation"}
    only = loss(restored, None, clean, mask)
    assert set(only) == {"loss", "restoration"} and float(only["loss"]) == pytest.approx(float(2 * only["restoration"]))
    with pytest.raises(ValueError):
        loss(None, None, clean, mask)


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("sf", [21, 5])
def test_image_score_of_single_hot_pixel(sf):
    maps = torch.zeros(2, 1, 64, 64)
    maps[0, 0, 30, 40] = 1.0
    scores = image_scores(maps, sf=sf)
    assert scores.shape == (2,)
    assert float(scores[0]) == pytest.approx(1 / sf**2) and float(scores[1]) == 0


def test_image_score_liver_mask_and_smoothing():
    maps = torch.zeros(1, 1, 64, 64)
    maps[0, 0, 10, 10] = 1.0  # outside the liver
    maps[0, 0, 40, 40] = 0.5  # inside
    liver = torch.zeros(1, 1, 64, 64)
    liver[..., 30:50, 30:50] = 1
    assert float(image_scores(maps, sf=3)) == pytest.approx(1 / 9)
    assert float(image_scores(maps, sf=3, mask=liver)) == pytest.approx(0.5 / 9)
    corner = torch.zeros(1, 1, 8, 8)
    corner[0, 0, 0, 0] = 1.0
    assert float(smooth_map(corner, sf=3)[0, 0, 0, 0]) == pytest.approx(1 / 9)  # zero padding counts
    with pytest.raises(ValueError):
        smooth_map(corner, sf=4)


def test_msgms_map():
    image = torch.rand(2, 1, 32, 32)
    same = msgms_map(image, image)
    assert same.shape == (2, 1, 32, 32) and same.max() < 1e-6
    other = msgms_map(image, torch.rand(2, 1, 32, 32))
    assert 0 <= other.min() and other.max() <= 1 and other.mean() > 0.1
    restored = image.clone()
    restored[..., 8:16, 8:16] = 0.5  # a flat patch: local structure lost only there
    local = msgms_map(image, restored)[0, 0]
    assert local[10:14, 10:14].mean() > 5 * local[20:, 20:].mean()
    assert msgms_map(image.expand(2, 3, 32, 32), image.expand(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_anomaly_map_from_logits():
    amap = anomaly_map_from_logits(torch.zeros(1, 2, 8, 8))
    assert amap.shape == (1, 1, 8, 8) and torch.allclose(amap, torch.full_like(amap, 0.5))


class _MapOf(torch.nn.Module):
    """A stand-in detector whose map is ``fn(image)``."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        return self.fn(image)


def test_averaged_anomaly_map_is_the_mean_over_detectors_and_flips():
    image = torch.rand(2, 1, 8, 8)
    constant = [_MapOf(lambda x, v=v: torch.full_like(x, v)) for v in (0.2, 0.6)]
    assert torch.allclose(AveragedAnomalyMap(constant)(image), torch.full_like(image, 0.4))
    # a pixel-wise detector is flip-equivariant: flipping, scoring and flipping back gives its own map
    pixelwise = _MapOf(torch.sigmoid)
    tta = AveragedAnomalyMap([pixelwise], flips=["lr", "ud", "lrud"])
    assert tta.n_maps == 4
    assert torch.allclose(tta.anomaly_map(image), torch.sigmoid(image), atol=1e-6)
    # a detector that scores "how far right": the left-right flipped answer, flipped back, is the mirror ramp
    ramp = torch.linspace(0.0, 1.0, 8).expand(2, 1, 8, 8)
    rightness = _MapOf(lambda x: ramp.clone())
    assert torch.allclose(AveragedAnomalyMap([rightness], flips=["lr"])(image), torch.full_like(image, 0.5))
    assert torch.allclose(AveragedAnomalyMap([rightness], flips=["ud"])(image), ramp)


@pytest.mark.parametrize("detectors, flips", [([], []), ([_MapOf(torch.sigmoid)], ["diagonal"]),
                                              ([_MapOf(torch.sigmoid)], ["lr", "lr"])])
def test_averaged_anomaly_map_rejects_bad_arguments(detectors, flips):
    with pytest.raises(ValueError):
        AveragedAnomalyMap(detectors, flips)


def test_averaged_anomaly_map_of_one_detector_is_its_map():
    detector = FrequencyAwareDetector.from_preset("default", output="anomaly_map").eval()
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(AveragedAnomalyMap([detector]).anomaly_map(image), detector.anomaly_map(image))
