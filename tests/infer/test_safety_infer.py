"""Safety of `infer` (and of reading volumes, which `prepare` shares): outputs stay inside --out and never replace an
input, resource limits hold before decoding, and every bad setting is one clear error (issue: safety, items 1, 2,
5, 6, 8 and 9). Each row runs the real command line, ``python -m pipeline infer``, in-process."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from networks.detector import FrequencyAwareDetector
from pipeline.cli import main as cli_main
from pipeline.common.files import atomic_write_json
from pipeline.common.io import read_ct, save_nifti
from pipeline.data.phantom import make_phantom_case
from pipeline.data.settings import PrepareSettings
from pipeline.infer.settings import write_inference_settings
from transforms.errors import InputDataError

SETTINGS = PrepareSettings(size=32)


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_case(1, size=48, n_slices=6, n_lesions=1, lesion_kinds=("hypo",))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle root as training leaves it (random default-preset weights, inference.json at 32 px)."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(FrequencyAwareDetector.from_preset("default", output="anomaly_map").state_dict(),
               root / "models" / "model.pt")
    write_inference_settings(root, 0.5, SETTINGS, "default")
    return root


def write(folder: Path, name: str, array: np.ndarray, affine: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_nifti(folder / name, array, affine)


def infer(bundle: Path, *args: str) -> int:
    return cli_main(["infer", "--bundle", str(bundle), *args])


def victim(tmp_path: Path) -> Path:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


# ----------------------------------------------------------------------------------- items 1 and 2: data loss


@pytest.mark.parametrize("case_id", ["{victim}/x", "../victim/x", "../../victim", "..", "a/b"])
def test_datalist_case_id_cannot_write_outside_out(case_id, phantom, bundle, tmp_path, capsys):
    target = victim(tmp_path)
    image = write(tmp_path / "in", "ct.nii.gz", phantom.ct, phantom.affine)
    label = write(tmp_path / "in", "seg.nii.gz", phantom.label, phantom.affine)
    datalist = tmp_path / "in" / "list.json"
    datalist.write_text(json.dumps([{"image": str(image), "label": str(label),
                                     "case_id": case_id.replace("{victim}", str(target))}]))
    out = tmp_path / "out"
    assert infer(bundle, "--data", str(datalist), "--out", str(out)) == 2
    assert "case_id" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["precious.txt"]
    assert not out.exists() or not any(out.iterdir())


def test_image_names_become_safe_output_names(phantom, bundle, tmp_path):
    image = write(tmp_path / "in", "..odd name;x_ct.nii.gz", phantom.ct, phantom.affine)
    label = write(tmp_path / "in", "seg.nii.gz", phantom.label, phantom.affine)
    out = tmp_path / "out"
    assert infer(bundle, "--image", str(image), "--label", str(label), "--out", str(out)) == 0
    assert (out / "odd_name_x_anomaly.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


# (which input of case y the output of case x would be, file name of case x's image)
COLLISIONS = [
    ("label", "x_anomaly.nii.gz"),
    ("label", "x_lesions.nii.gz"),
    ("image", "x_anomaly.nii.gz"),
]


@pytest.mark.parametrize("which, clash_name", COLLISIONS)
def test_overwrite_never_replaces_another_cases_input(which, clash_name, phantom, bundle, tmp_path, capsys):
    """Case x's outputs go to OUT/x_*; case y's input lives in OUT under such a name: the batch is refused before
    anything is written, even with --overwrite."""
    out = tmp_path / "out"
    x_image = write(tmp_path / "in", "x_ct.nii.gz", phantom.ct, phantom.affine)
    x_label = write(tmp_path / "in", "x_seg.nii.gz", phantom.label, phantom.affine)
    y_image = write(out if which == "image" else tmp_path / "in", clash_name if which == "image" else "y_ct.nii.gz",
                    phantom.ct, phantom.affine)
    y_label = write(out if which == "label" else tmp_path / "in", clash_name if which == "label" else "y_seg.nii.gz",
                    phantom.label, phantom.affine)
    before = digest(y_image, y_label)
    args = ["--image", str(x_image), "--label", str(x_label), "--image", str(y_image), "--label", str(y_label)]
    code = infer(bundle, *args, "--out", str(out), "--overwrite")
    assert code == 2
    assert "would replace an input file of case" in capsys.readouterr().err
    assert digest(y_image, y_label) == before
    assert sorted(p.name for p in out.iterdir()) == [clash_name], "nothing may be written when the plan collides"


# ------------------------------------------------------------------------------------ items 5 and 6: bounds


@pytest.mark.parametrize("spacing, message", [
    ((0.01, 0.01, 2.0), "implausible voxel spacing"),
    ((0.0008, 0.0008, 0.002), "implausible voxel spacing"),  # stored in metres
    ((0.8, 0.8, 50.0), "implausible voxel spacing"),
])
def test_implausible_spacing_is_a_recorded_failure_and_the_batch_goes_on(spacing, message, phantom, bundle, tmp_path):
    affine = np.diag([*spacing, 1.0])
    bad_image = write(tmp_path / "in", "bad_ct.nii.gz", phantom.ct, affine)
    bad_label = write(tmp_path / "in", "bad_seg.nii.gz", phantom.label, affine)
    good_image = write(tmp_path / "in", "good_ct.nii.gz", phantom.ct, phantom.affine)
    good_label = write(tmp_path / "in", "good_seg.nii.gz", phantom.label, phantom.affine)
    out = tmp_path / "out"
    code = infer(bundle, "--image", str(bad_image), "--label", str(bad_label), "--image", str(good_image),
                 "--label", str(good_label), "--out", str(out))
    assert code == 1
    summary = json.loads((out / "inference_summary.json").read_text())
    rows = {row["case_id"]: row for row in summary["cases"]}
    assert rows["bad"]["status"] == "failed" and message in rows["bad"]["error"]
    assert rows["good"]["status"] == "ok"


def test_spacing_limits_can_be_raised(phantom, tmp_path, monkeypatch):
    path = write(tmp_path, "ct.nii.gz", phantom.ct, np.diag([0.8, 0.8, 50.0, 1.0]))
    with pytest.raises(InputDataError, match="HEPAFAIR_SPACING_RANGE_MM"):
        read_ct(path)
    monkeypatch.setenv("HEPAFAIR_SPACING_RANGE_MM", "0.1,60")
    assert read_ct(path).spacing[2] == pytest.approx(50.0)


def bomb(path: Path, shape: tuple[int, int, int]) -> Path:
    """A .nii.gz whose header declares ``shape`` int16 but holds only a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_sform(np.eye(4), code=1)
    raw = header.binaryblock + b"\x00" * (int(header["vox_offset"]) - 348) + b"\x00" * 4096
    path.write_bytes(gzip.compress(raw))
    return path


def test_voxel_count_is_capped_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = bomb(tmp_path / "bomb.nii.gz", (4096, 4096, 4096))
    with pytest.raises(InputDataError) as info:
        read_ct(path)
    assert "4096 x 4096 x 4096" in info.value.problem and "HEPAFAIR_MAX_VOXELS" in info.value.fix
    monkeypatch.setenv("HEPAFAIR_MAX_VOXELS", "1000")
    small = bomb(tmp_path / "small.nii.gz", (16, 16, 8))  # 2048 voxels: over a limit of 1000
    with pytest.raises(InputDataError, match="above the limit of 1,000 voxels"):
        read_ct(small)


def test_fine_grid_liver_roi_is_resampled_in_bounded_blocks(monkeypatch):
    """A legal but fine grid (0.1 mm pixels: a 300 mm field is 3000 pixels) is cut into slice blocks of at most
    ROI_BLOCK_BYTES; the result equals the one-block result."""
    import transforms.roi as roi

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 40, 40, 5)).astype(np.float32))
    label = torch.zeros((1, 40, 40, 5), dtype=torch.uint8)
    label[0, 10:30, 12:28] = 1
    label[0, 15:20, 15:20, 2] = 2
    transform = roi.LiverROI(field_mm=30.0, size=16)
    whole = transform(image, label, spacing=(0.5, 0.5))
    monkeypatch.setattr(roi, "ROI_BLOCK_BYTES", 3 * 60 * 60 * 4 * 2)  # two slices per block
    blocks = transform(image, label, spacing=(0.5, 0.5))
    for a, b in zip(whole[:3], blocks[:3]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- items 8 and 9: clear errors


@pytest.mark.parametrize("field, value, message", [
    ("threshold", math.nan, "threshold must be null or a number in [0, 1]"),
    ("threshold", "abc", "threshold must be null or a number in [0, 1]"),
    ("threshold", 5, "threshold must be null or a number in [0, 1]"),
    ("width_preset", "huge", "width_preset must be one of"),
    ("preset", "huge", "width_preset must be one of"),  # the key bundles trained before the rename wrote
    ("network", {"bogus_key": 1}, "network has unknown keys ['bogus_key']"),
    ("prepare_settings", {"size": 0}, "size must be an integer number of pixels"),
    ("prepare_settings", {"size": "128"}, "size must be an integer number of pixels"),
    ("prepare_settings", {"hu_window": [250, -200]}, "hu_window must be two finite numbers MIN < MAX"),
    ("prepare_settings", {"orientation": "XYZ"}, "orientation must be three axis codes"),
])
def test_bad_inference_json_is_one_clear_error(field, value, message, phantom, bundle, tmp_path, capsys):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes((bundle / "models" / "model.pt").read_bytes())
    settings = json.loads((bundle / "models" / "inference.json").read_text())
    if field == "preset":  # an older inference.json: only the old key
        del settings["width_preset"]
    settings[field] = value
    (root / "models" / "inference.json").write_text(json.dumps(settings))  # json allows NaN, as a hand edit might
    image = write(tmp_path / "in", "ct.nii.gz", phantom.ct, phantom.affine)
    label = write(tmp_path / "in", "seg.nii.gz", phantom.label, phantom.affine)
    assert infer(root, "--image", str(image), "--label", str(label), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert message in err and "inference.json" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"), ("--batch-size", "x"), ("--threshold", "nan"), ("--threshold", "5"),
    ("--threshold", "abc"), ("--size", "0"), ("--size", "12"), ("--field-mm", "-3"), ("--min-lesion-mm3", "-1"),
])
def test_bad_numbers_on_the_command_line_are_usage_errors(flag, value, phantom, bundle, tmp_path, capsys):
    image = write(tmp_path / "in", "ct.nii.gz", phantom.ct, phantom.affine)
    label = write(tmp_path / "in", "seg.nii.gz", phantom.label, phantom.affine)
    with pytest.raises(SystemExit) as info:
        infer(bundle, "--image", str(image), "--label", str(label), "--out", str(tmp_path / "out"), flag, value)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reports_are_strict_json(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [np.float32("inf"), 1.5]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}


@pytest.mark.parametrize("transform, message", [
    (lambda ct: (ct + 1024).astype(np.uint16), "stored values without the -1024 rescale intercept"),
    (lambda ct: np.full_like(ct, -1024), "a blank volume without anatomy"),
    (lambda ct: ct + 700, "outside the -100 to 300 HU of a liver"),
])
def test_ct_not_in_hounsfield_units_is_named(transform, message, phantom, bundle, tmp_path, capsys):
    ct = transform(phantom.ct.astype(np.int16))
    image = write(tmp_path / "in", "ct.nii.gz", ct, phantom.affine)
    label = write(tmp_path / "in", "seg.nii.gz", phantom.label, phantom.affine)
    out = tmp_path / "out"
    assert infer(bundle, "--image", str(image), "--label", str(label), "--out", str(out)) == 1
    summary = json.loads((out / "inference_summary.json").read_text())
    assert message in summary["cases"][0]["error"], summary["cases"][0]["error"]
