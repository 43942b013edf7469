"""Tests of ``prepare`` (pipeline.data.prepare and ``python -m pipeline prepare``): manifest, slice files, case-level
splits, resuming, failures, a killed run, and the real IRCADb / TotalSegmentator data when present."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.datasets import discover
from pipeline.data.manifest import MANIFEST_FORMAT, SPLITS, load_manifest
from pipeline.data.phantom import write_phantom_cohort
from pipeline.data.prepare import prepare
from pipeline.data.settings import PrepareSettings
from tests.conftest import shared_path
from transforms.slicing import eligible_slices

N_CASES, SIZE, SLICES, OUT_SIZE = 6, 64, 12, 64
SETTINGS = PrepareSettings(size=OUT_SIZE)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six phantom volumes in the LiTS layout: volume-0..2 normal, volume-3..5 with lesions."""
    root = tmp_path_factory.mktemp("cohort")
    records = write_phantom_cohort(root, n_cases=N_CASES, size=SIZE, n_slices=SLICES)
    assert [r["has_lesion"] for r in records] == [False] * 3 + [True] * 3
    return root


@pytest.fixture(scope="module")
def prepared(cohort, tmp_path_factory) -> tuple[Path, dict]:
    """The cohort prepared once with default splits (read-only for the tests: copy before changing)."""
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare(discover(cohort), out, SETTINGS, progress=False)
    return out, manifest


def copy_of(prepared_out: Path, dest: Path) -> Path:
    """A private copy of a prepared folder, for tests that change it."""
    shutil.copytree(prepared_out, dest)
    return dest


def cli_prepare(data: Path, out: Path, *args: str) -> int:
    """Run ``python -m pipeline prepare`` in-process at the test slice size; return the exit code."""
    return main(["prepare", "--data", str(data), "--out", str(out), "--size", str(OUT_SIZE), *args])


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def with_corrupt_case(cohort: Path, dest: Path) -> Path:
    """The cohort (as links) plus ``volume-10``: a CT cut off halfway with a good label; sorts third by id."""
    dest.mkdir()
    for f in cohort.glob("*.nii.gz"):
        (dest / f.name).symlink_to(f)
    data = (cohort / "volume-3.nii.gz").read_bytes()
    (dest / "volume-10.nii.gz").write_bytes(data[: len(data) // 2])
    (dest / "segmentation-10.nii.gz").symlink_to(cohort / "segmentation-3.nii.gz")
    return dest


# -------------------------------------------------------------------------------------------------------- manifest


def test_manifest_structure(prepared, cohort):
    out, manifest = prepared
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["settings"] == SETTINGS.to_json()
    assert manifest["split_settings"] == {"val_fraction": 0.5, "seed": 0, "normal_from_abnormal": 0, "lesion_margin": 2}
    assert manifest["failures"] == []
    assert manifest["splits"]["training"] == ["volume-0", "volume-1", "volume-2"]
    assert sorted(manifest["splits"]["validation"] + manifest["splits"]["test"]) == ["volume-3", "volume-4", "volume-5"]
    assert len(manifest["splits"]["validation"]) == 2 and len(manifest["splits"]["test"]) == 1
    cases = {c["case_id"]: c for c in manifest["cases"]}
    assert sorted(cases) == [f"volume-{i}" for i in range(N_CASES)]
    for split in SPLITS:
        entries = manifest[split]
        assert {e["case_id"] for e in entries} == set(manifest["splits"][split])
        for e in entries:
            assert set(e) == {"image", "label", "case_id", "slice_index", "liver_area", "lesion_area", "has_lesion"}
            assert (out / e["image"]).is_file() and (out / e["label"]).is_file()
            assert e["image"] == f"cases/{e['case_id']}/s{e['slice_index']:04d}_image.npy"
        for case_id in manifest["splits"][split]:
            c = cases[case_id]
            assert c["split"] == split and c["dataset"] == "lits"
            assert c["slices_in_split"] == sum(e["case_id"] == case_id for e in entries)
            assert c["image"] == str(cohort / f"volume-{case_id[7:]}.nii.gz")
            info = json.loads((out / "cases" / case_id / "case.json").read_text())
            assert c["liver_slices"] == len(info["slices"]) == sum(v >= 1 for v in info["liver_voxels"])
            assert c["lesion_slices"] == sum(v > 0 for v in info["lesion_voxels"])
            assert c["has_lesion"] == (c["lesion_slices"] > 0)
    # load_manifest makes the slice paths absolute
    loaded = load_manifest(out)
    assert loaded["root"] == str(out)
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in loaded["validation"])


def test_slice_files(prepared):
    out, manifest = prepared
    n_lesion_pixels = 0
    for e in manifest["training"] + manifest["validation"] + manifest["test"]:
        image, label = np.load(out / e["image"]), np.load(out / e["label"])
        assert image.shape == label.shape == (1, OUT_SIZE, OUT_SIZE)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert set(np.unique(label)) <= {0, 1, 2} and (label >= 1).any()
        assert np.all(image[label == 0] == 0)  # zeroed outside the liver
        assert image[label >= 1].mean() > 0.3  # liver parenchyma (60-110 HU) sits mid-window
        if (label == 2).any():
            assert e["has_lesion"] == 1
        n_lesion_pixels += int((label == 2).sum())
        assert e["liver_area"] >= 1 and e["has_lesion"] == int(e["lesion_area"] > 0)
    assert n_lesion_pixels > 0


def test_case_level_splits(prepared):
    _, manifest = prepared
    seen = [c for split in SPLITS for c in manifest["splits"][split]]
    assert len(seen) == len(set(seen)) == N_CASES
    for split in SPLITS:
        others = {c for s in SPLITS if s != split for c in manifest["splits"][s]}
        assert not others & {e["case_id"] for e in manifest[split]}
    assert manifest["training"] and not any(e["has_lesion"] for e in manifest["training"])
    assert not any(c["has_lesion"] for c in manifest["cases"] if c["split"] == "training")


@pytest.mark.parametrize("margin", [0, 2])
def test_normal_from_abnormal_with_margin(cohort, prepared, tmp_path, margin):
    out = copy_of(prepared[0], tmp_path / "out")
    assert cli_prepare(cohort, out, "--normal-from-abnormal", "2", "--lesion-margin", str(margin)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    donors = [c["case_id"] for c in manifest["cases"] if c["split"] == "training" and c["has_lesion"]]
    assert len(donors) == 2
    n_kept = 0
    for donor in donors:
        info = json.loads((out / "cases" / donor / "case.json").read_text())
        lesion_z = np.nonzero(info["lesion_voxels"])[0]
        kept = [e["slice_index"] for e in manifest["training"] if e["case_id"] == donor]
        assert all(np.abs(lesion_z - z).min() > margin for z in kept)
        assert kept == eligible_slices(info["liver_voxels"], info["lesion_voxels"], 1, True, margin).tolist()
        n_kept += len(kept)
        assert donor not in manifest["splits"]["validation"] + manifest["splits"]["test"]
        assert not any(e["case_id"] == donor for e in manifest["validation"] + manifest["test"])
    assert n_kept > 0
    assert not any(e["has_lesion"] for e in manifest["training"])
    assert len(manifest["splits"]["validation"] + manifest["splits"]["test"]) == 1
    assert manifest["split_settings"]["normal_from_abnormal"] == 2
    assert manifest["split_settings"]["lesion_margin"] == margin


def test_explicit_split_cases(cohort, prepared, tmp_path, capsys):
    out = copy_of(prepared[0], tmp_path / "out")
    assert cli_prepare(cohort, out, "--val-cases", "volume-0", "volume-4", "--test-cases", "volume-3", "volume-5") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {
        "training": ["volume-1", "volume-2"],
        "validation": ["volume-0", "volume-4"],
        "test": ["volume-3", "volume-5"],
    }
    # every slice of an evaluated case is listed, normal or not
    assert sum(e["case_id"] == "volume-0" for e in manifest["validation"]) == SLICES
    capsys.readouterr()
    # a misspelt case is refused before any work, not after
    empty = tmp_path / "empty"
    assert cli_prepare(cohort, empty, "--val-cases", "volume-9") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "volume-9" in err and "known: volume-0" in err
    assert not (empty / "cases").exists() or not any((empty / "cases").iterdir())
    assert cli_prepare(cohort, empty, "--val-cases", "volume-3", "--test-cases", "volume-3") == 2
    assert "named for both" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- resuming, failures


def test_rerun_skips_finished_cases_and_rebuilds_on_new_settings(cohort, prepared, tmp_path):
    out = copy_of(prepared[0], tmp_path / "out")
    case_files = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()}
    old_ns = time.time_ns()
    manifest = prepare(discover(cohort), out, SETTINGS, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()} == case_files
    assert manifest == prepared[1]

    # a changed setting rebuilds every case
    prepare(discover(cohort), out, PrepareSettings(size=32), progress=False)
    for case_dir in (out / "cases").iterdir():
        info = json.loads((case_dir / "case.json").read_text())
        assert info["settings"]["size"] == 32
        assert (case_dir / "case.json").stat().st_mtime_ns >= old_ns
        assert np.load(case_dir / "s0000_image.npy").shape == (1, 32, 32)
    assert sorted(p.name for p in (out / "cases").iterdir()) == [f"volume-{i}" for i in range(N_CASES)]

    # a changed label convention (the source record) rebuilds too
    before = (out / "cases" / "volume-0" / "case.json").stat().st_mtime_ns
    prepare(discover(cohort, lesion_values=[2, 3]), out, PrepareSettings(size=32), progress=False)
    info = json.loads((out / "cases" / "volume-0" / "case.json").read_text())
    assert info["source"]["lesion_values"] == [2, 3]
    assert (out / "cases" / "volume-0" / "case.json").stat().st_mtime_ns > before


def test_leftovers_of_a_killed_run_are_removed(cohort, prepared, tmp_path):
    out = copy_of(prepared[0], tmp_path / "out")
    (out / "cases" / ".volume-1.tmp-99999").mkdir()
    (out / "cases" / ".volume-1.tmp-99999" / "s0000_image.npy").write_bytes(b"partial")
    shutil.copytree(out / "cases" / "volume-2", out / "cases" / ".volume-2.old-99999")
    (out / ".tmp-0123456789ab-manifest.json").write_text('{"partial": ')
    prepare(discover(cohort), out, SETTINGS, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["cases", "manifest.json"]
    assert sorted(p.name for p in (out / "cases").iterdir()) == [f"volume-{i}" for i in range(N_CASES)]


def test_a_corrupt_volume_is_recorded_and_the_others_are_done(cohort, tmp_path, capsys):
    data = with_corrupt_case(cohort, tmp_path / "data")
    out = tmp_path / "out"
    assert cli_prepare(data, out) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines[-1] == f"prepare: 1 of {N_CASES + 1} cases failed: volume-10"
    assert sum(line.startswith("prepare: ") and "failed" in line for line in err_lines) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["case_id"] for f in manifest["failures"]] == ["volume-10"]
    failure = manifest["failures"][0]
    assert failure["image"] == str(data / "volume-10.nii.gz")
    assert str(data / "volume-10.nii.gz") in failure["error"] and "gzip" in failure["error"]
    assert sorted(c["case_id"] for c in manifest["cases"]) == [f"volume-{i}" for i in range(N_CASES)]
    assert sorted(p.name for p in (out / "cases").iterdir()) == [f"volume-{i}" for i in range(N_CASES)]

    # naming the failed case for a split does not lose the manifest of the good ones
    assert cli_prepare(data, out, "--test-cases", "volume-10", "volume-3") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert "volume-3" in manifest["splits"]["test"] and len(manifest["cases"]) == N_CASES
    assert [f["case_id"] for f in manifest["failures"]] == ["volume-10"]


def test_strict_stops_at_the_first_bad_case(cohort, tmp_path, capsys):
    data = with_corrupt_case(cohort, tmp_path / "data")
    out = tmp_path / "out"
    assert cli_prepare(data, out, "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(data / "volume-10.nii.gz") in err[-1]
    # volume-0 and volume-1 sort before volume-10; nothing after it was started and no manifest was written
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["volume-0", "volume-1"]
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_files(cohort, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "pipeline", "prepare", "--data", str(cohort), "--out", str(killed)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "cases" / "volume-0").exists():
            assert proc.poll() is None, "prepare ended before the first case folder was seen"
            assert time.monotonic() < deadline, "no case folder appeared within 120 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()
    assert len(list((killed / "cases").iterdir())) < N_CASES + 1  # cut short (a .tmp folder may be among them)

    assert main(["prepare", "--data", str(cohort), "--out", str(killed)]) == 0
    assert main(["prepare", "--data", str(cohort), "--out", str(clean)]) == 0
    resumed, reference = files_under(killed), files_under(clean)
    assert sorted(resumed) == sorted(reference)
    for name, content in reference.items():
        assert resumed[name] == content, name
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name or ".old" in p.name]


# ------------------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def ircadb_manifest(tmp_path_factory) -> dict:
    """IRCADb patients 7 and 17 prepared once for the session (native slice counts do not depend on the size)."""
    root = shared_path("ircadb")
    out = tmp_path_factory.mktemp("ircadb")
    return prepare(discover(root), out, PrepareSettings(size=64, min_liver_area=1), progress=False)


@pytest.mark.slow
@pytest.mark.shared_data
def test_ircadb_slice_counts(ircadb_manifest):
    cases = {c["case_id"]: c for c in ircadb_manifest["cases"]}
    assert ircadb_manifest["failures"] == []
    assert (cases["ircadb_p7"]["liver_slices"], cases["ircadb_p7"]["lesion_slices"]) == (98, 0)
    assert (cases["ircadb_p17"]["liver_slices"], cases["ircadb_p17"]["lesion_slices"]) == (113, 36)
    assert cases["ircadb_p7"]["split"] == "training" and cases["ircadb_p17"]["split"] == "validation"
    assert len(ircadb_manifest["training"]) == 98 and len(ircadb_manifest["validation"]) == 113


@pytest.mark.shared_data
def test_totalsegmentator_fixture_with_its_preset(tmp_path):
    ct = shared_path("totalsegmentator", "example_ct_sm.nii.gz")
    seg = shared_path("totalsegmentator", "example_seg.nii.gz")
    datalist = tmp_path / "totalseg.json"
    entry = {"image": str(ct), "label": str(seg), "label_preset": "totalsegmentator"}
    datalist.write_text(json.dumps({"training": [entry]}))
    manifest = prepare(discover(datalist), tmp_path / "out", PrepareSettings(size=OUT_SIZE), progress=False)
    assert manifest["failures"] == []
    (case,) = manifest["cases"]
    assert case["case_id"] == "example_ct_sm" and case["split"] == "training" and not case["has_lesion"]
    assert case["liver_slices"] > 0 and len(manifest["training"]) == case["liver_slices"]
    label = np.load(tmp_path / "out" / manifest["training"][0]["label"])
    assert set(np.unique(label)) == {0, 1}


def test_liver_reference_hu_makes_slices_invariant_to_a_global_hu_offset(cohort, tmp_path, capsys):
    """Per-volume normalisation: the same volume scanned 40 HU brighter prepares to the same slices."""
    import nibabel as nib

    original, brighter = tmp_path / "original", tmp_path / "brighter"
    for folder in (original, brighter):
        folder.mkdir()
        shutil.copy(cohort / "segmentation-3.nii.gz", folder / "segmentation-3.nii.gz")
    shutil.copy(cohort / "volume-3.nii.gz", original / "volume-3.nii.gz")
    ct = nib.load(cohort / "volume-3.nii.gz")
    data = np.asarray(ct.dataobj, dtype=np.int16) + np.int16(40)
    nib.save(nib.Nifti1Image(data, ct.affine), brighter / "volume-3.nii.gz")

    def slices(data_dir: Path, settings: PrepareSettings) -> tuple[np.ndarray, dict]:
        out = tmp_path / f"out-{data_dir.name}-{settings.liver_reference_hu}"
        records = [r for r in discover(data_dir) if r.case_id == "volume-3"]
        prepare(records, out, settings, progress=False)
        info = json.loads((out / "cases" / "volume-3" / "case.json").read_text())
        return np.stack([np.load(p) for p in sorted((out / "cases" / "volume-3").glob("*_image.npy"))]), info

    normalised = PrepareSettings(size=OUT_SIZE, liver_reference_hu=100.0)
    a, info_a = slices(original, normalised)
    b, info_b = slices(brighter, normalised)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert info_b["liver_median_shift_hu"] == pytest.approx(info_a["liver_median_shift_hu"] - 40.0)
    assert info_a["settings"]["liver_reference_hu"] == 100.0
    from pipeline.infer.settings import prepare_settings_from_json  # inference rebuilds the same preprocessing

    assert prepare_settings_from_json(info_a["settings"]) == normalised
    plain = PrepareSettings(size=OUT_SIZE, liver_reference_hu=None)
    plain_a, info_plain = slices(original, plain)
    plain_b, _ = slices(brighter, plain)
    assert np.abs(plain_a - plain_b).max() > 0.05  # without it, 40 HU is 0.09 of the window
    assert info_plain["settings"]["liver_reference_hu"] is None and "liver_median_shift_hu" not in info_plain
    assert SETTINGS.liver_reference_hu == 100.0  # on by default
    # settings recorded before the option existed (or before it was the default) mean: no shift
    legacy = {k: v for k, v in info_plain["settings"].items() if k != "liver_reference_hu"}
    assert prepare_settings_from_json(legacy) == plain
    assert main(["prepare", "--data", str(original), "--out", str(tmp_path / "off"), "--size", str(OUT_SIZE),
                 "--liver-reference-hu", "off"]) == 0
    assert json.loads((tmp_path / "off" / "manifest.json").read_text())["settings"]["liver_reference_hu"] is None
    bad = ["prepare", "--data", str(original), "--out", str(tmp_path / "bad"), "--liver-reference-hu"]
    assert main([*bad, "5000"]) == 2  # out of range: PrepareSettings refuses it before any volume is read
    assert "liver_reference_hu" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for text in ("nan", "bright"):  # not a finite number: the flag refuses it
        with pytest.raises(SystemExit):
            main([*bad, text])


def test_min_liver_area_filters_the_splits_not_the_stored_slices(cohort, prepared, tmp_path):
    """``--min-liver-area`` drops small liver slices from every split, but each case keeps all its liver slices on
    disk, so a 2.5D slice's neighbours are the same liver slices inference takes from the volume."""
    out_all, manifest_all = prepared
    areas = sorted({s["liver_area"] for split in SPLITS for s in manifest_all[split]})
    threshold = areas[len(areas) // 2]
    manifest = prepare(discover(cohort), tmp_path / "out", PrepareSettings(size=OUT_SIZE, min_liver_area=threshold),
                       progress=False)
    for split in SPLITS:
        kept = [(s["case_id"], s["slice_index"]) for s in manifest[split]]
        expected = [(s["case_id"], s["slice_index"]) for s in manifest_all[split] if s["liver_area"] >= threshold]
        assert kept == expected and all(s["liver_area"] >= threshold for s in manifest[split])
    assert sum(len(manifest[s]) for s in SPLITS) < sum(len(manifest_all[s]) for s in SPLITS)
    for case in manifest["cases"]:
        info = json.loads((tmp_path / "out" / "cases" / case["case_id"] / "case.json").read_text())
        stored = [s["slice_index"] for s in info["slices"]]
        assert stored == np.flatnonzero(np.asarray(info["liver_voxels"]) > 0).tolist()
        assert all((tmp_path / "out" / "cases" / case["case_id"] / f"s{z:04d}_image.npy").is_file() for z in stored)


def test_a_case_folder_of_the_older_layout_is_rebuilt(cohort, prepared, tmp_path):
    """Folders written before every liver slice was stored (no ``layout`` in case.json) are not taken as current."""
    out = copy_of(prepared[0], tmp_path / "out")
    case_json = out / "cases" / "volume-0" / "case.json"
    info = json.loads(case_json.read_text())
    del info["layout"]
    case_json.write_text(json.dumps(info))
    prepare(discover(cohort), out, SETTINGS, progress=False)
    assert json.loads(case_json.read_text())["layout"] == 2
