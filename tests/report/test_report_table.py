"""The demo's summary table: every trivial baseline beside the model, and a verdict that is computed, not typed."""

from __future__ import annotations

import copy

import pytest

from pipeline.cli import beats_every_baseline, format_report

REPORT = {
    "split": "test",
    "n_slices": 10,
    "n_lesion_slices": 4,
    "metrics": {"image_auroc": 0.9, "pixel_auroc": 0.99, "pixel_auroc_liver": 0.9, "pixel_auroc_liver_eroded": 0.91},
    "baselines": {
        "image_auroc": {"liver_area": 0.7, "liver_mean_low": 0.6, "liver_std": 0.65, "random": 0.95,
                        "darkness": 0.8, "deviation": 0.85, "deviation_smoothed": 0.85, "local_contrast": 0.6},
        "pixel_auroc": {f"{name}_{region}": 0.8 for name in ("darkness", "deviation", "deviation_smoothed",
                                                              "local_contrast")
                        for region in ("all", "liver", "liver_eroded")},
    },
}


def test_model_above_every_baseline_says_yes():
    text = format_report(REPORT)
    assert beats_every_baseline(REPORT)
    assert text.splitlines()[-1].endswith("yes")
    for name in ("darkness", "deviation", "deviation_smoothed", "local_contrast", "liver_area", "liver_std", "random"):
        assert f"{name} baseline" in text
    assert "0.910" in text  # the eroded-liver column


@pytest.mark.parametrize("section, key, value", [
    ("baselines/image_auroc", "deviation", 0.95),     # one image baseline above the model
    ("baselines/image_auroc", "liver_area", 0.9),     # a tie is not "above"
    ("baselines/pixel_auroc", "deviation_liver", 0.92),
    ("baselines/pixel_auroc", "deviation_smoothed_liver", 0.95),
    ("metrics", "pixel_auroc_liver", None),            # undefined: not beaten
])
def test_any_baseline_at_or_above_the_model_says_no(section, key, value):
    report = copy.deepcopy(REPORT)
    target = report
    for part in section.split("/"):
        target = target[part]
    target[key] = value
    assert not beats_every_baseline(report)
    assert "NO" in format_report(report).splitlines()[-1]


def test_a_report_from_before_a_baseline_existed_is_judged_on_the_baselines_it_has():
    report = copy.deepcopy(REPORT)
    for region in ("all", "liver", "liver_eroded"):
        del report["baselines"]["pixel_auroc"][f"deviation_smoothed_{region}"]
    del report["baselines"]["image_auroc"]["deviation_smoothed"]
    assert beats_every_baseline(report)
    assert "n/a" in next(line for line in format_report(report).splitlines() if "deviation_smoothed" in line)
