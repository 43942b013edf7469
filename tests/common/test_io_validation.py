# Bad-input table: 37 rows in BAD_INPUTS (2 skip when running as root: unreadable file, non-writable folder).
"""Tests for pipeline.common.io and its helpers (files, grids, case_ids): every bad input is refused with an
InputDataError naming the file; good input loads."""

from __future__ import annotations

import gzip
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms import Orientationd

from pipeline.common.case_ids import read_case_ids_unique
from pipeline.common.files import atomic_write, atomic_write_bytes, atomic_write_json, ensure_output_dir
from pipeline.common.grids import check_liver_present, check_same_grid
from pipeline.common.io import load_case, read_ct, read_label, save_nifti
from pipeline.common.volume import Volume
from tests.conftest import shared_path
from transforms.errors import InputDataError

SHAPE = (8, 8, 4)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
# NIfTI-1 header byte offsets (little-endian files written by nibabel)
PIXDIM_OFFSET = 76
DATATYPE_OFFSET = 70
SROW_X_OFFSET = 280
SROW_Z_OFFSET = 312
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _ct_array(seed: int = 0) -> np.ndarray:
    """Plausible HU: air, fat and soft tissue."""
    values = np.random.default_rng(seed).choice([-1000, -90, 40, 60, 300], size=SHAPE)
    return values.astype(np.int16)


def _label_array() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 2:6, 1:3] = 1
    label[3, 3, 1] = 2
    return label


def _write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write with nibabel itself, independently of the code under test."""
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _patch(path: Path, offset: int, fmt: str, *values: float) -> Path:
    """Overwrite header bytes of an uncompressed .nii in place, bypassing nibabel's header fixes."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))
    return path


def _rotation_z(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return affine @ AFFINE


def _ct_file(tmp: Path, array: np.ndarray, name: str = "ct.nii.gz", affine: np.ndarray = AFFINE) -> Path:
    return _write(tmp / name, array, affine)


def _pair(tmp: Path) -> tuple[Path, Path]:
    return _ct_file(tmp, _ct_array()), _write(tmp / "seg.nii.gz", _label_array())


# Each row builds its bad input under tmp and returns (the call that must fail, file names the message must contain,
# a keyword of the problem the message must contain).
Row = tuple[Callable[[], object], tuple[str, ...], str]


def row_missing(tmp: Path) -> Row:
    return lambda: read_ct(tmp / "missing.nii.gz"), ("missing.nii.gz",), "not found"


def row_folder(tmp: Path) -> Row:
    (tmp / "series.nii.gz").mkdir()
    return lambda: read_ct(tmp / "series.nii.gz"), ("series.nii.gz",), "folder"


def row_unreadable(tmp: Path) -> Row:
    if IS_ROOT:
        pytest.skip("root can read any file, so permissions cannot make one unreadable")
    path = _ct_file(tmp, _ct_array())
    path.chmod(0)
    return lambda: read_ct(path), ("ct.nii.gz",), "permission"


def row_png_renamed(tmp: Path) -> Row:
    image = sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    sitk.WriteImage(image, str(tmp / "slice.png"))
    path = (tmp / "slice.png").rename(tmp / "slice.nii.gz")
    return lambda: read_ct(path), ("slice.nii.gz",), "PNG"


def row_text_renamed(tmp: Path) -> Row:
    path = tmp / "notes.nii.gz"
    path.write_text("patient 17, liver CT, see DICOM folder\n" * 20)
    return lambda: read_ct(path), ("notes.nii.gz",), "text"


def row_empty_file(tmp: Path) -> Row:
    path = tmp / "empty.nii"
    path.write_bytes(b"")
    return lambda: read_label(path), ("empty.nii",), "empty"


def row_wrong_extension(tmp: Path) -> Row:
    path = _write(tmp / "ct.nii.gz", _ct_array()).rename(tmp / "ct.mha")
    return lambda: read_ct(path), ("ct.mha",), ".nii"


def row_truncated_gzip(tmp: Path) -> Row:
    path = _ct_file(tmp, _ct_array())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return lambda: read_ct(path), ("ct.nii.gz",), "truncated"


def row_truncated_data(tmp: Path) -> Row:
    path = _write(tmp / "ct.nii", _ct_array())
    path.write_bytes(path.read_bytes()[:-40])
    return lambda: read_ct(path), ("ct.nii",), "truncated"


def row_corrupt_header(tmp: Path) -> Row:
    path = _patch(_write(tmp / "ct.nii", _ct_array()), DATATYPE_OFFSET, "<h", 999)
    return lambda: read_ct(path), ("ct.nii",), "corrupt"


def row_2d(tmp: Path) -> Row:
    path = _write(tmp / "slice.nii.gz", _ct_array()[:, :, 0])
    return lambda: read_ct(path), ("slice.nii.gz",), "2D"


def row_4d_series(tmp: Path) -> Row:
    path = _write(tmp / "series.nii.gz", np.stack([_ct_array(0), _ct_array(1)], axis=-1))
    return lambda: read_ct(path), ("series.nii.gz",), "split"


def row_5d_vector(tmp: Path) -> Row:
    path = _write(tmp / "field.nii.gz", np.zeros((*SHAPE, 1, 3), np.float32))
    return lambda: read_ct(path), ("field.nii.gz",), "5D"


def row_zero_spacing(tmp: Path) -> Row:
    path = _patch(_write(tmp / "ct.nii", _ct_array()), PIXDIM_OFFSET + 3 * 4, "<f", 0.0)
    return lambda: read_ct(path), ("ct.nii",), "zero voxel spacing"


def row_negative_spacing(tmp: Path) -> Row:
    path = _patch(_write(tmp / "ct.nii", _ct_array()), PIXDIM_OFFSET + 1 * 4, "<f", -0.8)
    return lambda: read_ct(path), ("ct.nii",), "negative voxel spacing"


def row_nan_spacing(tmp: Path) -> Row:
    path = _patch(_write(tmp / "seg.nii", _label_array()), PIXDIM_OFFSET + 2 * 4, "<f", float("nan"))
    return lambda: read_label(path), ("seg.nii",), "NaN/Inf voxel spacing"


def row_singular_affine(tmp: Path) -> Row:
    path = _patch(_write(tmp / "ct.nii", _ct_array()), SROW_Z_OFFSET, "<4f", 0.0, 0.0, 0.0, 0.0)
    return lambda: read_ct(path), ("ct.nii",), "singular"


def row_non_finite_affine(tmp: Path) -> Row:
    path = _patch(_write(tmp / "seg.nii", _label_array()), SROW_X_OFFSET, "<f", float("inf"))
    return lambda: read_label(path), ("seg.nii",), "non-finite"


def row_oblique_10_degrees(tmp: Path) -> Row:
    path = _ct_file(tmp, _ct_array(), affine=_rotation_z(10.0))
    return lambda: read_ct(path), ("ct.nii.gz",), "oblique"


def row_ct_nan(tmp: Path) -> Row:
    array = _ct_array().astype(np.float32)
    array[1, 2, 3] = np.nan
    path = _ct_file(tmp, array)
    return lambda: read_ct(path, check_hu=False), ("ct.nii.gz",), "NaN"


def row_ct_inf(tmp: Path) -> Row:
    array = _ct_array().astype(np.float32)
    array[0, 0, 0] = np.inf
    path = _ct_file(tmp, array)
    return lambda: read_ct(path), ("ct.nii.gz",), "Inf"


def row_ct_uint8(tmp: Path) -> Row:
    path = _ct_file(tmp, np.random.default_rng(0).integers(0, 256, SHAPE).astype(np.uint8))
    return lambda: read_ct(path), ("ct.nii.gz",), "too small"


def row_ct_normalised(tmp: Path) -> Row:
    path = _ct_file(tmp, np.random.default_rng(0).random(SHAPE).astype(np.float32))
    return lambda: read_ct(path), ("ct.nii.gz",), "normalised"


def row_ct_raw_without_slope(tmp: Path) -> Row:
    path = _ct_file(tmp, np.random.default_rng(0).integers(0, 4096, SHAPE).astype(np.uint16))
    return lambda: read_ct(path), ("ct.nii.gz",), "rescale slope"


def row_ct_raw_with_padding(tmp: Path) -> Row:
    # air stored as 24 instead of -1000 but with negative padding: caught by the median, not by the minimum
    array = (_ct_array().astype(np.int16) + 1024).clip(0, None)
    array[0] = -2000
    path = _ct_file(tmp, array)
    return lambda: read_ct(path), ("ct.nii.gz",), "rescale slope"


def row_ct_far_out_of_range(tmp: Path) -> Row:
    path = _ct_file(tmp, _ct_array().astype(np.float32) * 1000)
    return lambda: read_ct(path), ("ct.nii.gz",), "far outside"


def row_label_fractions(tmp: Path) -> Row:
    path = _write(tmp / "seg.nii.gz", _label_array().astype(np.float32) * 0.5)
    return lambda: read_label(path), ("seg.nii.gz",), "fractional"


def row_label_negative(tmp: Path) -> Row:
    path = _write(tmp / "seg.nii.gz", _label_array().astype(np.int16) - 1)
    return lambda: read_label(path), ("seg.nii.gz",), "negative"


def row_label_nan(tmp: Path) -> Row:
    array = _label_array().astype(np.float32)
    array[4, 4, 2] = np.nan
    path = _write(tmp / "seg.nii.gz", array)
    return lambda: read_label(path), ("seg.nii.gz",), "NaN"


def row_shape_mismatch(tmp: Path) -> Row:
    image_path = _ct_file(tmp, _ct_array())
    label_path = _write(tmp / "seg.nii.gz", _label_array()[:, :, :3])
    return lambda: load_case(image_path, label_path, [1]), ("ct.nii.gz", "seg.nii.gz"), "shape"


def row_affine_mismatch(tmp: Path) -> Row:
    shifted = AFFINE.copy()
    shifted[0, 3] = 1.5
    image_path = _ct_file(tmp, _ct_array())
    label_path = _write(tmp / "seg.nii.gz", _label_array(), shifted)
    return lambda: load_case(image_path, label_path, [1]), ("ct.nii.gz", "seg.nii.gz"), "1.5 mm"


def row_no_liver_value(tmp: Path) -> Row:
    image_path, label_path = _pair(tmp)
    return lambda: load_case(image_path, label_path, [5], [6]), ("seg.nii.gz",), "--liver-values"


def row_duplicate_case_ids(tmp: Path) -> Row:
    paths = [tmp / "a" / "case_1.nii.gz", tmp / "a" / "case_2.nii.gz", tmp / "b" / "case_1.nii.gz"]
    ids = [p.name.split(".")[0] for p in paths]
    return lambda: read_case_ids_unique(ids, paths), (str(paths[0]), str(paths[2])), "case_1"


def row_output_dir_is_file(tmp: Path) -> Row:
    (tmp / "out").write_text("not a folder")
    return lambda: ensure_output_dir(tmp / "out"), ("out",), "is a file"


def row_output_dir_under_file(tmp: Path) -> Row:
    # fails for root too, unlike a permission bit
    (tmp / "out").write_text("not a folder")
    return lambda: ensure_output_dir(tmp / "out" / "run1"), ("run1",), "cannot create"


def row_output_dir_not_writable(tmp: Path) -> Row:
    if IS_ROOT:
        pytest.skip("root can write anywhere; row_output_dir_under_file covers the root case")
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o500)
    return lambda: ensure_output_dir(tmp / "locked"), ("locked",), "not writable"


def row_save_refuses_overwrite(tmp: Path) -> Row:
    path = save_nifti(tmp / "mask.nii.gz", _label_array(), AFFINE)
    return lambda: save_nifti(path, _label_array(), AFFINE), ("mask.nii.gz",), "--overwrite"


BAD_INPUTS = [pytest.param(fn, id=fn.__name__.removeprefix("row_")) for fn in [
    row_missing, row_folder, row_unreadable, row_png_renamed, row_text_renamed, row_empty_file, row_wrong_extension,
    row_truncated_gzip, row_truncated_data, row_corrupt_header, row_2d, row_4d_series, row_5d_vector,
    row_zero_spacing, row_negative_spacing, row_nan_spacing, row_singular_affine, row_non_finite_affine,
    row_oblique_10_degrees, row_ct_nan, row_ct_inf, row_ct_uint8, row_ct_normalised, row_ct_raw_without_slope,
    row_ct_raw_with_padding, row_ct_far_out_of_range, row_label_fractions, row_label_negative, row_label_nan,
    row_shape_mismatch, row_affine_mismatch, row_no_liver_value, row_duplicate_case_ids, row_output_dir_is_file,
    row_output_dir_under_file, row_output_dir_not_writable, row_save_refuses_overwrite,
]]


@pytest.mark.parametrize("make_row", BAD_INPUTS)
def test_bad_input_is_refused_with_file_and_problem(make_row: Callable[[Path], Row], tmp_path: Path) -> None:
    call, names, keyword = make_row(tmp_path)
    with pytest.raises(InputDataError) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message
    assert keyword.lower() in message.lower()
    assert info.value.path is not None and info.value.problem


def test_internal_errors_are_chained_not_leaked(tmp_path: Path) -> None:
    call, _, _ = row_truncated_gzip(tmp_path)
    with pytest.raises(InputDataError) as info:
        call()
    assert isinstance(info.value.__cause__, (EOFError, OSError))
    assert "Fix:" in str(info.value)


def test_unreadable_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the permission row skips as root, so simulate the OS refusing the read
    path = _ct_file(tmp_path, _ct_array())

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(InputDataError, match="permission denied") as info:
        read_ct(path)
    assert info.value.path == str(path)


def test_valid_case_loads_like_monai(tmp_path: Path) -> None:
    image_path, label_path = _pair(tmp_path)
    case = load_case(image_path, label_path, [1], [2])
    image, label = case["image"], case["label"]
    assert isinstance(image, MetaTensor) and isinstance(label, MetaTensor)
    assert image.shape == (1, *SHAPE) and image.dtype == torch.float32
    assert label.shape == (1, *SHAPE) and label.dtype == torch.uint8
    assert image[0].numpy().flags.f_contiguous  # NIfTI's order, kept: one memory block per axial slice
    np.testing.assert_array_equal(image[0].numpy(), _ct_array().astype(np.float32))
    np.testing.assert_array_equal(label[0].numpy(), _label_array())
    for tensor, path in ((image, image_path), (label, label_path)):
        assert tensor.affine.dtype == torch.float64
        np.testing.assert_allclose(tensor.affine.numpy(), AFFINE, atol=1e-6)
        np.testing.assert_allclose(tensor.meta["original_affine"], AFFINE, atol=1e-6)
        assert tuple(tensor.meta["spatial_shape"]) == SHAPE
        assert tensor.meta["filename_or_obj"] == str(path)
    flipped = AFFINE @ np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 0.8 * (SHAPE[0] - 1)
    case = load_case(_ct_file(tmp_path, _ct_array(), "lps.nii.gz", flipped), _write(tmp_path / "lps_seg.nii.gz",
                                                                                     _label_array(), flipped), [1])
    oriented = Orientationd(["image", "label"], axcodes="RAS")(case)
    np.testing.assert_array_equal(oriented["label"][0].numpy(), _label_array()[::-1])


def test_read_ct_returns_float32_volume_with_spacing(tmp_path: Path) -> None:
    volume = read_ct(_ct_file(tmp_path, _ct_array()))
    assert isinstance(volume, Volume)
    assert volume.array.dtype == np.float32 and volume.array.shape == SHAPE
    assert volume.array.flags.f_contiguous  # NIfTI's own order is kept: each axial slice is one block
    assert volume.spacing == pytest.approx((0.8, 0.8, 2.5))


def test_header_rescale_slope_is_applied(tmp_path: Path) -> None:
    image = nib.Nifti1Image((_ct_array().astype(np.int32) + 1024).astype(np.uint16), AFFINE)
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(read_ct(tmp_path / "ct.nii.gz").array, _ct_array().astype(np.float32))


def test_trailing_singleton_4th_dim_is_squeezed(tmp_path: Path) -> None:
    path = _write(tmp_path / "ct.nii.gz", _ct_array()[..., None])
    volume = read_ct(path)
    assert volume.array.shape == SHAPE
    np.testing.assert_array_equal(volume.array, _ct_array())


def test_slightly_oblique_half_degree_is_accepted(tmp_path: Path) -> None:
    volume = read_ct(_ct_file(tmp_path, _ct_array(), affine=_rotation_z(0.5)))
    assert volume.array.shape == SHAPE


@pytest.mark.parametrize("stored_name, compress", [("ct.nii.gz", False), ("ct.nii", True)])
def test_content_decides_compression_not_extension(tmp_path: Path, stored_name: str, compress: bool) -> None:
    data = nib.Nifti1Image(_ct_array(), AFFINE).to_bytes()
    path = tmp_path / stored_name
    path.write_bytes(gzip.compress(data) if compress else data)
    np.testing.assert_array_equal(read_ct(path).array, _ct_array())


def test_nifti2_is_read(tmp_path: Path) -> None:
    nib.save(nib.Nifti2Image(_label_array(), AFFINE), tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(read_label(tmp_path / "seg.nii.gz").array, _label_array())


@pytest.mark.parametrize(
    "stored, expected",
    [(np.float32, np.uint8), (np.float64, np.uint8), (np.uint16, np.uint8), (">i2", np.int16), (np.int32, np.int32),
     (np.int8, np.uint8)],
)
def test_label_dtypes_become_native_integers(tmp_path: Path, stored: str | type, expected: type) -> None:
    image = nib.Nifti1Image(_label_array().astype(stored), AFFINE, dtype=np.dtype(stored))
    nib.save(image, tmp_path / "seg.nii.gz")
    label = read_label(tmp_path / "seg.nii.gz")
    assert label.array.dtype == np.dtype(expected)
    np.testing.assert_array_equal(label.array, _label_array())
    assert torch.from_numpy(label.array).sum() == _label_array().sum()


def test_large_label_values_get_a_wide_enough_type(tmp_path: Path) -> None:
    label = _label_array().astype(np.float32) * 300
    assert read_label(_write(tmp_path / "seg.nii.gz", label)).array.dtype == np.int16


def test_check_hu_false_skips_plausibility_but_not_nan(tmp_path: Path) -> None:
    normalised = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    assert read_ct(_ct_file(tmp_path, normalised), check_hu=False).array.max() <= 1.0
    normalised[0, 0, 0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        read_ct(_ct_file(tmp_path, normalised, "nan.nii.gz"), check_hu=False)


def test_padding_below_air_is_accepted(tmp_path: Path) -> None:
    array = _ct_array()
    array[0] = -3024  # Siemens' outside-the-field-of-view value
    assert read_ct(_ct_file(tmp_path, array)).array.min() == -3024


def test_grid_checks_accept_matching_and_lesion_only(tmp_path: Path) -> None:
    image_path, label_path = _pair(tmp_path)
    image, label = read_ct(image_path), read_label(label_path)
    check_same_grid(image, label)
    check_liver_present(label, liver_values=[7], lesion_values=[2])
    shifted = Volume(label.array, label.affine + np.pad(np.eye(3, 4, 3) * 0.005, ((0, 1), (0, 0))), label.path)
    check_same_grid(image, shifted)
    with pytest.raises(InputDataError):
        check_same_grid(image, shifted, atol_mm=1e-3)
    check_same_grid(image, Volume(label.array, np.eye(4), label.path), shape_only=True)


def test_save_nifti_is_byte_identical_and_round_trips(tmp_path: Path) -> None:
    heatmap = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = save_nifti(ensure_output_dir(tmp_path / "a") / "heat.nii.gz", heatmap, AFFINE)
    second = save_nifti(tmp_path / "other_name.nii.gz", heatmap, torch.as_tensor(AFFINE))
    assert first.read_bytes() == second.read_bytes()
    image = nib.load(first)
    assert image.get_data_dtype() == np.float32
    assert image.header["sform_code"] == 1 and image.header["qform_code"] == 1
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(read_ct(first, check_hu=False).array, heatmap.numpy(), rtol=1e-6)


def test_save_nifti_overwrite_and_shape_checks(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "mask.nii.gz", _label_array().astype(bool), AFFINE)
    assert read_label(path).array.dtype == np.uint8
    save_nifti(path, _label_array() * 2, AFFINE, dtype=np.int16, overwrite=True)
    assert read_label(path).array.max() == 4 and read_label(path).array.dtype == np.int16
    with pytest.raises(InputDataError, match="3D"):
        save_nifti(tmp_path / "chan.nii.gz", _label_array()[None], AFFINE)
    with pytest.raises(InputDataError, match=".nii"):
        save_nifti(tmp_path / "mask.png", _label_array(), AFFINE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_atomic_write_leaves_no_temp_file_when_writer_fails(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "report.json", b"old")

    def failing_writer(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        atomic_write(target, failing_writer)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert target.read_bytes() == b"old"


def test_atomic_write_keeps_suffix_for_extension_based_writers(tmp_path: Path) -> None:
    seen: list[str] = []
    atomic_write(tmp_path / "x.nii.gz", lambda temp: (seen.append(temp.name), nib.save(
        nib.Nifti1Image(_label_array(), AFFINE), temp)))
    assert seen[0].endswith(".nii.gz") and seen[0] != "x.nii.gz"
    assert (tmp_path / "x.nii.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_atomic_write_os_errors_become_input_data_errors(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "r.json", b"{}")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(InputDataError, match="dir.json"):
        atomic_write_bytes(tmp_path / "dir.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json"]


def test_atomic_write_json_converts_numpy_and_paths(tmp_path: Path) -> None:
    obj = {"auroc": np.float32(0.5), "n": np.int64(3), "shape": np.array([8, 8]), "file": tmp_path / "a.nii.gz"}
    path = atomic_write_json(tmp_path / "report.json", obj)
    assert json.loads(path.read_text()) == {"auroc": 0.5, "n": 3, "shape": [8, 8], "file": str(tmp_path / "a.nii.gz")}


def test_ensure_output_dir_creates_parents(tmp_path: Path) -> None:
    out = ensure_output_dir(tmp_path / "runs" / "1")
    assert out.is_dir() and ensure_output_dir(out) == out


@settings(max_examples=20, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4)),
    spacing=st.tuples(*[st.floats(0.2, 5.0)] * 3),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    permutation=st.permutations([0, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_save_then_read_round_trips_any_axis_aligned_grid(tmp_path_factory, shape, spacing, flips, permutation,
                                                          seed) -> None:
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[list(permutation)] @ np.diag(np.multiply(spacing, flips))
    affine[:3, 3] = np.random.default_rng(seed).uniform(-200, 200, 3)
    label = np.random.default_rng(seed).integers(0, 3, shape).astype(np.uint8)
    path = save_nifti(tmp_path_factory.mktemp("rt") / "seg.nii.gz", label, affine)
    volume = read_label(path)
    np.testing.assert_array_equal(volume.array, label)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.spacing == pytest.approx(tuple(float(abs(s)) for s in np.array(spacing)), rel=1e-5)


@pytest.mark.shared_data
def test_real_ircadb_patient_17() -> None:
    case = load_case(shared_path("ircadb", "ircadb_p17_ct.nii.gz"),
                     shared_path("ircadb", "ircadb_p17_label_liver1_tumor2.nii.gz"), [1], [2])
    assert case["image"].shape == (1, 512, 512, 119) and case["image"].dtype == torch.float32
    assert case["label"].dtype == torch.uint8
    assert set(torch.unique(case["label"]).tolist()) == {0, 1, 2}
    assert case["image"].min() == -1024
    np.testing.assert_allclose(np.abs(np.diag(case["image"].affine.numpy()))[:3], [0.743, 0.743, 1.6], atol=1e-3)


@pytest.mark.shared_data
def test_real_totalsegmentator_example() -> None:
    case = load_case(shared_path("totalsegmentator", "example_ct_sm.nii.gz"),
                     shared_path("totalsegmentator", "example_seg.nii.gz"), liver_values=[5])
    assert case["image"].shape == case["label"].shape == (1, 122, 101, 30)
    assert int((case["label"] == 5).sum()) > 1000
    with pytest.raises(InputDataError, match="example_seg"):
        load_case(shared_path("totalsegmentator", "example_ct_sm.nii.gz"),
                  shared_path("totalsegmentator", "example_seg.nii.gz"), liver_values=[200])
