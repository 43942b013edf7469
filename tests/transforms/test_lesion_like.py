"""Tests of the lesion-like synthesis (RandLesionLikeAnomaly) and its mix with source blending in RandLiverAnomalyd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from transforms.errors import InputDataError
from transforms.lesion_like import RandLesionLikeAnomaly
from transforms.synthesis import RandLiverAnomalyd

H, W = 96, 112
HU = 450.0  # HU per unit of the default window


def _liver() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((((yy - 48) / 40.0) ** 2 + ((xx - 50) / 45.0) ** 2) < 1).astype(np.float32)[None]


LIVER = _liver()
# a textured liver at ~100 HU in the [-200, 250] window; zero outside, as prepared slices are
IMAGE = (LIVER * (0.66 + 0.02 * np.random.RandomState(0).standard_normal((1, H, W)))).astype(np.float32)


def _lesion(**kwargs) -> RandLesionLikeAnomaly:
    settings = {"prob": 1.0, "softness_range": (0.0, 0.0), **kwargs}
    return RandLesionLikeAnomaly(**settings).set_random_state(0)


def test_hard_edged_lesion_is_a_constant_shift_in_range_inside_a_liver_mask():
    synth = _lesion(rim_prob=0.0, shift_hu_range=(20.0, 40.0))
    signs = set()
    for _ in range(20):
        augmented, mask, flag = synth(IMAGE, LIVER)
        assert flag == 1.0 and mask.dtype == np.float32 and mask.shape == (1, H, W)
        assert set(np.unique(mask)) == {0.0, 1.0} and (mask <= LIVER).all()
        delta = (augmented - IMAGE) * HU
        inside = delta[mask > 0]
        # the liver's own texture is kept: one shift for every lesion pixel, nothing changes outside
        assert np.ptp(inside) < 1e-3 and 20.0 - 1e-3 <= abs(inside[0]) <= 40.0 + 1e-3
        assert np.abs(delta[mask == 0]).max() < 1e-4
        signs.add(np.sign(inside[0]))
    assert signs == {-1.0, 1.0}  # both hypo- and hyperdense lesions


@pytest.mark.parametrize("hyperdense_prob, sign", [(1.0, 1.0), (0.0, -1.0)])
def test_hyperdense_prob_sets_the_sign(hyperdense_prob, sign):
    synth = _lesion(rim_prob=0.0, hyperdense_prob=hyperdense_prob)
    for _ in range(5):
        augmented, mask, _ = synth(IMAGE, LIVER)
        assert np.sign(((augmented - IMAGE)[mask > 0]).mean()) == sign


def test_rim_lesion_has_a_near_iso_core_and_a_shifted_ring():
    synth = _lesion(rim_prob=1.0, shift_hu_range=(40.0, 50.0), rim_width_range=(2.0, 2.0), radius_range=(0.08, 0.1))
    for _ in range(5):
        augmented, mask, _ = synth(IMAGE, LIVER)
        delta = (augmented - IMAGE)[0] * HU
        blob = mask[0] > 0
        core = ndimage.binary_erosion(blob, iterations=4)
        ring = blob & ~ndimage.binary_erosion(blob, iterations=1)
        assert np.abs(delta[core]).max() <= 5.0 + 1e-3
        assert np.abs(delta[ring]).min() >= 35.0 - 1e-3


def test_soft_border_spreads_the_shift_smoothly():
    synth = _lesion(rim_prob=0.0, softness_range=(2.0, 2.0), radius_range=(0.08, 0.1), hyperdense_prob=1.0)
    augmented, mask, _ = synth(IMAGE, LIVER)
    delta = (augmented - IMAGE)[0] * HU
    blob = mask[0] > 0
    peak = delta[blob].max()
    border = blob & ~ndimage.binary_erosion(blob)
    assert 0.2 * peak < delta[border].mean() < 0.8 * peak  # neither a hard step nor no lesion


def test_the_same_seed_gives_the_same_lesions_and_seeds_differ():
    a, b = _lesion()(IMAGE, LIVER)[1], _lesion()(IMAGE, LIVER)[1]
    c = RandLesionLikeAnomaly(prob=1.0).set_random_state(1)(IMAGE, LIVER)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_prob_zero_and_a_tiny_liver_give_clean_samples():
    augmented, mask, flag = RandLesionLikeAnomaly(prob=0.0)(IMAGE, LIVER)
    assert flag == 0.0 and mask.sum() == 0 and np.array_equal(augmented, IMAGE)
    tiny = np.zeros_like(LIVER)
    tiny[0, 10, 10:14] = 1
    assert _lesion()(IMAGE * tiny, tiny)[2] == 0.0


def test_torch_input_gives_torch_output_and_bad_input_is_named():
    augmented, mask, _ = _lesion()(torch.from_numpy(IMAGE), torch.from_numpy(LIVER))
    assert isinstance(augmented, torch.Tensor) and isinstance(mask, torch.Tensor)
    with pytest.raises(InputDataError, match="non-finite"):
        _lesion()(np.full_like(IMAGE, np.nan), LIVER)
    with pytest.raises(InputDataError, match="liver mask shape"):
        _lesion()(IMAGE, LIVER[:, :10])
    with pytest.raises(ValueError, match="shift_hu_range"):
        RandLesionLikeAnomaly(shift_hu_range=(30.0, 10.0))


def test_dictionary_mix_fraction_zero_is_the_paper_and_one_is_all_lesion_like():
    def run(fraction: float, n: int = 12) -> list:
        t = RandLiverAnomalyd(keys="image", prob=1.0, lesion_like_fraction=fraction).set_random_state(3)
        out = []
        for _ in range(n):
            d = t({"image": IMAGE.copy(), "liver": LIVER})
            out.append((type(t._active).__name__, d["anomaly_mask"].numpy().copy(), d["image"].numpy().copy()))
        return out

    paper = run(0.0)
    reference = RandLiverAnomalyd(keys="image", prob=1.0).set_random_state(3)
    for name, mask, image in paper:  # fraction 0 draws exactly what the paper's transform draws
        d = reference({"image": IMAGE.copy(), "liver": LIVER})
        assert name == "RandLiverAnomaly"
        np.testing.assert_array_equal(mask, d["anomaly_mask"].numpy())
        np.testing.assert_array_equal(image, d["image"].numpy())
    assert {name for name, _, _ in run(1.0)} == {"RandLesionLikeAnomaly"}
    assert {name for name, _, _ in run(0.5, 30)} == {"RandLiverAnomaly", "RandLesionLikeAnomaly"}
    lesion_masks = [mask for _, mask, _ in run(1.0)]
    assert all(mask.sum() > 0 and (mask <= LIVER).all() for mask in lesion_masks)


def test_dictionary_passes_lesion_like_settings_and_checks_the_fraction():
    t = RandLiverAnomalyd(keys="image", lesion_like_fraction=1.0, lesion_like={"hu_per_unit": 300.0, "rim_prob": 0.0})
    assert t.lesion_synth.hu_per_unit == 300.0 and t.lesion_synth.rim_prob == 0.0
    with pytest.raises(ValueError, match="lesion_like_fraction"):
        RandLiverAnomalyd(keys="image", lesion_like_fraction=1.5)
