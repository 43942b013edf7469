"""Liver masks as TotalSegmentator writes them: an output folder (``liver.nii.gz``) and masks on a coarser grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.common.io import load_case, save_nifti
from pipeline.data.datasets import CaseRecord
from pipeline.data.phantom import make_phantom_case
from transforms.errors import InputDataError


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """A phantom CT written as NIfTI, with its LiTS label map and affine: ``(ct_path, ct, label, affine)``."""
    root = tmp_path_factory.mktemp("ts")
    phantom = make_phantom_case(2, size=64, n_slices=12, n_lesions=1, lesion_kinds=("hypo",), orientation="LPS")
    ct_path = save_nifti(root / "ct.nii.gz", phantom.ct, phantom.affine)
    return ct_path, phantom.ct, phantom.label, phantom.affine


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.sum(a & b)) / float(np.sum(a) + np.sum(b))


def test_totalsegmentator_output_folder_gives_its_binary_liver_mask(case, tmp_path):
    ct_path, _, label, affine = case
    (tmp_path / "seg").mkdir()
    save_nifti(tmp_path / "seg" / "liver.nii.gz", (label > 0).astype(np.uint8), affine)
    save_nifti(tmp_path / "seg" / "spleen.nii.gz", np.zeros_like(label), affine)
    # whatever preset the user chose, the folder's mask means liver = 1 and no lesion is known
    record = CaseRecord("p", ct_path, tmp_path / "seg", "cli", (5,), (2,))
    assert record.label == tmp_path / "seg" / "liver.nii.gz"
    assert record.liver_values == (1,) and record.lesion_values == ()
    assert record.extra["label_source"] == "totalsegmentator_folder"
    loaded = load_case(record.image, record.label, record.liver_values, record.lesion_values)
    assert np.array_equal(loaded["label"][0].numpy(), (label > 0).astype(np.uint8))


def test_a_folder_without_liver_mask_is_a_clear_error(case, tmp_path):
    (tmp_path / "dicom_or_other").mkdir()
    with pytest.raises(InputDataError, match="without liver.nii.gz"):
        CaseRecord("p", case[0], tmp_path / "dicom_or_other", "cli", (1,))


def _coarse_grid(affine: np.ndarray, shape: tuple[int, ...], factor: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The affine and shape of a grid with ``factor``-times larger in-plane voxels over the same extent."""
    coarse = affine.copy()
    coarse[:3, :2] *= factor
    # the first coarse voxel's centre sits at the centre of the first `factor` fine voxels
    coarse[:3, 3] = affine[:3, 3] + affine[:3, :2] @ np.full(2, (factor - 1) / 2.0)
    return coarse, (shape[0] // factor, shape[1] // factor, shape[2])


def test_mask_on_a_coarser_grid_is_resampled_onto_the_ct(case, tmp_path):
    ct_path, ct, label, affine = case
    coarse_affine, coarse_shape = _coarse_grid(affine, ct.shape, 2)
    # the mask as a coarse segmenter would give it: the fine label at the coarse voxel centres
    centres = np.linalg.inv(affine) @ coarse_affine
    index = np.indices(coarse_shape).reshape(3, -1)
    fine = np.rint(centres[:3, :3] @ index + centres[:3, 3:]).astype(int)
    fine = np.clip(fine, 0, np.array(ct.shape)[:, None] - 1)
    coarse = (label[fine[0], fine[1], fine[2]] > 0).astype(np.uint8).reshape(coarse_shape)
    path = save_nifti(tmp_path / "liver_coarse.nii.gz", coarse, coarse_affine)
    loaded = load_case(ct_path, path, (1,))
    out = loaded["label"][0].numpy()
    assert out.shape == ct.shape and set(np.unique(out)) <= {0, 1}  # nearest neighbour: no interpolated values
    assert np.allclose(loaded["label"].affine.numpy(), nib.load(ct_path).affine)
    assert _dice(out > 0, label > 0) > 0.9


def test_mask_covering_another_extent_is_refused(case, tmp_path):
    ct_path, ct, label, affine = case
    coarse_affine, coarse_shape = _coarse_grid(affine, ct.shape, 2)
    coarse_affine[:3, 3] += np.array([40.0, 0.0, 0.0])  # 40 mm to the side: another part of the body
    path = save_nifti(tmp_path / "shifted.nii.gz", np.ones(coarse_shape, np.uint8), coarse_affine)
    with pytest.raises(InputDataError, match="another part of space: the extents differ by up to 40.0 mm") as info:
        load_case(ct_path, path, (1,))
    assert info.value.path == str(path)


def test_infer_takes_a_totalsegmentator_folder(case, tmp_path):
    from pipeline.data.settings import PrepareSettings
    from pipeline.infer.settings import write_inference_settings
    from tests.infer.test_inference import _bundle_with_random_weights

    ct_path, _, label, affine = case
    (tmp_path / "seg").mkdir()
    save_nifti(tmp_path / "seg" / "liver.nii.gz", (label > 0).astype(np.uint8), affine)
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8]}
    _bundle_with_random_weights(tmp_path / "bundle", wrap=False, **tiny)
    write_inference_settings(tmp_path / "bundle", 0.5, PrepareSettings(field_mm=300.0, size=32), "default", tiny)
    assert cli_main(["infer", "--image", str(ct_path), "--label", str(tmp_path / "seg"), "--bundle",
                     str(tmp_path / "bundle"), "--out", str(tmp_path / "out")]) == 0
    heat = nib.load(tmp_path / "out" / "ct_anomaly.nii.gz")
    assert heat.shape == label.shape and np.all(np.asarray(heat.dataobj)[label == 0] == 0.0)


def test_mask_storing_the_same_voxels_in_another_axis_order_is_reindexed_exactly(case, tmp_path):
    """A mask made on a converter's NIfTI of a DICOM series may store the slices top to bottom and the axes in
    another order: the same voxel centres, so it is reindexed exactly; one slice off is still refused."""
    ct_path, _, label, affine = case
    # slices reversed and x/y swapped: voxel (i, j, k) of the mask is voxel (j, i, n-1-k) of the CT
    n = label.shape[2]
    stored = np.ascontiguousarray(label.transpose(1, 0, 2)[:, :, ::-1])
    other = np.zeros((4, 4))
    other[:3, 0], other[:3, 1], other[:3, 2] = affine[:3, 1], affine[:3, 0], -affine[:3, 2]
    other[:3, 3] = affine[:3, 3] + affine[:3, 2] * (n - 1)
    other[3, 3] = 1.0
    loaded = load_case(ct_path, save_nifti(tmp_path / "reordered.nii.gz", stored, other), (1,), (2,))
    assert np.array_equal(loaded["label"][0].numpy(), label)
    shifted = other.copy()
    shifted[:3, 3] += affine[:3, 2]  # one slice further along: a wrong pairing, never resampled
    with pytest.raises(InputDataError, match="grid corners are up to"):
        load_case(ct_path, save_nifti(tmp_path / "shifted.nii.gz", stored, shifted), (1,), (2,))
