"""Variants as configuration, the report's metrics and ``python -m pipeline compare`` (fake and one real tiny run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from networks.skip_decay_unet import SkipDecayUp
from pipeline.cli import main as cli_main
from pipeline.common.bundle import BUNDLE_DIR
from pipeline.evaluate.localisation import aupro
from pipeline.evaluate.metrics import roc_auc
from pipeline.evaluate.report import aupro_in_region, localisation_report, roc_points
from pipeline.report import compare, variants
from tests.conftest import png_size

CONFIGS = BUNDLE_DIR / "configs"
OOD_VARIANTS = {"full", "RE-MS", "WD", "REW-D-L", "REW-D-B", "full-mix", "full-aug", "full-step", "full-skips",
                "full-skips-aug", "full-skips-mix", "full-skips-2p5d", "full-skips-draem-net"}
# "texture": no out-of-distribution folder (procedural texture or, for full-lesion, lesion-like synthesis only)
TEXTURE_VARIANTS = {"REW-D", "REW-D-NOS", "DRAEM", "FAIR", "WDMT", "full-lesion", "full-skips-draem-synth"}


pytestmark = pytest.mark.usefixtures("one_thread")


def variant_parser(name: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in variants.variant_configs(name)])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def alpha_schedule(parser: ConfigParser, total: int = 50) -> list[float]:
    """α before every iteration, from the SkipDecayAlphaHandler that train#handlers really builds."""
    keys = [ref[1:] for ref in parser["train#handlers"]]  # "@train#skip_decay" -> "train#skip_decay"
    (key,) = [k for k in keys if parser[k].get("_target_", "").endswith("SkipDecayAlphaHandler")]
    handler = parser.get_parsed_content(key)
    return [handler.alpha_at(it, total) for it in range(1, total + 1)]


# ------------------------------------------------------------------------------------------------ variant configs


def test_all_variants_are_listed():
    assert set(variants.available_variants()) == OOD_VARIANTS | TEXTURE_VARIANTS


@pytest.mark.parametrize("name", sorted(OOD_VARIANTS | TEXTURE_VARIANTS))
def test_variant_builds_its_network_and_source(name: str):
    parser = variant_parser(name, ood_source="/data/brain_mri")
    net = parser.get_parsed_content("network_def")
    assert (net.segmentation is None) == (name in {"RE-MS", "FAIR"})
    assert (net.restoration is None) == (name in {"WD", "WDMT"})
    assert (net.highpass is None) == (name in {"WD", "WDMT", "REW-D-L", "DRAEM", "full-skips-draem-net"})
    if net.restoration is not None:
        skips = name not in {"DRAEM", "full-skips-draem-net"}
        assert all(block.additive_skip == skips for block in net.restoration.decoder)
    if net.segmentation is not None:
        detached = {m.detach_decoder_copy for m in net.segmentation.modules() if isinstance(m, SkipDecayUp)}
        assert detached == {name == "WDMT"}
    channels = 3 if name == "full-skips-2p5d" else 1  # the 2.5D variant sees a slice between two neighbours
    assert parser.get_parsed_content("network_settings")["in_channels"] == channels
    with torch.no_grad():
        amap = net.anomaly_map(torch.rand(1, channels, 64, 64))
    assert amap.shape == (1, 1, 64, 64) and 0.0 <= float(amap.min()) <= float(amap.max()) <= 1.0
    # a texture variant keeps its forced source even when the run gives an OOD folder
    expected_source = "/data/brain_mri" if name in OOD_VARIANTS else None
    assert parser.get_parsed_content("anomaly_source") == expected_source
    assert variants.uses_ood_source(name) == (name in OOD_VARIANTS)
    assert parser.get_parsed_content("constrain_to_liver") == (
        name not in {"REW-D-B", "DRAEM", "FAIR", "WDMT", "full-skips-draem-synth"}
    )
    assert parser.get_parsed_content("anomaly_prob") == (0.0 if name == "REW-D-NOS" else 0.5)
    # inference.json gets every constructor argument of the run
    settings = parser.get_parsed_content("network_settings")
    assert settings == {**settings, **parser.get_parsed_content("network_overrides")}


@pytest.mark.parametrize("name, fraction", [("full", 0.0), ("full-mix", 0.5), ("full-lesion", 1.0)])
def test_lesion_like_variants_configure_the_synthesis(name, fraction, tiny_phantom_set):
    parser = variant_parser(name, ood_source=None, dataset_dir=str(tiny_phantom_set / "prepared"))
    synthesis = parser.get_parsed_content("train#synthesis")
    assert synthesis.lesion_like_fraction == fraction
    assert synthesis.lesion_synth.hu_per_unit == 450.0  # the manifest's HU window [-200, 250]
    assert synthesis.lesion_synth.shift_hu_range == (10.0, 60.0)


FADING_VARIANTS = ("full", "REW-D", "REW-D-B", "REW-D-L", "REW-D-NOS", "WD", "WDMT", "full-aug", "full-lesion",
                   "full-mix", "full-step")


def test_the_default_holds_alpha_at_one_and_the_paper_variants_fade_it():
    held = [1.0] * 50
    for name in ("DRAEM", "full-skips", "full-skips-aug", "full-skips-mix", "full-skips-2p5d"):
        assert alpha_schedule(variant_parser(name)) == held, name
    default = ConfigParser()
    default.read_config(str(CONFIGS / "train.yaml"))
    assert alpha_schedule(default) == held
    for name in FADING_VARIANTS:  # the paper's method and its ablations keep the paper's skip fade
        fade = alpha_schedule(variant_parser(name))
        assert fade[0] == 1.0 and fade[-1] == 0.0 and all(a >= b for a, b in zip(fade, fade[1:])), name


def test_train_yaml_alone_keeps_its_defaults():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    assert parser.get_parsed_content("anomaly_source") is None  # no ood_source: the procedural texture
    parser["anomaly_source"] = "/x"  # the documented --anomaly_source override still wins
    assert parser.get_parsed_content("anomaly_source") == "/x"
    net = parser.get_parsed_content("network_def")
    assert net.restoration is not None and net.segmentation is not None and net.highpass is not None


# ------------------------------------------------------------------------------------------------ report metrics


def test_roc_points_are_thinned_with_their_end_points():
    rng = np.random.default_rng(0)
    labels = rng.random(1500) < 0.4
    scores = rng.random(1500) + labels * 0.3
    curve = roc_points(scores, labels)
    assert len(curve["fpr"]) <= 200 and len(curve["fpr"]) == len(curve["tpr"])
    assert (curve["fpr"][0], curve["tpr"][0]) == (0.0, 0.0) and (curve["fpr"][-1], curve["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(curve["fpr"]) >= 0) and np.all(np.diff(curve["tpr"]) >= 0)
    # the thinned curve keeps the area within a few thousandths
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(roc_auc(scores, labels), abs=5e-3)
    assert roc_points(scores, np.zeros(1500)) is None


def test_aupro_in_region_equals_aupro_on_the_cropped_region():
    rng = np.random.default_rng(1)
    maps = rng.random((6, 16, 32))
    masks = np.zeros((6, 16, 32), bool)
    masks[:3, 4:9, 3:8] = True
    masks[4, 10:13, 10:14] = True
    maps[masks] += 0.4
    region = np.zeros_like(masks)
    region[:, :, :16] = True  # the left half holds every lesion
    maps[:, :, 16:] = 5.0  # very "anomalous" outside the region: must not count
    expected = aupro(maps[:, :, :16], masks[:, :, :16])
    assert aupro_in_region(maps, masks, region) == pytest.approx(expected, abs=1e-2)
    assert aupro_in_region(maps, masks, np.ones_like(masks)) == pytest.approx(aupro(maps, masks), abs=1e-9)
    assert np.isnan(aupro_in_region(maps, np.zeros_like(masks), region))


def test_localisation_report_on_a_liver_only_map():
    rng = np.random.default_rng(2)
    livers = np.zeros((8, 32, 32), bool)
    livers[:, 6:26, 6:26] = True
    lesions = np.zeros_like(livers)
    lesions[::2, 10:15, 10:15] = True
    maps = rng.random(livers.shape) * 0.5 * livers
    maps[lesions] += 0.5
    labels = lesions.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    report = localisation_report(maps, lesions, livers, scores, labels)
    metrics = report["metrics"]
    assert metrics["best_dice"] > 0.9 and metrics["aupro"] > 0.9 and metrics["aupro_liver"] > 0.9
    assert report["lesion_sensitivity_at_fp"]["1"] == 1.0
    assert report["image_roc"]["tpr"][-1] == 1.0
    # a random map inside the liver: the zero background inflates the all-pixel AUPRO, the liver one stays low
    noise = rng.random(livers.shape) * livers
    random_report = localisation_report(noise, lesions, livers, noise.max(axis=(1, 2)), labels)
    assert random_report["metrics"]["aupro_liver"] < 0.3 < random_report["metrics"]["aupro"]


# ------------------------------------------------------------------------------------------------ compare, fake runs


def fake_report(variant: str, seed: int) -> dict:
    """An evaluation report whose numbers follow from (variant, seed)."""
    base = {"DRAEM": 0.6, "WDMT": 0.7}.get(variant, 0.5)
    value = base + 0.1 * seed
    keys = ("image_auroc", "pixel_auroc", "pixel_auroc_liver", "pixel_auroc_liver_eroded", "pixel_auroc_liver_smoothed",
            "aupro", "aupro_liver", "best_dice")
    curve = {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, value, 1.0]}
    return {
        "split": "test",
        "n_slices": 10,
        "n_lesion_slices": 4,
        "metrics": {**{k: value for k in keys}, "image_auroc_area_matched": None},
        "image_roc": {"model": curve, "darkness": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}},
        "baselines": {
            "image_auroc": {
                "liver_area": 0.81,
                "liver_mean_low": 0.52,
                "liver_std": 0.63,
                "random": 0.49,
                "darkness": 0.74,
                "deviation": 0.95,
                "local_contrast": 0.7,
            },
            "pixel_auroc": {"darkness_all": 0.91, "darkness_liver": 0.66, "darkness_liver_eroded": 0.62,
                            "deviation_all": 0.97, "deviation_liver": 0.83, "deviation_liver_eroded": 0.85,
                            "local_contrast_all": 0.6, "local_contrast_liver": 0.61,
                            "local_contrast_liver_eroded": 0.64},
            "darkness_by_liver_area": {"mean": 0.58},
        },
    }


def fake_curve(seed: int) -> dict:
    """A learning curve (ValidationCurve's file) of three validations: best at epoch 2, last 0.1 below it."""
    rows = [
        {"epoch": e, "iteration": 4 * e, "elapsed_s": 10.0 * e, "val_pixel_auroc_liver": v, "val_image_auroc": v,
         "synthetic_pixel_auroc_liver": 0.9}
        for e, v in ((1, 0.5), (2, 0.8 + 0.01 * seed), (3, 0.7 + 0.01 * seed))
    ]
    return {"rows": rows, "baselines": fake_report("x", 0)["baselines"]}


class FakeBundle:
    """Stands in for ``run_bundle``: writes what training and evaluation would, records the calls."""

    def __init__(self, fail: set[tuple[str, int, str]] = frozenset()):
        self.calls: list[tuple[str, list[str], dict]] = []
        self.fail = set(fail)

    def __call__(self, run_id: str, configs, bundle_root: Path, **overrides) -> int:
        self.calls.append((run_id, list(configs), overrides))
        variant, seed = Path(configs[1]).stem, int(overrides["seed"])
        print(f"fake {run_id} {variant} seed {seed}")
        if (variant, seed, run_id) in self.fail:
            return 3
        if run_id == "training":
            (bundle_root / "models").mkdir(parents=True, exist_ok=True)
            for name in ("model.pt", "checkpoint_final.pt"):
                (bundle_root / "models" / name).write_bytes(b"")
            (bundle_root / "eval").mkdir(parents=True, exist_ok=True)
            (bundle_root / "eval" / "curve.json").write_text(json.dumps(fake_curve(seed)))
        else:
            (bundle_root / "eval").mkdir(parents=True, exist_ok=True)
            report = fake_report(variant, seed)
            if "ensemble_bundles" in overrides:  # as evaluate.yaml records it
                report["ensemble_bundles"] = overrides["ensemble_bundles"]
            (bundle_root / "eval" / "metrics.json").write_text(json.dumps(report))
        return 0


@pytest.fixture
def prepared_stub(tmp_path: Path) -> Path:
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text("{}")
    return tmp_path / "prepared"


def test_compare_aggregates_records_failures_and_resumes(tmp_path: Path, prepared_stub: Path, monkeypatch):
    fake = FakeBundle(fail={("WDMT", 1, "training")})
    monkeypatch.setattr(variants, "run_bundle", fake)
    out = tmp_path / "out"
    argv = ["--data", str(prepared_stub), "--out", str(out), "--variants", "DRAEM,WDMT", "--seeds", "0,1"]
    assert compare.main([*argv, "--epochs", "1", "--extra", "batch_size=4"]) == 1

    # seed-major: every variant gets seed 0 before any gets seed 1
    assert [(c[0], Path(c[1][1]).stem, c[2]["seed"]) for c in fake.calls] == [
        ("training", "DRAEM", 0),
        ("evaluating", "DRAEM", 0),
        ("training", "WDMT", 0),
        ("evaluating", "WDMT", 0),
        ("training", "DRAEM", 1),
        ("evaluating", "DRAEM", 1),
        ("training", "WDMT", 1),
    ]
    run_id, configs, overrides = fake.calls[0]
    assert configs == ["train.yaml", "variants/DRAEM.yaml"]
    assert overrides["epochs"] == 1 and overrides["batch_size"] == "4" and overrides["resume"] is True
    assert Path(overrides["dataset_dir"]) == prepared_stub.resolve() and "ood_source" not in overrides
    run_id, configs, overrides = fake.calls[1]
    assert configs == ["train.yaml", "variants/DRAEM.yaml", "evaluate.yaml"]
    assert overrides["eval_split"] == "test" and "epochs" not in overrides and overrides["batch_size"] == "4"
    assert "fake training WDMT seed 1" in (out / "runs" / "WDMT" / "seed1" / "train.log").read_text()

    md = (out / "results.md").read_text()
    assert "| DRAEM | 0.650 ± 0.071 | 0.650 ± 0.071 | 0.650 ± 0.071 | 0.650 ± 0.071 | 0.650 ± 0.071 | " in md
    assert "| WDMT | 0.700 | 0.700 |" in md and "| 1 (1 failed) |" in md
    assert "| liver area | 0.810 | — | — | — | — |" in md
    assert "| darkness | 0.740 | 0.910 | 0.660 | 0.620 | 0.580 |" in md
    assert "| two-sided deviation from the liver median | 0.950 | 0.970 | 0.830 | 0.850 | — |" in md
    # learning curves: per run last / best (epoch) / gap / spread of the second half, and the figure
    assert "| DRAEM seed 1 | 12 (3) | 30 | 0.710 | 0.810 (2) | -0.100 | 0.050 |" in md
    assert png_size(out / "curves.png")[0] > 0
    assert "WDMT seed 1: training exited 3" in md
    assert "python -m pipeline compare --data" in md and "cpu_count" in md and "torch" in md and "- code: " in md
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["ok", "ok", "ok", "failed"]
    assert results["summary"]["variants"]["DRAEM"]["metrics"]["image_auroc"]["n"] == 2
    assert results["runs"][1]["metrics"]["image_auroc"] == pytest.approx(0.7)
    curve = results["summary"]["variants"]["DRAEM"]["curve"]["val_pixel_auroc_liver"]
    assert curve["last_minus_best"]["mean"] == pytest.approx(-0.1) and curve["last"]["n"] == 2
    assert png_size(out / "roc.png") == (600, 600)

    # resume: only the failed run runs again, and it now succeeds
    fake.fail.clear()
    fake.calls.clear()
    assert compare.main(argv) == 0
    assert [(c[0], Path(c[1][1]).stem, c[2]["seed"]) for c in fake.calls] == [
        ("training", "WDMT", 1),
        ("evaluating", "WDMT", 1),
    ]
    assert "| WDMT | 0.750 ± 0.071 |" in (out / "results.md").read_text()

    # a trained but unevaluated run is only evaluated; finished runs are skipped
    fake.calls.clear()
    (out / "runs" / "DRAEM" / "seed0" / "eval" / "metrics.json").unlink()
    assert compare.main(argv) == 0
    assert [(c[0], Path(c[1][1]).stem, c[2]["seed"]) for c in fake.calls] == [("evaluating", "DRAEM", 0)]
    statuses = [r["status"] for r in json.loads((out / "results.json").read_text())["runs"]]
    assert statuses == ["ok", "skipped", "skipped", "skipped"]


def test_compare_ensemble_row_evaluates_the_mean_map_of_the_seeds(tmp_path: Path, prepared_stub: Path, monkeypatch):
    fake = FakeBundle()
    monkeypatch.setattr(variants, "run_bundle", fake)
    out = tmp_path / "out"
    argv = ["--data", str(prepared_stub), "--out", str(out), "--variants", "DRAEM", "--seeds", "0,1", "--ensemble"]
    assert compare.main(argv) == 0
    run_id, configs, overrides = fake.calls[-1]
    assert run_id == "evaluating" and configs == ["train.yaml", "variants/DRAEM.yaml", "evaluate.yaml"]
    assert overrides["ensemble_bundles"] == [str(out / "runs" / "DRAEM" / f"seed{k}") for k in (0, 1)]
    assert not any(c[0] == "training" and "ensemble_bundles" in c[2] for c in fake.calls)
    assert (out / "runs" / "DRAEM" / "ensemble" / "eval" / "metrics.json").is_file()
    assert "| DRAEM ensemble of 2 | 0.600 |" in (out / "results.md").read_text()
    # resumed: nothing runs again, the ensemble included
    fake.calls.clear()
    assert compare.main(argv) == 0 and fake.calls == []
    # a third seed: it trains, and the ensemble of 2 is not passed off as the ensemble of 3
    argv[argv.index("0,1")] = "0,1,2"
    assert compare.main(argv) == 0
    run_id, _, overrides = fake.calls[-1]
    assert run_id == "evaluating" and len(overrides["ensemble_bundles"]) == 3
    assert "| DRAEM ensemble of 3 |" in (out / "results.md").read_text()


def test_compare_refuses_bad_requests_before_training(tmp_path: Path, prepared_stub: Path, monkeypatch, capsys):
    fake = FakeBundle()
    monkeypatch.setattr(variants, "run_bundle", fake)
    common = ["--data", str(prepared_stub), "--out", str(tmp_path / "out")]
    assert compare.main([*common, "--variants", "DRAEM,nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert compare.main([*common, "--variants", "DRAEM,full"]) == 2
    assert "--anomaly-source" in capsys.readouterr().err
    assert cli_main(["compare", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--variants", "DRAEM"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert fake.calls == []
    # with the source, the OOD variant gets it (resolved) and the texture variant too: its config ignores it
    source = tmp_path / "brain"
    assert compare.main([*common, "--variants", "full,DRAEM", "--anomaly-source", str(source)]) == 0
    assert [c[2]["ood_source"] for c in fake.calls if c[0] == "training"] == [source.resolve()] * 2


# ------------------------------------------------------------------------------------------------ one real run


@pytest.fixture(scope="module")
def prepared_phantom(tiny_phantom_set: Path) -> Path:
    return tiny_phantom_set / "prepared"


@pytest.mark.slow
def test_compare_real_tiny_run(tmp_path: Path, prepared_phantom: Path):
    out = tmp_path / "out"
    argv = ["--data", str(prepared_phantom), "--out", str(out), "--variants", "DRAEM", "--seeds", "0"]
    assert cli_main(["compare", *argv, "--epochs", "1", "--extra", "batch_size=4", "progress=False"]) == 0
    run = out / "runs" / "DRAEM" / "seed0"
    report = json.loads((run / "eval" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_auroc_liver", "pixel_auroc_liver_smoothed", "aupro",
                "aupro_liver", "best_dice"):
        assert report["metrics"][key] is not None and 0.0 <= report["metrics"][key] <= 1.0, key
    assert set(report["lesion_sensitivity_at_fp"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert len(report["image_roc"]["model"]["fpr"]) <= 200 and report["image_roc"]["darkness"]["tpr"][-1] == 1.0
    assert len(report["image_auroc_by_liver_area"]["strata"]) == 4
    # DRAEM's plain U-Net skips: alpha is still 1 after training, and inference.json knows the variant's network
    state = torch.load(run / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert float(state["segmentation.alpha"]) == 1.0
    network = json.loads((run / "models" / "inference.json").read_text())["network"]
    assert network["restoration_skips"] is False and network["use_highpass"] is False
    md = (out / "results.md").read_text()
    image_auroc = report["metrics"]["image_auroc"]
    assert f"| DRAEM | {image_auroc:.3f} |" in md and "| random |" in md
    assert png_size(out / "roc.png") == (600, 600)
    # the one epoch was validated (the last epoch always is) and its curve row holds the health metric
    (row,) = json.loads((run / "eval" / "curve.json").read_text())["rows"]
    assert row["epoch"] == 1 and 0.0 <= row["synthetic_pixel_auroc_liver"] <= 1.0
    assert png_size(out / "curves.png")[0] > 0
