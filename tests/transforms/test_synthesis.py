"""Tests of the anomaly synthesis: Perlin noise and masks, anomaly sources, RandLiverAnomaly(d)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose
from monai.utils import set_determinism

from tests.conftest import shared_path
from transforms import perlin as perlin_module
from transforms import sources as sources_module
from transforms.errors import InputDataError
from transforms.perlin import RandPerlinMask, perlin_noise_2d
from transforms.sources import AnomalySource, ImageFolderSource, PerlinTextureSource, augment_gray
from transforms.synthesis import RandLiverAnomaly, RandLiverAnomalyd

H, W = 96, 128


def _disk(radius: float, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """A (1, H, W) float32 {0, 1} liver mask: a disk left of the centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 3) ** 2) < radius**2).astype(np.float32)[None]


LIVER = _disk(35.0)
IMAGE = (LIVER * np.linspace(0.3, 0.7, W, dtype=np.float32)[None, None, :]).astype(np.float32)


class ConstantSource(AnomalySource):
    """A texture of one value everywhere, to read beta off the output."""

    def __init__(self, value: float) -> None:
        self.value = value

    def sample(self, shape: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
        return np.full(shape, self.value, dtype=np.float32)


class RampSource(AnomalySource):
    """A fixed horizontal ramp 0..1 (non-constant, known in advance)."""

    def sample(self, shape: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
        return np.broadcast_to(np.linspace(0.0, 1.0, shape[1], dtype=np.float32), shape).copy()


@pytest.fixture
def determinism():
    """Let a test seed MONAI globally, and undo it afterwards."""
    yield set_determinism
    set_determinism(None)


# ----------------------------------------------------------------------------------------------------- Perlin noise
@pytest.mark.parametrize("shape", [(250, 250), (96, 128), (7, 300)])
@pytest.mark.parametrize("res", [(1, 1), (4, 32), (16, 2)])
def test_perlin_noise_any_size_is_the_crop_of_the_power_of_two_noise(shape, res):
    noise = perlin_noise_2d(shape, res, np.random.RandomState(3))
    assert noise.shape == shape and noise.dtype == np.float32
    assert np.isfinite(noise).all() and np.abs(noise).max() <= 1.0
    side = 1 << (max(shape) - 1).bit_length()
    full = perlin_noise_2d((side, side), res, np.random.RandomState(3))
    np.testing.assert_allclose(noise, full[: shape[0], : shape[1]], atol=1e-6)


def test_perlin_noise_is_zero_on_the_lattice_and_smooth_between():
    noise = perlin_noise_2d((256, 256), (4, 8), np.random.RandomState(0))
    np.testing.assert_allclose(noise[::64, ::32], 0.0, atol=1e-6)
    assert noise.std() > 0.05
    assert np.abs(np.diff(noise, axis=1)).max() < 0.1  # 32 px cells: neighbouring pixels differ little


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    exp_y=st.integers(0, 5),
    exp_x=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_perlin_noise_shape_and_range_property(height, width, exp_y, exp_x, seed):
    noise = perlin_noise_2d((height, width), (2**exp_y, 2**exp_x), np.random.RandomState(seed))
    assert noise.shape == (height, width)
    assert np.isfinite(noise).all() and np.abs(noise).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("shape", [(1, 250, 250), (1, 96, 128)])
def test_rand_perlin_mask_is_binary_of_exact_shape_and_non_trivial(shape):
    transform = RandPerlinMask().set_random_state(0)
    fractions = []
    for _ in range(20):
        mask = transform(np.zeros(shape, dtype=np.float32))
        assert mask.shape == (1, *shape[1:]) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        fractions.append(mask.mean())
    assert any(0.0 < f < 0.5 for f in fractions)


def test_rand_perlin_mask_keeps_the_array_type():
    transform = RandPerlinMask().set_random_state(1)
    image = MetaTensor(torch.zeros(1, H, W), meta={"filename_or_obj": "slice.nii.gz"})
    mask = transform(image)
    assert isinstance(mask, MetaTensor) and mask.dtype == torch.float32
    assert mask.meta["filename_or_obj"] == "slice.nii.gz"


def test_rand_perlin_mask_draws_resolutions_per_axis_in_the_range(monkeypatch):
    drawn = []

    def recording(shape, res, rng):
        drawn.append(tuple(res))
        return perlin_noise_2d(shape, res, rng)

    monkeypatch.setattr(perlin_module, "perlin_noise_2d", recording)
    transform = RandPerlinMask(min_scale_exp=0, max_scale_exp=5).set_random_state(0)
    for _ in range(200):
        transform(np.zeros((1, 32, 32)))
    per_axis = [{r[axis] for r in drawn} for axis in (0, 1)]
    assert per_axis[0] == per_axis[1] == {1, 2, 4, 8, 16, 32}
    assert any(ry != rx for ry, rx in drawn)


def test_rand_perlin_mask_rotation_leaves_no_empty_corners():
    # with reflected borders a full-image mask stays full after any rotation (zero fill would cut the corners)
    transform = RandPerlinMask(threshold=-2.0, rotation_range=(30.0, 30.0)).set_random_state(0)
    assert transform(np.zeros((1, 64, 64))).min() == 1.0


# ------------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("name", sorted(sources_module.AUGMENT_OPS))
def test_every_augment_op_keeps_the_unit_range(name):
    op = sources_module.AUGMENT_OPS[name]
    rng = np.random.RandomState(0)
    images = [rng.random_sample((32, 40)), np.zeros((32, 40)), np.ones((32, 40))]
    for image in images:
        for _ in range(5):
            out = np.clip(op(image, rng), 0.0, 1.0)
            assert out.shape == image.shape and np.isfinite(out).all()
    out = augment_gray(images[0], rng)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_augment_ops_do_what_their_names_say():
    rng = np.random.RandomState(0)
    image = np.linspace(0.0, 1.0, 256).reshape(16, 16)
    ops = sources_module.AUGMENT_OPS
    np.testing.assert_allclose(ops["invert"](image, rng), 1.0 - image)
    levels = [len(np.unique(ops["posterize"](image, rng))) for _ in range(10)]  # 4..8 bits kept
    assert set(levels) <= {16, 32, 64, 128, 256} and min(levels) < 256
    solarized = ops["solarize"](image, rng)
    assert np.allclose(solarized[image < 32 / 255], image[image < 32 / 255])
    assert np.allclose(solarized[image >= 128 / 255], 1.0 - image[image >= 128 / 255])
    stretched = ops["autocontrast"](0.25 + 0.5 * image, rng)
    assert stretched.min() <= 0.0 and stretched.max() >= 1.0
    dark = (np.arange(256) // 4).reshape(16, 16) / 255.0  # 64 equally frequent levels, all in [0, 0.25]
    equalized = ops["equalize"](dark, rng)
    assert equalized.min() == 0.0 and equalized.max() == 1.0 and abs(np.median(equalized) - 0.5) < 0.02


def test_augment_gray_applies_distinct_ops(monkeypatch):
    calls: list[str] = []

    def recorder(name):
        def op(image, rng):
            calls.append(name)
            return image

        return op

    monkeypatch.setattr(sources_module, "AUGMENT_OPS", {name: recorder(name) for name in sources_module.AUGMENT_OPS})
    rng = np.random.RandomState(0)
    seen = set()
    for _ in range(30):
        calls.clear()
        augment_gray(np.full((8, 8), 0.5), rng)
        assert len(calls) == 3 and len(set(calls)) == 3
        seen.update(calls)
    assert seen == set(sources_module.AUGMENT_OPS)


# ------------------------------------------------------------------------------------------------------- sources
def _write_png(path, array: np.ndarray, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8), isVector=rgb), str(path))


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "sources"
    _write_png(folder / "b_gray.png", np.full((40, 30), 128))
    red = np.zeros((20, 50, 3))
    red[..., 0] = 255
    _write_png(folder / "a_red.png", red, rgb=True)
    _write_png(folder / "nested" / "c_ramp.PNG", np.tile(np.arange(0, 256, 4), (64, 1)))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_folder_source_lists_reads_and_resizes(image_folder):
    source = ImageFolderSource(image_folder, augment=False)
    assert [p.name for p in source.files] == ["a_red.png", "b_gray.png", "c_ramp.PNG"]
    red = source.load(source.files[0], (24, 32))
    gray = source.load(source.files[1], (24, 32))
    assert red.shape == gray.shape == (24, 32) and red.dtype == np.float32
    np.testing.assert_allclose(red, 0.299, atol=1e-3)  # RGB -> luma
    np.testing.assert_allclose(gray, 128 / 255, atol=1e-3)
    rng = np.random.RandomState(0)
    for _ in range(10):
        sample = source.sample((H, W), rng)
        assert sample.shape == (H, W) and sample.dtype == np.float32
        assert 0.0 <= sample.min() and sample.max() <= 1.0


def test_image_folder_source_caches_per_file_and_shape(image_folder):
    source = ImageFolderSource(image_folder, cache_size=1)
    first = source.load(source.files[0], (8, 8))
    assert source.load(source.files[0], (8, 8)) is first
    assert source.load(source.files[0], (9, 9)).shape == (9, 9)
    assert source.load(source.files[0], (8, 8)) is not first  # evicted by the (9, 9) entry


def test_image_folder_source_augments(image_folder):
    source = ImageFolderSource(image_folder, augment=True)
    rng = np.random.RandomState(0)
    samples = [source.sample((16, 16), rng) for _ in range(10)]
    assert all(0.0 <= s.min() and s.max() <= 1.0 for s in samples)
    assert len({round(float(s.mean()), 4) for s in samples}) > 3


@pytest.mark.parametrize("make", ["missing", "empty", "no_images"])
def test_image_folder_source_without_images_names_the_folder(tmp_path, make):
    folder = tmp_path / "anomaly_sources"
    if make != "missing":
        folder.mkdir()
    if make == "no_images":
        (folder / "readme.txt").write_text("x")
    with pytest.raises(InputDataError, match="anomaly_sources") as info:
        ImageFolderSource(folder)
    assert info.value.path == str(folder)


def test_image_folder_source_corrupt_file_is_named(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\x00 not a jpeg")
    source = ImageFolderSource(folder)
    with pytest.raises(InputDataError, match="broken.jpg"):
        source.sample((16, 16), np.random.RandomState(0))


def test_image_folder_source_on_brain_tumor_mri():
    folder = shared_path("braintumor", "images")
    source = ImageFolderSource(folder, augment=True)
    assert len(source) == 1200
    rng = np.random.RandomState(0)
    for _ in range(3):
        sample = source.sample((H, W), rng)
        assert sample.shape == (H, W) and sample.dtype == np.float32
        assert 0.0 <= sample.min() and sample.max() <= 1.0 and sample.std() > 0.01


@pytest.mark.parametrize("augment", [False, True])
def test_perlin_texture_source(augment):
    source = PerlinTextureSource(augment=augment)
    rng = np.random.RandomState(0)
    for _ in range(10):
        texture = source.sample((H, W), rng)
        assert texture.shape == (H, W) and texture.dtype == np.float32
        assert 0.0 <= texture.min() and texture.max() <= 1.0
        if not augment:
            assert texture.min() == 0.0 and texture.max() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- RandLiverAnomaly
def _run(transform: RandLiverAnomalyd, n: int, image=IMAGE, liver=LIVER) -> list[dict]:
    return [transform({"image": image.copy(), "liver": liver.copy()}) for _ in range(n)]


def _key_outputs(d: dict) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(d[k]) for k in ("image", "anomaly_mask", "has_anomaly"))


def test_set_random_state_reproduces_and_seeds_differ():
    def outputs(seed):
        transform = RandLiverAnomalyd(prob=1.0).set_random_state(seed)
        return [_key_outputs(d) for d in _run(transform, 4)]

    first, again, other = outputs(7), outputs(7), outputs(8)
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))


def test_set_determinism_reproduces_inside_compose(determinism):
    def outputs(seed):
        determinism(seed)
        pipeline = Compose([RandLiverAnomalyd(prob=0.5)])
        return [_key_outputs(pipeline({"image": IMAGE, "liver": LIVER})) for _ in range(6)]

    first, again, other = outputs(0), outputs(0), outputs(1)
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_mask_stays_inside_the_liver_when_constrained():
    transform = RandLiverAnomalyd(prob=1.0).set_random_state(0)
    outside = 1.0 - LIVER
    for d in _run(transform, 20):
        mask = d["anomaly_mask"].numpy()
        assert (mask * outside).sum() == 0
        np.testing.assert_array_equal(d["image"].numpy() * outside, IMAGE * outside)


@pytest.mark.parametrize("liver", [LIVER, np.zeros_like(LIVER)], ids=["liver", "no_liver"])
def test_mask_may_leave_the_liver_when_unconstrained(liver):
    transform = RandLiverAnomalyd(prob=1.0, constrain_to_liver=False).set_random_state(0)
    outputs = _run(transform, 20, liver=liver)
    assert sum(float((d["anomaly_mask"].numpy() * (1.0 - liver)).sum()) for d in outputs) > 0
    assert sum(float(d["has_anomaly"][0]) for d in outputs) >= 15


@pytest.mark.parametrize("beta", [0.1, 0.45, 1.0])
def test_blend_formula_with_a_known_beta(beta):
    transform = RandLiverAnomaly(source=RampSource(), prob=1.0, beta_range=(beta, beta)).set_random_state(3)
    texture = RampSource().sample((H, W), np.random.RandomState(0))[None]
    for _ in range(5):
        augmented, mask, has_anomaly = transform(IMAGE, LIVER)
        assert has_anomaly == 1.0 and mask.sum() >= 16
        expected = (1 - mask) * IMAGE + (1 - beta) * mask * IMAGE + beta * mask * texture
        np.testing.assert_allclose(augmented, expected, atol=1e-6)
        assert augmented.dtype == np.float32 and isinstance(augmented, np.ndarray)


def test_beta_range_is_respected_and_covered():
    low, high = 0.2, 0.5  # asymmetric: the source opacity beta and DRAEM's 1 - beta would fall in different ranges
    transform = RandLiverAnomaly(source=ConstantSource(1.0), prob=1.0, beta_range=(low, high)).set_random_state(0)
    image = LIVER * 0.5
    betas = []
    for _ in range(40):
        augmented, mask, _ = transform(image, LIVER)
        inside = mask[0] > 0
        estimate = (augmented[0][inside] - 0.5) / (1.0 - 0.5)  # I_a = I + beta (A - I) inside M
        assert np.ptp(estimate) < 1e-5  # one beta per sample
        betas.append(float(estimate.mean()))
    assert low - 1e-5 <= min(betas) and max(betas) <= high + 1e-5
    assert min(betas) < low + 0.1 and max(betas) > high - 0.1


def test_prob_zero_is_always_clean():
    transform = RandLiverAnomalyd(prob=0.0).set_random_state(0)
    for d in _run(transform, 10):
        np.testing.assert_array_equal(d["image"].numpy(), IMAGE)
        assert d["anomaly_mask"].sum() == 0 and d["has_anomaly"][0] == 0.0


def test_prob_one_is_always_anomalous_on_a_large_liver():
    transform = RandLiverAnomalyd(prob=1.0).set_random_state(0)
    for d in _run(transform, 20):
        assert d["has_anomaly"][0] == 1.0 and d["anomaly_mask"].sum() >= 16


def test_prob_half_gives_both_kinds():
    transform = RandLiverAnomalyd(prob=0.5).set_random_state(0)
    flags = [d["has_anomaly"][0] for d in _run(transform, 100)]
    assert 25 <= sum(flags) <= 75


@pytest.mark.parametrize("liver", [np.zeros((1, H, W), np.float32), _disk(1.5)], ids=["empty", "tiny"])
def test_empty_or_tiny_liver_gives_a_clean_sample(liver):
    transform = RandLiverAnomalyd(prob=1.0).set_random_state(0)
    for d in _run(transform, 5, image=IMAGE * liver, liver=liver):
        assert d["has_anomaly"][0] == 0.0 and d["anomaly_mask"].sum() == 0
        np.testing.assert_array_equal(d["image"].numpy(), IMAGE * liver)


def test_empty_masks_are_redrawn_max_tries_times_then_clean(monkeypatch):
    transform = RandLiverAnomaly(prob=1.0, threshold=1.5, max_tries=4).set_random_state(0)  # noise never > 1.5
    calls = []
    original = transform.perlin.randomize
    monkeypatch.setattr(transform.perlin, "randomize", lambda size: (calls.append(size), original(size)))
    augmented, mask, has_anomaly = transform(IMAGE, LIVER)
    assert len(calls) == 4 and has_anomaly == 0.0 and mask.sum() == 0
    np.testing.assert_array_equal(augmented, IMAGE)


def test_dictionary_outputs_types_and_clean_target():
    image = MetaTensor(torch.as_tensor(IMAGE), meta={"filename_or_obj": "case7_slice40.nii.gz"})
    transform = RandLiverAnomalyd(prob=1.0).set_random_state(0)
    d = transform({"image": image, "liver": torch.as_tensor(LIVER)})
    for key in ("image", "anomaly_mask", "clean"):
        assert isinstance(d[key], torch.Tensor) and d[key].dtype == torch.float32 and d[key].shape == (1, H, W)
    assert d["image"].meta["filename_or_obj"] == "case7_slice40.nii.gz"
    np.testing.assert_array_equal(d["clean"].numpy(), IMAGE)
    assert d["has_anomaly"].dtype == np.float32 and d["has_anomaly"].shape == (1,)
    assert not np.array_equal(d["image"].numpy(), IMAGE)
    assert set(np.unique(d["anomaly_mask"].numpy())) <= {0.0, 1.0}


def test_source_may_be_a_folder_path(image_folder):
    transform = RandLiverAnomalyd(source=str(image_folder), prob=1.0)
    assert isinstance(transform.synth.source, ImageFolderSource)
    with pytest.raises(TypeError):
        RandLiverAnomaly(source=42)


def test_bad_inputs_raise_input_data_error_naming_the_file():
    transform = RandLiverAnomaly(prob=1.0)
    image = MetaTensor(torch.as_tensor(IMAGE), meta={"filename_or_obj": "case3.nii.gz"})
    with pytest.raises(InputDataError, match="case3.nii.gz"):
        transform(image, LIVER[:, :-1])
    with pytest.raises(InputDataError, match="1, H, W"):
        transform(IMAGE[0], LIVER[0])
    with pytest.raises(InputDataError, match="non-finite"):
        transform(np.full_like(IMAGE, np.nan), LIVER)


def test_runs_in_a_monai_dataset_and_dataloader():
    data = [{"image": IMAGE * (0.5 + 0.1 * i), "liver": LIVER} for i in range(6)]
    dataset = Dataset(data, transform=Compose([RandLiverAnomalyd(prob=0.5)]))
    batches = list(DataLoader(dataset, batch_size=3, num_workers=0))
    assert len(batches) == 2
    batch = batches[0]
    assert batch["image"].shape == batch["clean"].shape == batch["anomaly_mask"].shape == (3, 1, H, W)
    assert batch["has_anomaly"].shape == (3, 1)
