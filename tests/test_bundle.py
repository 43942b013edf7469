"""The MONAI Bundle end to end through MONAI's own CLI, on a tiny phantom set (as a user runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "liver_ct_anomaly_detection"
CONFIGS = BUNDLE / "configs"

pytestmark = pytest.mark.slow


def bundle_cli(*args: str, cwd: Path = BUNDLE) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def prepared(tiny_phantom_set: Path) -> Path:
    return tiny_phantom_set


def test_train_then_evaluate(prepared: Path):
    bundle_root = prepared / "bundle_root"
    common = ["--bundle_root", str(bundle_root), "--dataset_dir", str(prepared / "prepared")]
    bundle_cli("run", "training", "--config_file", "configs/train.yaml", "--epochs", "1", "--batch_size", "4", *common)
    assert (bundle_root / "models" / "model.pt").is_file()
    assert (bundle_root / "models" / "checkpoint_final.pt").is_file()
    configs = "['configs/train.yaml','configs/evaluate.yaml']"
    bundle_cli("run", "evaluating", "--config_file", configs, *common)
    report = json.loads((bundle_root / "eval" / "metrics.json").read_text())
    assert report["split"] == "test"
    for key in ("image_auroc", "pixel_auroc", "pixel_auroc_liver"):
        assert key in report["metrics"]
    assert 0.0 <= report["metrics"]["pixel_auroc"] <= 1.0
    assert set(report["baselines"]["image_auroc"]) >= {"darkness", "liver_area", "random"}
    assert len(report["slices"]) == report["n_slices"] > 0
    assert report["ensemble_bundles"] == [] and report["tta_flips"] == []

    # A seed ensemble of the same bundle twice is that bundle (load_detector reads the weights CheckpointLoader
    # loads); test-time flips change the map, so they change the pixel AUROC's inputs but keep it a valid AUROC.
    twice = ["--ensemble_bundles", f"['{bundle_root}','{bundle_root}']"]
    bundle_cli("run", "evaluating", "--config_file", configs, *common, *twice, "--output_dir", str(prepared / "ens"))
    ensemble = json.loads((prepared / "ens" / "metrics.json").read_text())
    assert ensemble["ensemble_bundles"] == [str(bundle_root)] * 2
    for key in ("image_auroc", "pixel_auroc", "pixel_auroc_liver"):
        assert ensemble["metrics"][key] == pytest.approx(report["metrics"][key], abs=1e-6)
    flips = ["--tta_flips", "['lr','ud']", "--output_dir", str(prepared / "tta")]
    bundle_cli("run", "evaluating", "--config_file", configs, *common, *flips)
    tta = json.loads((prepared / "tta" / "metrics.json").read_text())
    assert tta["tta_flips"] == ["lr", "ud"] and 0.0 <= tta["metrics"]["pixel_auroc"] <= 1.0
    assert [s["score"] for s in tta["slices"]] != [s["score"] for s in report["slices"]]


def test_run_id_run_is_training():
    """MONAI Label's BundleTrainTask and the model-zoo run the id "run"; it must do what "training" does."""
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_file(CONFIGS / "train.yaml")
    assert config["run"] == config["training"]
    assert config["run"][0] == "$@train#trainer.run()"
    # with evaluate.yaml merged on top, "run" evaluates: it must never retrain
    merged = ConfigParser()
    merged.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    assert merged["run"] == merged["evaluating"] == ["$@validate#evaluator.run()"]


def test_config_slice_loading_is_the_python_one(prepared: Path):
    """train.yaml spells pipeline.data.loading.slice_loading out as _target_ transforms: same transforms, same data."""
    import torch
    from monai.bundle import ConfigParser

    from pipeline.data.loading import slice_loading

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser["dataset_dir"] = str(prepared / "prepared")
    train = parser.get_parsed_content("train#preprocessing")
    extra = parser.get_parsed_content("train#augmentation") + [parser.get_parsed_content("train#synthesis")]
    assert [type(t) for t in train.transforms] == [type(t) for t in slice_loading(extra).transforms]
    entry = parser.get_parsed_content("manifest")["validation"][0]
    ours, python = parser.get_parsed_content("validate#preprocessing")(dict(entry)), slice_loading()(dict(entry))
    assert ours.keys() == python.keys()
    for key in ("image", "label", "liver", "lesion"):
        assert ours[key].dtype == python[key].dtype and torch.equal(ours[key], python[key]), key


def test_verify_metadata_offline():
    proc = bundle_cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "configs/schema.json")
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_metadata_eval_metrics_are_the_validated_numbers():
    """``eval_metrics`` holds numbers only (the model zoo's convention) and they are the 3-seed means of the unedited
    ``compare`` output the docs cite for the default recipe, not typed-in values."""
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_bytes())
    results = json.loads((REPO / "docs" / "results" / "full_skips_norm" / "results.json").read_bytes())
    measured = results["summary"]["variants"]["full-skips"]["metrics"]
    assert meta["eval_metrics"] and all(type(v) in (int, float) for v in meta["eval_metrics"].values())
    for name, value in meta["eval_metrics"].items():
        assert value == round(measured[name]["mean"], 3), name


def test_verify_net_in_out_and_ckpt_export(tmp_path: Path):
    import torch

    from networks import FrequencyAwareDetector

    ckpt = tmp_path / "model.pt"
    torch.save(FrequencyAwareDetector.from_preset("default", output="anomaly_map").state_dict(), ckpt)
    proc = bundle_cli(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
    )
    assert "verified with no error" in proc.stdout + proc.stderr
    bundle_cli(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        str(ckpt),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    out = scripted(torch.rand(1, 1, 256, 256))
    assert out.shape == (1, 1, 256, 256) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_train_evaluate_and_infer_with_2p5d_input(prepared: Path, tmp_path: Path):
    """context_slices > 0 through the bundle: training records the slice context, evaluation and the CLI use it."""
    bundle_root = tmp_path / "bundle_2p5d"
    tiny = "{'restoration_features': [4, 8], 'segmentation_features': [4, 8]}"
    common = ["--bundle_root", str(bundle_root), "--dataset_dir", str(prepared / "prepared"), "--context_slices", "1",
              "--network_overrides", tiny, "--progress", "false"]
    bundle_cli("run", "training", "--config_file", "configs/train.yaml", "--epochs", "1", "--batch_size", "4",
               "--health_slices", "4", *common)
    settings = json.loads((bundle_root / "models" / "inference.json").read_text())
    assert settings["slice_context"] == {"slices": 1, "mm": 3.0} and settings["network"]["in_channels"] == 3
    curve = json.loads((bundle_root / "eval" / "curve.json").read_text())
    assert curve["rows"] and "darkness" in json.dumps(curve["baselines"])
    bundle_cli("run", "evaluating", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", *common)
    assert 0.0 <= json.loads((bundle_root / "eval" / "metrics.json").read_text())["metrics"]["pixel_auroc"] <= 1.0
    raw = sorted((prepared / "raw").rglob("volume-*.nii*"))[0]
    label = raw.with_name(raw.name.replace("volume-", "segmentation-"))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "infer", "--image", str(raw), "--label", str(label),
                           "--bundle", str(bundle_root), "--out", str(tmp_path / "out"), "--label-preset", "phantom"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert list((tmp_path / "out").glob("*_anomaly.nii.gz"))


def test_inference_workflow_heatmap_is_the_cli_heatmap(tmp_path: Path):
    """inference.yaml's MONAI workflow (preprocessing -> SliceInferer -> Invertd -> SaveImaged, run by the
    SupervisedEvaluator under `inferring`) writes exactly infer_volume's heatmap, for each datalist entry, on the
    input grid of each (one stored RAS, one LPS), with the architecture and preprocessing of models/inference.json."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    from networks.detector import FrequencyAwareDetector
    from pipeline.common.io import save_nifti
    from pipeline.data.phantom import make_phantom_case
    from pipeline.data.settings import PrepareSettings
    from pipeline.infer.settings import load_detector, write_inference_settings
    from pipeline.infer.volume import infer_volume
    from transforms.errors import InputDataError

    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8], "highpass_order": 1}
    settings = PrepareSettings(field_mm=200.0, size=32)
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FrequencyAwareDetector.from_preset("default", **tiny).state_dict(), bundle / "models" / "model.pt")
    write_inference_settings(bundle, 0.5, settings, "default", tiny)
    phantom = make_phantom_case(5, size=48, n_slices=6, n_lesions=1, lesion_kinds=("hypo",))
    cases = []
    for name, flip in (("ras", False), ("lps", True)):
        ct, label, affine = phantom.ct, phantom.label, phantom.affine.copy()
        if flip:  # x and y reversed: the same anatomy at the same world points
            ct, label = ct[::-1, ::-1].copy(), label[::-1, ::-1].copy()
            affine[:3, :2] *= -1
            affine[:3, 3] -= affine[:3, :2] @ (np.array(ct.shape[:2]) - 1.0)
        cases.append({"image": str(save_nifti(tmp_path / f"{name}_ct.nii.gz", ct.astype(np.int16), affine)),
                      "label": str(save_nifti(tmp_path / f"{name}_label.nii.gz", label.astype(np.uint8), affine))})

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update({"bundle_root": str(bundle), "datalist": cases, "output_dir": str(tmp_path / "workflow"),
                   "device": "$torch.device('cpu')"})
    for key in ("preprocessing", "inferer", "postprocessing"):
        assert callable(parser.get_parsed_content(key)), key
    parser.get_parsed_content("inferring")

    detector = load_detector(bundle)
    for case in cases:
        report = infer_volume(case["image"], case["label"], detector, liver_values=(1,), lesion_values=(2,),
                              settings=settings, threshold=0.5, out_dir=tmp_path / "cli", device="cpu")
        cli = nib.load(report["outputs"]["anomaly"])
        ours = nib.load(tmp_path / "workflow" / Path(report["outputs"]["anomaly"]).name)
        expected, got = np.asarray(cli.dataobj), np.asarray(ours.dataobj)
        assert got.dtype == expected.dtype == np.float32 and got.shape == expected.shape
        assert np.array_equal(got, expected) and expected.max() > 0, np.abs(got - expected).max()
        np.testing.assert_allclose(ours.affine, cli.affine, atol=1e-6)

    load = parser.get_parsed_content("preprocessing").transforms[0]
    with pytest.raises(InputDataError, match="liver"):
        load({"image": cases[0]["image"], "label": None})
