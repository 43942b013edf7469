"""Tests of pipeline.evaluate.metrics, .localisation and .baselines, and of the numpy path of
networks.scoring.image_scores, on hand-computed cases and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from networks.scoring import DEFAULT_SF, image_scores
from pipeline.evaluate.baselines import baseline_report, darkness_map, slice_baseline_scores
from pipeline.evaluate.localisation import aupro, best_dice, image_auroc_by_strata, lesion_sensitivity_at_fp
from pipeline.evaluate.metrics import StreamingAUROC, roc_auc, roc_curve


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by its definition: share of (positive, negative) pairs ordered correctly, ties 1/2."""
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def reference_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """AUPRO as the MVTec AD reference code: a curve point at every distinct score, loops, no shortcuts."""
    regions, n_regions = ndimage.label(masks, structure=np.array([np.zeros((3, 3)), np.ones((3, 3)), np.zeros((3, 3))]))
    negatives = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.mean(negatives >= t)
        pro = np.mean([np.mean(maps[regions == r] >= t) for r in range(1, n_regions + 1)])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    keep = fpr <= max_fpr
    end = np.interp(max_fpr, fpr, pro) if fpr[keep][-1] < max_fpr else pro[keep][-1]
    x, y = np.append(fpr[keep], max_fpr), np.append(pro[keep], end)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / max_fpr)


# ---------------------------------------------------------------- exact AUROC and ROC curve


def test_roc_auc_known_values():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc([0.1, 0.2, 0.3, 0.4], labels) == 1.0
    assert roc_auc([0.4, 0.3, 0.2, 0.1], labels) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # positives 0.4 and 0.8 against negatives 0.1 and 0.4: pairs 1, 1/2 (tie), 1, 1 -> 3.5 / 4
    assert roc_auc([0.1, 0.4, 0.4, 0.8], labels) == pytest.approx(0.875)


def test_roc_auc_matches_pairwise_definition_with_many_ties():
    rng = np.random.RandomState(0)
    scores = rng.randint(0, 7, size=300).astype(float)
    labels = rng.rand(300) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    assert roc_auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(roc_auc(scores, labels))


def test_roc_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan, 0.2], [0, 1])
    with pytest.raises(ValueError, match="same shape"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])


def test_roc_curve_hand_case_and_area():
    fpr, tpr, thresholds = roc_curve([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.1])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.875)


# ---------------------------------------------------------------- streaming AUROC


def test_streaming_auroc_within_error_bound_on_continuous_scores():
    rng = np.random.RandomState(1)
    labels = rng.rand(200_000) < 0.05
    scores = np.clip(rng.normal(0.4 + 0.1 * labels, 0.15), 0.0, 1.0)
    metric = StreamingAUROC()
    metric.update(scores, labels)
    exact = roc_auc(scores, labels)
    assert metric.counts == (int(labels.sum()), int((~labels).sum()))
    assert 0.0 < metric.error_bound() < 1e-3
    assert abs(metric.compute() - exact) <= metric.error_bound()


def test_streaming_auroc_exact_on_bin_centres_and_bound_attained():
    rng = np.random.RandomState(2)
    n_bins = 64
    scores = (rng.randint(0, n_bins, size=5000) + 0.5) / n_bins
    labels = rng.rand(5000) < (0.2 + 0.6 * scores)
    metric = StreamingAUROC(n_bins=n_bins)
    metric.update(scores, labels)
    assert metric.compute() == pytest.approx(roc_auc(scores, labels), abs=1e-12)
    # one bin holding perfectly separated classes: binned 0.5, exact 1.0, and the bound says exactly that
    coarse = StreamingAUROC(n_bins=1)
    coarse.update([0.50, 0.51], [0, 1])
    assert coarse.compute() == 0.5
    assert coarse.error_bound() == 0.5


def test_streaming_auroc_merge_equals_single_pass_and_clips():
    rng = np.random.RandomState(3)
    scores = rng.normal(0.5, 0.4, size=(6, 32, 32))  # partly outside (0, 1): clipped into the edge bins
    labels = rng.rand(6, 32, 32) < 0.1
    whole = StreamingAUROC(n_bins=256)
    whole.update(scores, labels)
    first, second = StreamingAUROC(n_bins=256), StreamingAUROC(n_bins=256)
    first.update(scores[:2], labels[:2])
    second.update(torch.from_numpy(scores[2:]), torch.from_numpy(labels[2:]))
    assert first.merge(second) is first
    np.testing.assert_array_equal(first.pos_hist, whole.pos_hist)
    np.testing.assert_array_equal(first.neg_hist, whole.neg_hist)
    assert first.compute() == whole.compute()
    assert abs(whole.compute() - roc_auc(np.clip(scores, 0, 1), labels)) <= whole.error_bound()
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(StreamingAUROC(n_bins=128))


def test_streaming_auroc_mask_selects_pixels():
    scores = np.array([[0.9, 0.1], [0.2, 0.95]])
    labels = np.array([[1, 0], [0, 0]])
    liver = np.array([[1, 1], [1, 0]])  # drops the 0.95 negative that outranks the positive
    masked = StreamingAUROC()
    masked.update(scores, labels, mask=liver)
    assert masked.counts == (1, 2)
    assert masked.compute() == 1.0
    unmasked = StreamingAUROC()
    unmasked.update(scores, labels)
    assert unmasked.compute() == pytest.approx(2 / 3)


def test_streaming_roc_curve_area_equals_compute_and_single_class_raises():
    rng = np.random.RandomState(4)
    scores, labels = rng.rand(1000), rng.rand(1000) < 0.3
    metric = StreamingAUROC(n_bins=32)
    metric.update(scores, labels)
    fpr, tpr, thresholds = metric.roc_curve()
    assert fpr.shape == tpr.shape == thresholds.shape == (33,)
    assert np.all(np.diff(thresholds) < 0) and fpr[-1] == tpr[-1] == 1.0
    assert np.trapezoid(tpr, fpr) == pytest.approx(metric.compute(), abs=1e-12)
    empty = StreamingAUROC()
    empty.update([0.2, 0.3], [0, 0])
    with pytest.raises(ValueError, match="both classes"):
        empty.compute()


# ---------------------------------------------------------------- AUPRO


def _spread_negatives(masks: np.ndarray, low: float = 0.1, high: float = 0.9, seed: int = 0) -> np.ndarray:
    """Maps whose negative pixels hold distinct scores evenly spread over (low, high), in random places."""
    maps = np.zeros(masks.shape)
    n_neg = int((masks == 0).sum())
    maps[masks == 0] = np.random.RandomState(seed).permutation(np.linspace(low, high, n_neg))
    return maps


def test_aupro_perfect_map_and_no_region():
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 2:6, 2:6] = masks[2, 10:12, 14:19] = True
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert np.isnan(aupro(np.random.rand(2, 8, 8), np.zeros((2, 8, 8))))
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(masks.astype(float), masks, max_fpr=0.0)


def test_aupro_averages_regions_not_pixels():
    # a large region found above every negative, a small one below every negative: PRO = 1/2 at every FPR < 1
    masks = np.zeros((2, 30, 30), dtype=bool)
    masks[0, 5:25, 5:25] = True
    masks[1, 3:5, 3:5] = True
    maps = _spread_negatives(masks)
    maps[0, 5:25, 5:25] = 1.0
    maps[1, 3:5, 3:5] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.5)


def test_aupro_uses_8_connected_regions():
    # a diagonal pixel pair is ONE region (half found) plus a single found pixel: PRO = (1/2 + 1) / 2 = 3/4
    # (4-connectivity would give three regions and PRO = 2/3)
    masks = np.zeros((1, 40, 40), dtype=bool)
    masks[0, 10, 10] = masks[0, 11, 11] = masks[0, 30, 30] = True
    maps = _spread_negatives(masks)
    maps[0, 10, 10], maps[0, 11, 11], maps[0, 30, 30] = 1.0, 0.0, 1.0
    assert aupro(maps, masks) == pytest.approx(0.75)


def test_aupro_step_inside_the_integrated_range():
    # the second region appears at FPR ~0.1: area = (0.1 * 1/2 + 0.2 * 1) / 0.3 ~ 0.833
    masks = np.zeros((1, 60, 60), dtype=bool)
    masks[0, 5:10, 5:10] = masks[0, 40:45, 40:45] = True
    maps = _spread_negatives(masks)
    maps[0, 5:10, 5:10] = 1.0
    maps[0, 40:45, 40:45] = 0.82
    fpr_at_step = float(np.mean(maps[~masks] >= 0.82))
    expected = (fpr_at_step * 0.5 + (0.3 - fpr_at_step) * 1.0) / 0.3
    assert aupro(maps, masks) == pytest.approx(expected, abs=2e-3)


def test_aupro_matches_reference_within_its_threshold_resolution():
    rng = np.random.RandomState(5)
    masks = np.zeros((4, 24, 24), dtype=bool)
    masks[0, 3:9, 4:8] = masks[1, 10:20, 10:14] = masks[1, 2:4, 2:4] = masks[3, 15:22, 1:6] = True
    maps = ndimage.gaussian_filter(rng.rand(4, 24, 24) + 0.15 * masks, sigma=(0, 1, 1))
    result = aupro(maps, masks, n_thresholds=200)
    assert result == pytest.approx(reference_aupro(maps, masks, 0.3), abs=1 / 199)
    assert 0.05 < result < 0.95  # a non-trivial case


# ---------------------------------------------------------------- best Dice and lesion sensitivity


def test_best_dice_perfect_hand_case_and_no_positive():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[1, 2:5, 2:5] = True
    dice, threshold = best_dice(masks.astype(float), masks)
    assert dice == pytest.approx(1.0) and 0.0 < threshold < 1.0
    # 4 lesion pixels at 0.9, one normal pixel at 0.95: at best all five are predicted, Dice = 8 / 9
    maps = np.zeros((1, 6, 6))
    gt = np.zeros((1, 6, 6), dtype=bool)
    gt[0, 1:3, 1:3] = True
    maps[gt] = 0.9
    maps[0, 5, 5] = 0.95
    dice, threshold = best_dice(maps, gt)
    assert dice == pytest.approx(8 / 9) and 0.0 < threshold < 0.9
    assert all(np.isnan(best_dice(maps, np.zeros_like(gt))))


def test_lesion_sensitivity_hand_case():
    maps = np.zeros((2, 16, 16))
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, 2:5, 2:5] = True  # lesion A, found from 0.8, its candidate reaches outside the mask: still a hit
    maps[0, 3:7, 3:7] = 0.8
    masks[0, 10:13, 10:13] = True  # lesion B, peak 0.3
    maps[0, 11, 11] = 0.3
    maps[1, 2:4, 2:4] = 0.6  # false positive blob on a normal slice
    maps[1, 10, 10] = 0.2  # weaker false positive
    # t:          0.9   0.7   0.5   0.25  0.1
    # sensitivity 0     1/2   1/2   1     1
    # FP / slice  0     0     1/2   1/2   1
    result = lesion_sensitivity_at_fp(
        maps, masks, threshold_grid=[0.9, 0.7, 0.5, 0.25, 0.1], fp_rates=(0, 0.25, 0.5, 1)
    )
    assert result == {0.0: 0.5, 0.25: 0.5, 0.5: 1.0, 1.0: 1.0}
    default = lesion_sensitivity_at_fp(maps, masks)
    assert set(default) == {0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0} and default[8.0] == 1.0
    assert all(np.isnan(v) for v in lesion_sensitivity_at_fp(maps, np.zeros_like(masks)).values())


# ---------------------------------------------------------------- strata


def test_image_auroc_by_strata():
    strata = np.arange(1, 13, dtype=float)
    labels = np.array([0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.9, 0.8, 0.1, 0.2, 0.5, 0.5, 0.5, 0.5])
    result = image_auroc_by_strata(scores, labels, strata, n_strata=3)
    aurocs = [s["auroc"] for s in result["strata"]]
    assert aurocs[:2] == [1.0, 0.0] and np.isnan(aurocs[2])  # the last stratum has no positive
    assert [(s["n_pos"], s["n_neg"]) for s in result["strata"]] == [(2, 2), (2, 2), (0, 4)]
    assert result["strata"][0]["range"] == (1.0, pytest.approx(4.667, abs=1e-3))
    assert result["mean"] == 0.5


# ---------------------------------------------------------------- baselines


def test_darkness_map_zero_outside_liver_numpy_and_torch():
    rng = np.random.RandomState(6)
    image = rng.rand(2, 1, 8, 8)
    liver = rng.rand(2, 1, 8, 8) < 0.5
    result = darkness_map(image, liver)
    assert np.all(result[~liver] == 0.0)
    np.testing.assert_allclose(result[liver], 1.0 - image[liver])
    as_tensor = darkness_map(torch.from_numpy(image), torch.from_numpy(liver))
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), result)


def test_numpy_image_scores_match_avg_pool2d():
    maps = np.random.RandomState(7).rand(3, 1, 30, 26)
    sf = DEFAULT_SF
    expected = torch.nn.functional.avg_pool2d(torch.from_numpy(maps), sf, stride=1, padding=sf // 2).amax(dim=(1, 2, 3))
    scores = image_scores(maps.astype(np.float32), sf=sf)  # numpy in: float64 numpy out, computed in float64
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (3,)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(image_scores(maps, sf=sf), expected.numpy(), rtol=1e-10)
    np.testing.assert_array_equal(image_scores(maps[:, 0], sf=sf), image_scores(maps, sf=sf))  # (N, H, W) as well
    with pytest.raises(ValueError, match="odd"):
        image_scores(maps, sf=20)


def test_slice_baseline_scores_values_and_empty_liver():
    images = np.zeros((2, 4, 4))
    livers = np.zeros((2, 4, 4), dtype=bool)
    livers[0, :2, :2] = livers[1, :, :] = True
    images[0, :2, :2] = [[0.2, 0.4], [0.6, 0.8]]
    images[1] = 0.5
    scores = slice_baseline_scores(images, livers, seed=3)
    np.testing.assert_allclose(scores["liver_area"], [4, 16])
    np.testing.assert_allclose(scores["liver_mean_low"], [-0.5, -0.5])
    np.testing.assert_allclose(scores["liver_std"], [np.std([0.2, 0.4, 0.6, 0.8]), 0.0])
    np.testing.assert_array_equal(scores["random"], slice_baseline_scores(images, livers, seed=3)["random"])
    assert not np.array_equal(scores["random"], slice_baseline_scores(images, livers, seed=4)["random"])
    # A slice whose liver vanished on the resampled grid ranks as the least anomalous, instead of failing the report.
    livers[1] = False
    images[0, :2, :2] = 0.1
    empty = slice_baseline_scores(images, livers)
    assert empty["liver_area"][1] == 0
    assert empty["liver_mean_low"][1] == empty["liver_mean_low"].min()
    assert empty["liver_std"][1] == empty["liver_std"].min()


def test_baseline_report_on_dark_synthetic_lesions():
    rng = np.random.RandomState(8)
    n, size = 80, 32
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, 1, size, size))
    livers = np.zeros((n, 1, size, size), dtype=bool)
    lesions = np.zeros((n, 1, size, size), dtype=bool)
    for i in range(n):
        livers[i, 0] = (yy - 16) ** 2 + (xx - 16) ** 2 <= rng.randint(8, 14) ** 2  # area unrelated to the label
        images[i, 0][livers[i, 0]] = np.clip(rng.normal(0.6, 0.05, livers[i, 0].sum()), 0, 1)
        if i % 2:
            lesions[i, 0] = livers[i, 0] & ((yy - rng.randint(12, 20)) ** 2 + (xx - rng.randint(12, 20)) ** 2 <= 9)
            images[i, 0][lesions[i, 0]] = rng.normal(0.45, 0.05, lesions[i, 0].sum())
    report = baseline_report(images, livers, lesions, sf=5, seed=0)
    assert (report["n_slices"], report["n_lesion_slices"]) == (80, 40)
    assert report["image_auroc"]["darkness"] > 0.95
    assert 0.3 < report["image_auroc"]["random"] < 0.7
    assert report["pixel_auroc"]["darkness_liver"] > 0.95
    assert report["pixel_auroc"]["darkness_all"] > report["pixel_auroc"]["darkness_liver"]  # easy black background
    assert set(report["image_auroc"]) == {"liver_area", "liver_mean_low", "liver_std", "random", "darkness",
                                          "deviation", "deviation_smoothed", "local_contrast"}
    # the dark lesions are found by the other pixel maps too, inside the liver and its eroded core
    for name in ("deviation", "deviation_smoothed", "local_contrast"):
        assert report["pixel_auroc"][f"{name}_liver"] > 0.9 and report["pixel_auroc"][f"{name}_liver_eroded"] > 0.9
    assert len(report["darkness_by_liver_area"]["strata"]) == 4
    assert report["darkness_by_liver_area"]["mean"] > 0.9


def test_smoothed_map_denoises_inside_the_liver_and_stays_zero_outside():
    """``smoothed_map`` (the ``deviation_smoothed`` baseline): a faint blob under pixel noise ranks better after a
    Gaussian; sigma 0 is the masked map; nothing leaks outside the liver."""
    from pipeline.evaluate.baselines import smoothed_map

    rng = np.random.RandomState(3)
    yy, xx = np.mgrid[:48, :48]
    liver = np.broadcast_to((yy - 24) ** 2 + (xx - 24) ** 2 <= 20**2, (6, 48, 48))
    blob = np.broadcast_to((yy - 20) ** 2 + (xx - 26) ** 2 <= 5**2, (6, 48, 48)) & liver
    maps = np.clip(0.3 + 0.05 * blob + rng.normal(0, 0.05, (6, 48, 48)), 0, 1)
    raw, smooth = smoothed_map(maps, liver, 0.0), smoothed_map(maps, liver, 2.0)
    np.testing.assert_array_equal(raw, maps * liver)
    assert np.all(smooth[~liver] == 0) and smooth.shape == (6, 48, 48) and 0 <= smooth.min() and smooth.max() <= 1
    core = ndimage.binary_erosion(liver[0], iterations=4)[None].repeat(6, 0)
    assert roc_auc(smooth[core], blob[core]) > roc_auc(raw[core], blob[core]) + 0.1
    with pytest.raises(ValueError, match="sigma"):
        smoothed_map(maps, liver, -1.0)


def test_smoothed_pixel_auroc_is_the_deviation_smoothed_post_processing():
    """The model's like-for-like number: given the deviation map, ``smoothed_pixel_auroc`` reproduces the
    ``deviation_smoothed`` baseline's pixel AUROC in the liver (same sigma in mm, same masking), and it lifts a
    noisy map above its raw AUROC."""
    from pipeline.evaluate.baselines import deviation_map
    from pipeline.evaluate.report import smoothed_pixel_auroc

    rng = np.random.RandomState(5)
    yy, xx = np.mgrid[:40, :40]
    livers = np.broadcast_to((yy - 20) ** 2 + (xx - 20) ** 2 <= 16**2, (8, 40, 40)).copy()
    lesions = np.zeros_like(livers)
    lesions[::2] = ((yy - 18) ** 2 + (xx - 22) ** 2 <= 4**2)[None] & livers[::2]
    images = np.clip(0.6 - 0.03 * lesions + rng.normal(0, 0.04, livers.shape), 0, 1) * livers
    report = baseline_report(images, livers, lesions, mm_per_pixel=2.0)
    dev = deviation_map(images, livers)
    got = smoothed_pixel_auroc(dev, lesions, livers, mm_per_pixel=2.0)
    assert got == pytest.approx(report["pixel_auroc"]["deviation_smoothed_liver"], abs=1e-9)
    assert got > report["pixel_auroc"]["deviation_liver"] + 0.05
    assert np.isnan(smoothed_pixel_auroc(dev, np.zeros_like(lesions), livers, mm_per_pixel=2.0))


def test_learning_curve_smoothed_pixel_auroc_matches_the_report():
    """The ignite metric behind the curve's ``val_pixel_auroc_liver_smoothed`` (``PixelAUROC(region=
    "liver_smoothed")``), fed in batches, gives the report's ``smoothed_pixel_auroc`` of the same maps."""
    import torch

    from pipeline.evaluate.engine import PixelAUROC
    from pipeline.evaluate.report import smoothed_pixel_auroc

    rng = np.random.RandomState(6)
    yy, xx = np.mgrid[:32, :32]
    livers = np.broadcast_to((yy - 16) ** 2 + (xx - 16) ** 2 <= 12**2, (6, 32, 32)).astype(np.float32)
    lesions = np.zeros_like(livers)
    lesions[1::2] = ((yy - 14) ** 2 + (xx - 17) ** 2 <= 3**2)[None] * livers[1::2]
    maps = np.clip(0.4 + 0.1 * lesions + rng.normal(0, 0.1, livers.shape), 0, 1).astype(np.float32) * livers
    metric = PixelAUROC(region="liver_smoothed", mm_per_pixel=1.5)
    metric.reset()
    for part in (slice(0, 4), slice(4, 6)):
        metric.update(tuple(torch.from_numpy(a[part, None]) for a in (maps, livers, lesions)))
    assert metric.compute() == pytest.approx(smoothed_pixel_auroc(maps, lesions, livers, mm_per_pixel=1.5), abs=1e-4)
    with pytest.raises(ValueError, match="region"):
        PixelAUROC(region="bogus")
