"""DICOM series in: the same volume as the NIfTI path, voxel for voxel, and clear errors for series that are not one
box-shaped CT volume.

Series are written from phantom volumes with SimpleITK (one file per slice, stored values = HU + 1024 with
RescaleIntercept -1024, files named against the slice order so that sorting by position is exercised).
"""

from __future__ import annotations

import json
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main as cli_main
from pipeline.common.dicom import list_series
from pipeline.common.io import load_case, read_ct, save_nifti
from pipeline.data.datasets import discover
from pipeline.data.phantom import make_phantom_case
from pipeline.data.prepare import prepare
from pipeline.data.settings import PrepareSettings
from pipeline.infer.settings import write_inference_settings
from pipeline.infer.volume import infer_volume
from tests.infer.test_inference import DarknessDetector, _bundle_with_random_weights
from transforms.errors import InputDataError

UID = "1.2.826.0.1.3680043.8.498.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_series(folder: Path, hu: np.ndarray, affine: np.ndarray, *, uid: str = UID, modality: str = "CT",
                 shift_mm_per_slice: float = 0.0, skip: tuple[int, ...] = (), tags: dict | None = None,
                 prefix: str = "IM") -> Path:
    """Write ``hu`` ``(X, Y, Z)`` (RAS ``affine``) as a DICOM series, one file per slice, into ``folder``.

    ``shift_mm_per_slice`` moves each slice sideways (a gantry tilt); ``skip`` leaves slices out (missing slices).
    GDCM's writer switches the process to the "C" locale (text files would then decode as ASCII): it is restored.
    """
    saved_locale = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_series(folder, hu, affine, uid, modality, shift_mm_per_slice, skip, tags or {}, prefix)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_series(folder: Path, hu: np.ndarray, affine: np.ndarray, uid: str, modality: str,
                  shift_mm_per_slice: float, skip: tuple[int, ...], tags: dict, prefix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = hu.shape[2]
    for z in range(n):
        if z in skip:
            continue
        image = sitk.GetImageFromArray(np.ascontiguousarray(hu[:, :, z].T.astype(np.int16))[None])  # (1, Y, X)
        position = lps[:3, :3] @ [0.0, 0.0, z] + lps[:3, 3] + [shift_mm_per_slice * z, 0.0, 0.0]
        image.SetOrigin(position.tolist())
        image.SetSpacing(spacing.tolist())
        image.SetDirection(direction.ravel().tolist())
        values = {
            "0008|0016": CT_STORAGE, "0008|0018": f"{uid}.{z + 1}", "0008|0060": modality,
            "0020|000d": f"{uid}.0", "0020|000e": uid, "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0020|0037": "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1])),
            "0028|0030": f"{spacing[1]:.10g}\\{spacing[0]:.10g}", "0018|0050": f"{spacing[2]:.10g}",
            "0028|1052": "-1024", "0028|1053": "1",
            **tags,
        }
        for key, value in values.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{n - z:04d}.dcm"))  # names run against the slice order
        writer.Execute(image)
    return folder


def canonical(volume) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine reoriented to RAS (axis order and direction only, no resampling)."""
    image = nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))
    return np.asarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_case(3, size=64, n_slices=12, n_lesions=1, lesion_kinds=("hypo",))


def affine_for(orientation: str, slice_mm: float) -> np.ndarray:
    """An affine of 0.8 x 0.75 x ``slice_mm`` mm; LPS: x and y reversed; RAS-flipped: slices stored top to bottom."""
    affine = np.diag([0.8, 0.75, slice_mm, 1.0])
    affine[:3, 3] = [-20.5, 31.25, -112.0]
    if orientation == "LPS":
        affine[:2, :2] *= -1.0
    elif orientation == "RAS-flipped":
        affine[2, 2] *= -1.0
    return affine


@pytest.mark.parametrize("slice_mm", [2.5, 1.0])
@pytest.mark.parametrize("orientation", ["RAS", "LPS", "RAS-flipped"])
def test_series_reads_as_the_nifti_voxel_for_voxel(phantom, tmp_path, orientation, slice_mm):
    affine = affine_for(orientation, slice_mm)
    nifti = read_ct(save_nifti(tmp_path / "ct.nii.gz", phantom.ct, affine))
    dicom = read_ct(write_series(tmp_path / "series", phantom.ct, affine))
    assert dicom.series_uid == UID and dicom.array.dtype == np.float32
    (a, affine_a), (b, affine_b) = canonical(nifti), canonical(dicom)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(affine_a, affine_b, atol=1e-4)
    assert dicom.array.min() < -900  # stored + 1024 with intercept -1024: HU, not raw values


def test_prepared_slices_from_dicom_equal_those_from_nifti(phantom, tmp_path):
    affine = affine_for("LPS", 2.5)
    save_nifti(tmp_path / "ct.nii.gz", phantom.ct, affine)
    save_nifti(tmp_path / "label.nii.gz", phantom.label, affine)
    write_series(tmp_path / "series", phantom.ct, affine)
    settings = PrepareSettings(size=64, field_mm=200.0)
    outputs = {}
    for name, ct in (("nifti", "ct.nii.gz"), ("dicom", "series")):
        datalist = tmp_path / f"{name}.json"
        datalist.write_text(json.dumps({"training": [{"image": ct, "label": "label.nii.gz", "case_id": "p"}]}))
        manifest = prepare(discover(datalist), tmp_path / name, settings, progress=False)
        assert not manifest["failures"]
        outputs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name / "cases" / "p").glob("*.npy"))}
    assert outputs["nifti"] and outputs["nifti"] == outputs["dicom"]
    info = json.loads((tmp_path / "dicom" / "cases" / "p" / "case.json").read_text())
    assert info["series_uid"] == UID and "series_uid" not in json.loads(
        (tmp_path / "nifti" / "cases" / "p" / "case.json").read_text())


def test_inference_on_a_series_writes_the_nifti_outputs_and_records_the_uid(phantom, tmp_path):
    affine = affine_for("RAS-flipped", 2.5)
    label = save_nifti(tmp_path / "label.nii.gz", phantom.label, affine)
    reports = {}
    for name, ct in (("nifti", save_nifti(tmp_path / "ct.nii.gz", phantom.ct, affine)),
                     ("dicom", write_series(tmp_path / "series", phantom.ct, affine))):
        reports[name] = infer_volume(ct, label, DarknessDetector(), liver_values=(1,), lesion_values=(2,),
                                     settings=PrepareSettings(size=64, field_mm=200.0), threshold=0.2,
                                     out_dir=tmp_path / name, case_id="p")
    assert reports["dicom"]["series_uid"] == UID and reports["nifti"]["series_uid"] is None
    maps = {name: nib.load(r["outputs"]["anomaly"]) for name, r in reports.items()}
    # the series is stored bottom-up by position; the heatmap is on the grid read from it, same world points
    a = nib.as_closest_canonical(maps["nifti"])
    b = nib.as_closest_canonical(maps["dicom"])
    np.testing.assert_allclose(np.asarray(b.dataobj), np.asarray(a.dataobj), atol=1e-6)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    assert reports["dicom"]["volume_score"] == pytest.approx(reports["nifti"]["volume_score"], abs=1e-6)


def test_a_folder_with_two_series_asks_for_one(phantom, tmp_path, capsys):
    affine = affine_for("RAS", 2.5)
    folder = write_series(tmp_path / "study", phantom.ct, affine)
    write_series(folder, phantom.ct, affine, uid=UID + ".2", tags={"0008|103e": "portal venous"}, prefix="PV")
    with pytest.raises(InputDataError, match="2 DICOM series") as info:
        read_ct(folder)
    assert UID + ".2" in str(info.value) and "portal venous" in str(info.value) and "--series-uid" in str(info.value)
    assert read_ct(folder, series_uid=UID + ".2").series_uid == UID + ".2"
    with pytest.raises(InputDataError, match="no series with UID '1.2.3'"):
        read_ct(folder, series_uid="1.2.3")
    # the CLI: --series-uid picks it, the report records it
    label = save_nifti(tmp_path / "label.nii.gz", phantom.label, affine)
    bundle = tmp_path / "bundle"
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8]}
    _bundle_with_random_weights(bundle, wrap=False, **tiny)
    write_inference_settings(bundle, 0.5, PrepareSettings(field_mm=300.0, size=32), "default", tiny)
    args = ["infer", "--image", str(folder), "--label", str(label), "--bundle", str(bundle)]
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 1
    assert "2 DICOM series" in capsys.readouterr().err
    assert cli_main([*args, "--series-uid", UID, "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "study_report.json").read_text())
    assert report["series_uid"] == UID


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "MR"}, "modality 'MR', not CT"),
        ({"shift_mm_per_slice": 1.5}, "gantry tilt"),
        ({"tags": {"0018|1120": "15"}}, "gantry tilt of 15 degrees"),
        ({"skip": (5,)}, "unevenly spaced or missing slices"),
    ],
)
def test_series_that_are_not_one_box_shaped_ct_are_refused(phantom, tmp_path, kwargs, message):
    folder = write_series(tmp_path / "series", phantom.ct, affine_for("RAS", 2.5), **kwargs)
    with pytest.raises(InputDataError, match=message) as info:
        read_ct(folder)
    assert str(folder) in str(info.value)


def test_mixed_sizes_duplicate_positions_and_single_slices_are_refused(phantom, tmp_path):
    affine = affine_for("RAS", 2.5)
    mixed = write_series(tmp_path / "mixed", phantom.ct, affine)
    write_series(tmp_path / "small", phantom.ct[:32], affine)
    (tmp_path / "small" / "IM0003.dcm").replace(mixed / "IM0003.dcm")
    with pytest.raises(InputDataError, match="mixes image sizes"):
        read_ct(mixed)
    twice = write_series(tmp_path / "twice", phantom.ct, affine)
    write_series(tmp_path / "copy", phantom.ct, affine, tags={"0008|0018": UID + ".99"})
    (tmp_path / "copy" / "IM0004.dcm").replace(twice / "IM9999.dcm")
    with pytest.raises(InputDataError, match="two slices at one position"):
        read_ct(twice)
    single = write_series(tmp_path / "single", phantom.ct[:, :, :1], affine)
    with pytest.raises(InputDataError, match="single slice"):
        read_ct(single)


def test_empty_folders_damaged_files_and_misplaced_uids_get_clear_errors(phantom, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputDataError, match="holds no DICOM series"):
        read_ct(tmp_path / "empty")
    affine = affine_for("RAS", 2.5)
    damaged = write_series(tmp_path / "damaged", phantom.ct, affine)
    victim = damaged / "IM0006.dcm"
    victim.write_bytes(victim.read_bytes()[:-2000])  # pixel data cut short: an interrupted copy
    with pytest.raises(InputDataError, match="missing slices") as info:
        read_ct(damaged)  # GDCM skips the unreadable file: a slice is missing, and the message names the file
    assert str(damaged) in str(info.value) and "IM0006.dcm" in str(info.value)
    nifti = save_nifti(tmp_path / "ct.nii.gz", phantom.ct, affine)
    with pytest.raises(InputDataError, match="NIfTI file, not a DICOM series"):
        read_ct(nifti, series_uid=UID)
    with pytest.raises(InputDataError, match="label maps are NIfTI files"):
        load_case(nifti, damaged, (1,))


def test_list_series_and_datalist_series_uid(phantom, tmp_path):
    affine = affine_for("RAS", 2.5)
    folder = write_series(tmp_path / "study", phantom.ct, affine)
    write_series(folder, phantom.ct, affine, uid=UID + ".2", prefix="PV")
    assert sorted(s.uid for s in list_series(folder)) == [UID, UID + ".2"]
    assert all(len(s.files) == phantom.ct.shape[2] for s in list_series(folder))
    save_nifti(tmp_path / "label.nii.gz", phantom.label, affine)
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps([{"image": "study", "label": "label.nii.gz", "series_uid": UID + ".2"}]))
    (record,) = discover(datalist)
    assert record.series_uid == UID + ".2" and record.to_json()["series_uid"] == UID + ".2"
    datalist.write_text(json.dumps([{"image": "study", "label": "label.nii.gz", "series_uid": 7}]))
    with pytest.raises(InputDataError, match="series_uid"):
        discover(datalist)


def test_one_line_infer_with_a_dicom_series_a_totalsegmentator_folder_and_the_default_bundle(
        phantom, tmp_path, monkeypatch, capsys):
    """``hepafair infer -i DICOM_DIR -l TOTALSEG_DIR -o OUT``, the bundle from $HEPAFAIR_BUNDLE."""
    affine = affine_for("LPS", 2.5)
    series = write_series(tmp_path / "ct", phantom.ct, affine)
    (tmp_path / "seg").mkdir()
    save_nifti(tmp_path / "seg" / "liver.nii.gz", (phantom.label > 0).astype(np.uint8), affine)
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8]}
    _bundle_with_random_weights(tmp_path / "bundle", wrap=False, **tiny)
    write_inference_settings(tmp_path / "bundle", 0.5, PrepareSettings(field_mm=300.0, size=32), "default", tiny)
    monkeypatch.setenv("HEPAFAIR_BUNDLE", str(tmp_path / "bundle"))
    assert cli_main(["infer", "-i", str(series), "-l", str(tmp_path / "seg"), "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "ct_report.json").read_text())
    assert report["series_uid"] == UID and report["label"].endswith("liver.nii.gz")
    assert nib.load(tmp_path / "out" / "ct_anomaly.nii.gz").shape == phantom.ct.shape
    # no bundle anywhere: a usage error that says how to get one
    monkeypatch.delenv("HEPAFAIR_BUNDLE")
    monkeypatch.setattr("pipeline.common.bundle.BUNDLE_DIR", tmp_path / "no_bundle_here")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["infer", "-i", str(series), "-l", str(tmp_path / "seg"), "-o", str(tmp_path / "out2")])
    assert exit_info.value.code == 2 and "no --bundle given" in capsys.readouterr().err
