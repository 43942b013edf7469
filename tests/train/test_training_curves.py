"""Training at budget: the LR schedule, the learning-curve files with the synthetic-anomaly health metric, the normal-
slice intensity augmentation, and the stronger baseline maps (issue: train to convergence)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.evaluate.baselines import deviation_map, local_contrast_map
from pipeline.evaluate.metrics import erode
from pipeline.train.curves import ValidationCurve
from pipeline.train.schedule import lr_schedule
from pipeline.train.validation import SyntheticAnomalyAUROC, validation_due
from transforms.intensity import RandLiverIntensityJitter, RandLiverIntensityJitterd
from transforms.synthesis import RandLiverAnomalyd


def lrs(kind: str, epochs: int, warmup: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_schedule(optimizer, kind, epochs, warmup)
    out = [optimizer.param_groups[0]["lr"]]
    for _ in range(epochs):
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_cosine_warms_up_then_decays_to_zero_without_jumps():
    values = lrs("cosine", 20, 4)
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    decay = values[4:]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(0.0, abs=1e-12)
    assert max(abs(a - b) for a, b in zip(values, values[1:])) < 0.21  # no step-like drop
    # a warm-up longer than the run is cut to epochs - 1 (2 here): 1/3, 2/3, then the cosine
    assert lrs("cosine", 3, 5) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.0])


def test_step_and_constant_schedules():
    assert lrs("step", 10, 0)[-1] == pytest.approx(0.04)  # x0.2 at epochs 8 and 9
    assert set(lrs("constant", 5, 0)) == {1.0}
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        lrs("linear", 5, 0)
    with pytest.raises(ValueError):
        lrs("cosine", 0, 0)


def test_validation_is_due_at_every_interval_and_at_the_last_epoch():
    engine = SimpleNamespace(state=SimpleNamespace(max_epochs=25))
    due = validation_due(10)
    assert [e for e in range(1, 26) if due(engine, e)] == [10, 20, 25]


class MeanDetector(torch.nn.Module):
    """A "detector" whose anomaly map is the image itself: bright synthetic blobs score high."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def validation_items(n: int = 6, size: int = 32) -> list[dict]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    items = []
    for i in range(n):
        liver = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 12**2).astype(np.float32)[None]
        image = (0.3 + 0.02 * rng.standard_normal((1, size, size))).astype(np.float32) * liver
        lesion = np.zeros_like(liver)
        if i % 2:
            lesion[0, 14:18, 14:18] = 1
            image[0, 14:18, 14:18] = 0.1
        items.append({"image": torch.from_numpy(image), "liver": torch.from_numpy(liver),
                      "lesion": torch.from_numpy(lesion), "case_id": "c", "has_lesion": bool(i % 2)})
    return items


def test_synthetic_health_is_fixed_and_leaves_the_training_generators_alone():
    synthesis = RandLiverAnomalyd(keys="image", prob=1.0, beta_range=(1.0, 1.0), min_anomaly_pixels=4)
    health = SyntheticAnomalyAUROC(validation_items(), synthesis, n_slices=4, seed=3)
    torch.manual_seed(0)
    state = np.random.get_state()[1].copy()
    first = health(MeanDetector())
    assert health(MeanDetector()) == first  # the same set every call
    assert np.array_equal(np.random.get_state()[1], state)
    assert health._set["image"].shape == (4, 1, 32, 32) and health._set["anomaly_mask"].sum() > 0
    assert 0.0 <= first <= 1.0 and not math.isnan(first)


def test_validation_curve_writes_rows_baselines_and_keeps_them_on_resume(tmp_path):
    items = validation_items()
    metrics = {"val_image_auroc": 0.75, "val_pixel_auroc": float("nan")}
    evaluator = SimpleNamespace(state=SimpleNamespace(metrics=metrics))
    curve = ValidationCurve(evaluator, tmp_path, interval=2, baseline_items=items, sf=5, mm_per_pixel=2.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1, iteration=4, alpha=0.5, max_epochs=4),
                             optimizer=optimizer, network=MeanDetector(),
                             logger=SimpleNamespace(info=lambda *_: None))
    curve._start(engine)
    for epoch in (2, 4):
        engine.state.epoch, engine.state.iteration = epoch, 4 * epoch
        curve(engine)
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert [row["epoch"] for row in saved["rows"]] == [2, 4]
    assert saved["rows"][0]["val_image_auroc"] == 0.75 and saved["rows"][0]["val_pixel_auroc"] is None
    assert saved["rows"][1]["iteration"] == 16 and saved["rows"][1]["lr"] == pytest.approx(0.1)
    assert saved["baselines"]["pixel_auroc"]["deviation_liver"] > 0.9
    csv = (tmp_path / "curve.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,iteration,elapsed_s") and len(csv) == 3 and csv[1].endswith(",")  # nan: empty
    # a resumed training after epoch 2 keeps rows up to epoch 2 and replaces what came after
    resumed = ValidationCurve(evaluator, tmp_path, interval=2)
    engine.state.epoch = 3  # ignite increments the epoch before EPOCH_STARTED: epochs 1-2 were done
    resumed._start(engine)
    engine.state.epoch = 4
    resumed(engine)
    rows = json.loads((tmp_path / "curve.json").read_text())["rows"]
    assert [row["epoch"] for row in rows] == [2, 4] and rows[1]["elapsed_s"] >= rows[0]["elapsed_s"]


def test_liver_intensity_jitter_changes_the_liver_only_within_its_ranges():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.uniform(0.3, 0.7, (1, 16, 16)).astype(np.float32))
    liver = torch.zeros((1, 16, 16))
    liver[0, 4:12, 4:12] = 1
    jitter = RandLiverIntensityJitter(prob=1.0, shift_hu=45.0, contrast_range=(1.0, 1.0), hu_per_unit=450.0)
    jitter.set_random_state(0)
    out = jitter(image, liver)
    assert out.dtype == torch.float32 and out.shape == image.shape
    assert torch.equal(out[liver == 0], image[liver == 0])
    shift = (out - image)[liver > 0]
    assert torch.allclose(shift, shift[0], atol=1e-6) and 0 < abs(float(shift[0])) <= 0.1 + 1e-6
    off = RandLiverIntensityJitter(prob=0.0)
    assert torch.equal(off(image, liver), image)
    twin = RandLiverIntensityJitterd(keys="image", prob=1.0, contrast_range=(1.5, 1.5), shift_hu=0.0)
    twin.set_random_state(0)
    d = twin({"image": image, "liver": liver})
    inside = d["image"][liver > 0]
    assert float(inside.std()) == pytest.approx(1.5 * float(image[liver > 0].std()), rel=1e-3)
    assert torch.equal(d["liver"], liver)


def test_deviation_uses_each_volumes_own_median_and_local_contrast_its_neighbourhood():
    images = np.full((2, 1, 20, 20), 0.5)
    images[1] = 0.7  # a brighter volume: its own median, so no deviation everywhere
    livers = np.ones((2, 1, 20, 20), dtype=bool)
    images[0, 0, 8:12, 8:12] = 0.9  # a hyperdense lesion
    dev = deviation_map(images, livers, case_ids=["a", "b"])
    assert dev[0, 9, 9] == pytest.approx(0.4) and dev[0, 0, 0] == 0.0 and not dev[1].any()
    # pooled over both volumes the median is 0.7, and the whole darker volume "deviates": why it is per volume
    assert deviation_map(images, livers)[0, 0, 0] == pytest.approx(0.2)
    local = local_contrast_map(images, livers, window_px=9)
    assert local[0, 9, 9] < 0 < local[0, 7, 7]  # the bright lesion is brighter than its surroundings
    assert erode(livers[:, 0], 3)[0].sum() == 14 * 14
