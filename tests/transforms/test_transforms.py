"""Tests of the foundation transforms: HU window, liver masks, the physical liver ROI and axial slicing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_tensor

from pipeline.common.io import load_case, save_nifti
from pipeline.data.phantom import make_phantom_case
from pipeline.data.settings import PrepareSettings, volume_transform
from tests.conftest import shared_path
from transforms.errors import InputDataError
from transforms.intensity import HUWindow, HUWindowd
from transforms.roi import LiverMasks, LiverMasksd, LiverROI, LiverROId
from transforms.slicing import AxialSlicesd, RandAxialSliced, eligible_slices

FIELD_MM, SIZE = 300.0, 64


# ------------------------------------------------------------------------------------------------------------ helpers


def grid_affine(
    spacing: tuple[float, float], shape: tuple[int, int, int], flip_xy: bool = False, z_mm: float = 2.5
) -> np.ndarray:
    """Voxel -> world matrix of an axis-aligned grid with an off-centre origin, optionally stored LPS-like."""
    affine = np.diag([*spacing, z_mm, 1.0])
    affine[:3, 3] = (-37.0, 52.0, -11.0)
    if flip_xy:
        affine[:3, 3] += affine[:3, :2] @ (np.array(shape[:2]) - 1.0)
        affine[:3, :2] *= -1.0
    return affine


def world(affine: np.ndarray, voxel) -> np.ndarray:
    """World (mm) position of a continuous voxel coordinate."""
    return nib.affines.apply_affine(affine, np.asarray(voxel, dtype=np.float64))


def disk_case(
    spacing: float | tuple[float, float],
    fov_mm: float = 180.0,
    n_slices: int = 6,
    center_mm: tuple[float, float] = (20.0, -10.0),
    radius_mm: float = 45.0,
    flip_xy: bool = False,
):
    """A volume whose liver is a cylinder of ``radius_mm`` (absent on slice 0, one voxel on slice 1) with a lesion
    ball on the middle slices; the image is 0.2 outside the liver, 0.5 in it and 0.9 in the lesion.

    Returns ``(image MetaTensor (1, X, Y, Z), label MetaTensor (1, X, Y, Z) uint8 0/1/2, affine)``.
    """
    sx, sy = (spacing, spacing) if np.isscalar(spacing) else spacing
    shape = (int(round(fov_mm / sx)), int(round(fov_mm / sy)), n_slices)
    affine = grid_affine((sx, sy), shape, flip_xy)
    # coordinates measured from the volume centre, in the canonical (unflipped) layout
    x = ((np.arange(shape[0]) - (shape[0] - 1) / 2.0) * sx)[:, None]
    y = ((np.arange(shape[1]) - (shape[1] - 1) / 2.0) * sy)[None, :]
    disk = (x - center_mm[0]) ** 2 + (y - center_mm[1]) ** 2 < radius_mm**2
    ball = (x - center_mm[0] - 15.0) ** 2 + (y - center_mm[1]) ** 2 < 12.0**2
    label = np.zeros(shape, dtype=np.uint8)
    label[..., 2:] = disk[..., None]
    label[..., 3:5][ball] = 2
    ix, iy = np.argwhere(disk)[0]
    label[ix, iy, 1] = 1
    if flip_xy:
        label = np.ascontiguousarray(label[::-1, ::-1])
    image = np.choose(label, [0.2, 0.5, 0.9]).astype(np.float32)
    t = torch.as_tensor(affine)
    return (
        MetaTensor(torch.from_numpy(image[None]), affine=t, meta={"filename_or_obj": "ct.nii.gz"}),
        MetaTensor(torch.from_numpy(label[None]), affine=t, meta={"filename_or_obj": "seg.nii.gz"}),
        affine,
    )


def weighted_centroid(values: np.ndarray) -> np.ndarray:
    """Centroid (continuous voxel coordinates) of a non-negative array, weighted by its values."""
    idx = np.indices(values.shape).reshape(values.ndim, -1)
    w = values.reshape(-1).astype(np.float64)
    return idx @ w / w.sum()


# ------------------------------------------------------------------------------------------------------- HU window


def test_hu_window_maps_clips_and_returns_float32():
    hu = np.array([-3000, -1000, -200, 25, 250, 1000, 3071], dtype=np.int16)
    out = HUWindow()(hu)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(out), [0, 0, 0, 0.5, 1, 1, 1], atol=1e-6)
    # another window: midpoint of [-100, 300] is 100
    out = HUWindow(-100.0, 300.0)(torch.tensor([-150.0, 100.0, 400.0], dtype=torch.float64))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(out), [0, 0.5, 1], atol=1e-6)


def test_hu_window_keeps_meta_tensor_meta():
    affine = torch.as_tensor(grid_affine((0.8, 0.8), (4, 3, 2)))
    img = MetaTensor(torch.full((1, 4, 3, 2), 25.0), affine=affine, meta={"filename_or_obj": "/data/ct.nii.gz"})
    for out in (HUWindow()(img), HUWindowd("image")({"image": img})["image"]):
        assert isinstance(out, MetaTensor)
        assert out.meta["filename_or_obj"] == "/data/ct.nii.gz"
        torch.testing.assert_close(out.affine, affine)
        assert out.dtype == torch.float32 and out.shape == (1, 4, 3, 2)
        np.testing.assert_allclose(out.numpy(), 0.5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
@pytest.mark.parametrize("wrap", ["numpy", "tensor", "meta"])
def test_hu_window_is_bit_identical_to_monai_scale_intensity_range(dtype, wrap):
    from monai.transforms import ScaleIntensityRange

    hu = np.random.RandomState(0).uniform(-1024, 3071, (1, 16, 12, 5)).astype(dtype)
    img = {"numpy": hu, "tensor": torch.as_tensor(hu), "meta": MetaTensor(torch.as_tensor(hu))}[wrap]
    ours, monai_result = HUWindow()(img), ScaleIntensityRange(-200.0, 250.0, 0.0, 1.0, clip=True)(img)
    assert type(ours) is type(monai_result) and ours.dtype == monai_result.dtype == torch.float32
    assert torch.equal(torch.as_tensor(ours), torch.as_tensor(monai_result))
    assert np.array_equal(np.asarray(img), hu)  # the input is not modified in place


def test_hu_windowd_only_touches_its_keys():
    d = HUWindowd("image")({"image": np.array([-500.0, 250.0]), "label": np.array([1, 2])})
    np.testing.assert_allclose(np.asarray(d["image"]), [0.0, 1.0])
    np.testing.assert_array_equal(d["label"], [1, 2])


@pytest.mark.parametrize("window", [(250.0, -200.0), (100.0, 100.0)])
def test_hu_window_rejects_invalid_window(window):
    with pytest.raises(ValueError, match="hu_max > hu_min"):
        HUWindow(*window)
    with pytest.raises(ValueError, match="hu_max > hu_min"):
        HUWindowd("image", *window)


# ------------------------------------------------------------------------------------------------------ liver masks


def test_liver_mask_includes_lesion_values():
    label = torch.tensor([0, 1, 2, 3, 1, 2], dtype=torch.uint8)
    liver, lesion = LiverMasks()(label)
    assert liver.dtype == lesion.dtype == torch.float32 and liver.shape == label.shape
    np.testing.assert_array_equal(liver.numpy(), [0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(lesion.numpy(), [0, 0, 1, 0, 0, 1])


@pytest.mark.parametrize(
    "liver_values, label, expected",
    [
        ((6,), [0, 1, 2, 5, 6, 7, 13, 6], [0, 0, 0, 0, 1, 0, 0, 1]),  # BTCV: 1 spleen, 2 right kidney, 6 liver
        ((5,), [0, 1, 2, 5, 6, 5, 104], [0, 0, 0, 1, 0, 1, 0]),  # TotalSegmentator v2: 5 liver
    ],
)
def test_liver_mask_custom_values(liver_values, label, expected):
    liver, lesion = LiverMasks(liver_values, lesion_values=())(np.array(label, dtype=np.int16))
    np.testing.assert_array_equal(liver.numpy(), expected)
    assert lesion.sum() == 0


def test_liver_masksd_and_validation():
    d = LiverMasksd("label")({"label": torch.tensor([[[0, 1], [2, 2]]])})
    np.testing.assert_array_equal(d["liver"].numpy(), [[[0, 1], [1, 1]]])
    np.testing.assert_array_equal(d["lesion"].numpy(), [[[0, 0], [1, 1]]])
    np.testing.assert_array_equal(d["label"].numpy(), [[[0, 1], [2, 2]]])  # left as it is
    with pytest.raises(ValueError):
        LiverMasks(liver_values=())


# ---------------------------------------------------------------------------------------------------------- LiverROI


def test_liver_roi_shapes_dtypes_and_masking():
    image, label, _ = disk_case(3.0)
    r = LiverROI(field_mm=FIELD_MM, size=SIZE)(image, label)
    for t in (r.image, r.liver, r.lesion):
        assert t.shape == (1, SIZE, SIZE, 6) and t.dtype == torch.float32
    assert set(np.unique(r.liver.numpy())) == {0.0, 1.0} and set(np.unique(r.lesion.numpy())) == {0.0, 1.0}
    assert torch.all(r.lesion <= r.liver)
    assert r.image.min() >= 0 and r.image.max() <= 1
    assert torch.all(r.image[r.liver == 0] == 0)
    assert r.image[r.liver == 1].min() > 0.3  # liver (0.5) at least half of every liver pixel, background 0.2

    kept = LiverROI(field_mm=FIELD_MM, size=SIZE, mask_outside=False)(image, label)
    outside = kept.image[kept.liver == 0]
    assert torch.isclose(outside, torch.tensor(0.2)).sum() > 1000  # the background intensity, not zeroed
    torch.testing.assert_close(kept.liver, r.liver)


def test_liver_roid_outputs():
    image, label, affine = disk_case(1.0, flip_xy=True)
    btcv_label = label.clone()
    btcv_label[label == 1] = 6
    btcv_label[label == 2] = 6  # BTCV marks no tumour: the ball is plain liver here
    btcv_label[0, :5, :5, :] = 1  # spleen-valued voxels outside the liver must not become liver
    d = LiverROId("image", liver_values=(6,), lesion_values=(), field_mm=FIELD_MM, size=SIZE)(
        {"image": image, "label": btcv_label, "case_id": "img0001"}
    )
    assert isinstance(d["image"], MetaTensor) and d["image"].dtype == torch.float32
    assert d["image"].shape == (1, SIZE, SIZE, 6)
    assert d["image"].meta["filename_or_obj"] == "ct.nii.gz"
    assert d["label"].dtype == torch.uint8 and set(np.unique(d["label"].numpy())) == {0, 1}
    torch.testing.assert_close(d["label"].float(), d["liver"])
    assert d["lesion"].sum() == 0 and d["case_id"] == "img0001"
    native_liver = (btcv_label[0] == 6).sum(dim=(0, 1)).numpy()
    np.testing.assert_array_equal(d["liver_voxels"], native_liver)
    roi = d["roi"]
    assert roi["source_shape"] == list(image.shape[1:]) and roi["size"] == SIZE and roi["field_mm"] == FIELD_MM
    np.testing.assert_allclose(roi["source_affine"], affine)
    np.testing.assert_allclose(roi["mm_per_pixel"], np.linalg.norm(d["image"].affine.numpy()[:3, :2], axis=0))
    np.testing.assert_allclose(roi["mm_per_pixel"], FIELD_MM / SIZE, rtol=0.01)

    # with lesions the label is rewritten to the project's 0/1/2
    d = LiverROId("image", field_mm=FIELD_MM, size=SIZE)({"image": image, "label": label})
    assert set(np.unique(d["label"].numpy())) == {0, 1, 2}
    np.testing.assert_array_equal(d["label"].numpy() == 2, d["lesion"].numpy() == 1)
    np.testing.assert_array_equal(d["label"].numpy() >= 1, d["liver"].numpy() == 1)


@pytest.mark.parametrize("spacing", [1.0, 6.0])  # the crop shrunk (area) and enlarged (bilinear)
def test_liver_roid_inverse_restores_the_source_grid(spacing):
    """LiverROId records its crop on the image; its inverse puts a ROI map back on the source grid and affine."""
    from scipy import ndimage

    image, label, affine = disk_case(spacing, flip_xy=True)
    roi = LiverROId("image", field_mm=FIELD_MM, size=SIZE)
    d = roi({"image": image, "label": label})
    assert [op["class"] for op in d["image"].applied_operations] == ["LiverROId"] and image.applied_operations == []
    back = roi.inverse({"image": d["image"], "label": d["label"]})
    assert back["label"] is d["label"]  # only the keys are inverted
    back = back["image"]
    assert isinstance(back, MetaTensor) and back.shape == image.shape and back.dtype == torch.float32
    assert back.applied_operations == []
    np.testing.assert_equal(back.meta.get("spatial_shape"), image.meta.get("spatial_shape"))  # as it was (absent)
    np.testing.assert_allclose(back.affine.numpy(), affine)
    # the liver (0.5; 0 outside it: masked) comes back away from its edge and from the lesion; far outside it, 0
    margin = int(np.ceil(15.0 / spacing))
    liver, lesion = label[0].numpy() >= 1, label[0].numpy() == 2
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = True  # in-plane only
    core = ndimage.binary_erosion(liver, structure, margin) & ~ndimage.binary_dilation(lesion, structure, margin)
    far = ~ndimage.binary_dilation(liver, structure, margin)
    assert core.sum() > 50
    np.testing.assert_allclose(back[0].numpy()[core], 0.5, atol=1e-5)
    assert np.all(back[0].numpy()[far] == 0.0)


# 6 mm enlarges (bilinear), the others shrink (area); the anisotropic grid catches swapped axes
@pytest.mark.parametrize("spacing", [0.7, 1.0, 3.0, 6.0, (0.8, 2.5)])
def test_roi_has_the_same_mm_per_pixel_for_every_spacing(spacing):
    image, label, _ = disk_case(spacing)
    d = LiverROId("image", field_mm=FIELD_MM, size=SIZE)({"image": image, "label": label})
    columns = np.linalg.norm(np.asarray(d["image"].affine)[:3, :2], axis=0)
    np.testing.assert_allclose(columns, FIELD_MM / SIZE, rtol=0.01)
    # slices are never resampled
    assert d["image"].shape[-1] == 6
    np.testing.assert_allclose(np.asarray(d["image"].affine)[:3, 2], [0, 0, 2.5])


@pytest.mark.parametrize(
    "spacing, flip_xy", [(0.7, False), (1.0, True), (3.0, False), (3.0, True), (6.0, True), ((0.8, 2.5), True)]
)
def test_roi_affine_maps_voxels_to_the_same_world_points(spacing, flip_xy):
    image, label, affine = disk_case(spacing, flip_xy=flip_xy)
    roi_pixel_mm = FIELD_MM / SIZE

    # a single bright voxel inside the liver: its world position survives the crop and resampling
    spot = image.clone()
    spot[:] = 0
    liver_voxels = np.argwhere(label[0, :, :, 3].numpy() == 1)
    vx, vy = liver_voxels[len(liver_voxels) // 3]
    spot[0, vx, vy, 3] = 1.0
    r = LiverROI(field_mm=FIELD_MM, size=SIZE, mask_outside=False)(spot, label)
    roi_spot = r.image[0, :, :, 3].numpy()
    assert roi_spot.sum() > 0 and r.image[0, :, :, [0, 1, 2, 4, 5]].abs().max() == 0
    u, v = weighted_centroid(roi_spot)
    error = np.linalg.norm(world(r.roi_affine, (u, v, 3)) - world(affine, (vx, vy, 3)))
    assert error < roi_pixel_mm

    # the lesion ball: its world centroid is preserved well within a pixel (a single voxel is quantised to the
    # output pixels, an extended blob is not; half a native voxel of error would show at 6 mm)
    r = LiverROI(field_mm=FIELD_MM, size=SIZE)(image, label)
    roi_c = world(r.roi_affine, weighted_centroid(r.lesion[0].numpy()))
    native_c = world(affine, weighted_centroid((label[0] == 2).numpy()))
    assert np.linalg.norm(roi_c - native_c) < 0.4 * roi_pixel_mm


@pytest.mark.parametrize("spacing", [0.7, 3.0])
def test_roi_is_centred_on_the_liver(spacing):
    image, label, _ = disk_case(spacing, center_mm=(-30.0, 25.0))
    r = LiverROI(field_mm=FIELD_MM, size=SIZE)(image, label)
    centre = weighted_centroid(r.liver[0, :, :, 3].numpy())
    np.testing.assert_allclose(centre, [(SIZE - 1) / 2.0] * 2, atol=1.0)


def test_roi_pads_with_zeros_where_the_field_leaves_the_image():
    # a liver at the edge of a 120 mm image: most of the 300 mm field lies outside the image
    image, label, affine = disk_case(2.0, fov_mm=120.0, center_mm=(40.0, -40.0), radius_mm=15.0)
    ones = image.clone()
    ones[:] = 1.0
    r = LiverROI(field_mm=FIELD_MM, size=SIZE, mask_outside=False)(ones, label)
    assert r.box[0] < 0 or r.box[2] < 0 or r.box[1] > image.shape[1] or r.box[3] > image.shape[2]
    # native (continuous) position of every ROI pixel centre
    uu, vv = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    roi_pts = np.stack([uu.ravel(), vv.ravel(), np.full(uu.size, 3.0)], axis=1)
    native = nib.affines.apply_affine(np.linalg.inv(affine) @ r.roi_affine, roi_pts)
    n = image.shape[1]
    margin = FIELD_MM / SIZE / 2.0  # one ROI pixel, in native 2 mm voxels
    inside = np.all((native[:, :2] > -0.5 + margin) & (native[:, :2] < n - 0.5 - margin), axis=1)
    outside = np.any((native[:, :2] < -0.5 - margin) | (native[:, :2] > n - 0.5 + margin), axis=1)
    values = r.image[0, :, :, 3].numpy().ravel()
    assert inside.sum() > 50 and outside.sum() > 50
    np.testing.assert_allclose(values[inside], 1.0, atol=1e-5)
    np.testing.assert_array_equal(values[outside], 0.0)


def test_roi_counts_per_slice_on_the_native_grid():
    image, label, _ = disk_case(0.7)
    r = LiverROI(field_mm=FIELD_MM, size=SIZE)(image, label)
    lab = label[0].numpy()
    np.testing.assert_array_equal(r.liver_voxels, ((lab == 1) | (lab == 2)).sum(axis=(0, 1)))
    np.testing.assert_array_equal(r.lesion_voxels, (lab == 2).sum(axis=(0, 1)))
    assert r.liver_voxels.dtype == np.int64
    # the one-voxel slice is counted although it is far below one ROI pixel (0.7 mm vs 4.7 mm)
    assert r.liver_voxels[0] == 0 and r.liver_voxels[1] == 1 and r.liver[0, :, :, 1].sum() == 0


def test_no_liver_names_the_label_file():
    image, label, _ = disk_case(3.0)
    label[:] = 0
    with pytest.raises(InputDataError) as info:
        LiverROI(liver_values=(6,))(image, label)
    assert info.value.path == "seg.nii.gz"
    assert "seg.nii.gz" in str(info.value) and "no liver" in str(info.value)
    with pytest.raises(InputDataError, match="seg.nii.gz"):
        LiverROId("image")({"image": image, "label": label})


def test_roi_rejects_mismatched_shapes():
    image, label, _ = disk_case(3.0)
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\)"):
        LiverROI()(image[:, :-1], label)


# ------------------------------------------------------------------------------------------------------ slicing


def roi_volume() -> dict:
    """:func:`disk_case` at 3 mm with 8 slices, through :class:`LiverROId`."""
    image, label, _ = disk_case(3.0, n_slices=8)
    return LiverROId("image", field_mm=FIELD_MM, size=SIZE)({"image": image, "label": label, "case_id": "disk"})


def test_axial_slices_one_dict_per_liver_slice():
    d = roi_volume()
    items = AxialSlicesd()(d)
    # slice 0 has no liver; slice 1 holds one native voxel
    assert [it["slice_index"] for it in items] == list(range(1, 8))
    for it in items:
        z = it["slice_index"]
        assert it["case_id"] == "disk"
        assert it["liver_area"] == d["liver_voxels"][z] and it["lesion_area"] == d["lesion_voxels"][z]
        assert it["has_lesion"] == int(d["lesion_voxels"][z] > 0)
        for key in ("image", "label", "liver", "lesion"):
            assert it[key].shape == (1, SIZE, SIZE) and not isinstance(it[key], MetaTensor)
            torch.testing.assert_close(it[key], convert_to_tensor(d[key], track_meta=False)[..., z])
        assert it["label"].dtype == torch.uint8 and it["image"].dtype == torch.float32
    assert [it["has_lesion"] for it in items] == [0, 0, 1, 1, 0, 0, 0]


def test_axial_slices_min_area_and_counts_from_masks():
    d = roi_volume()
    big = int(d["liver_voxels"][2])
    assert [it["slice_index"] for it in AxialSlicesd(min_liver_area=2)(d)] == list(range(2, 8))
    assert AxialSlicesd(min_liver_area=big + 1)(d) == []
    # without the native counts, areas are counted on the masks themselves
    del d["liver_voxels"], d["lesion_voxels"]
    items = AxialSlicesd()(d)
    assert [it["slice_index"] for it in items] == list(range(2, 8))  # the one-voxel slice vanished at ROI scale
    assert items[0]["liver_area"] == int(d["liver"][..., 2].sum())


@pytest.mark.parametrize(
    "liver, lesion, kwargs, expected",
    [
        ([0, 3, 5, 1, 0], None, {}, [1, 2, 3]),
        ([0, 3, 5, 1, 0], None, {"min_liver_area": 3}, [1, 2]),
        ([4] * 8, [0, 0, 0, 1, 0, 0, 0, 0], {"exclude_lesion": True}, [0, 1, 2, 4, 5, 6, 7]),
        ([4] * 8, [0, 0, 0, 1, 0, 0, 0, 0], {"exclude_lesion": True, "lesion_margin": 2}, [0, 6, 7]),
        ([4] * 8, [0, 0, 0, 1, 0, 0, 0, 0], {"lesion_margin": 2}, list(range(8))),  # not excluding: margin unused
        ([4] * 8, [1, 0, 0, 0, 0, 0, 0, 1], {"exclude_lesion": True, "lesion_margin": 1}, [2, 3, 4, 5]),
        ([4, 4, 4], [0, 1, 0], {"exclude_lesion": True, "lesion_margin": 3}, []),  # margin longer than the volume
        ([4, 4, 4], [0, 0, 0], {"exclude_lesion": True, "lesion_margin": 5}, [0, 1, 2]),
        ([0, 0], [0, 0], {}, []),
    ],
)
def test_eligible_slices(liver, lesion, kwargs, expected):
    out = eligible_slices(np.array(liver), None if lesion is None else np.array(lesion), **kwargs)
    assert out.dtype == np.int64
    assert out.tolist() == expected


def lesion_volume(n_slices: int = 12, lesion_slices=(5, 6)) -> dict:
    """A (1, 8, 8, Z) volume with liver on every slice and lesions on ``lesion_slices``."""
    label = np.zeros((1, 8, 8, n_slices), dtype=np.uint8)
    label[0, 2:6, 2:6, :] = 1
    for z in lesion_slices:
        label[0, 3, 3, z] = 2
    liver, lesion = LiverMasks()(label)
    image = torch.arange(n_slices, dtype=torch.float32).expand(1, 8, 8, n_slices).clone()
    return {"image": image, "label": torch.from_numpy(label), "liver": liver, "lesion": lesion, "case_id": "c"}


def test_rand_axial_slice_draws_only_normal_slices():
    d = lesion_volume()
    t = RandAxialSliced(lesion_margin=2)
    t.set_random_state(seed=0)
    drawn = []
    for _ in range(60):
        it = t(d)
        assert it["has_lesion"] == 0 and it["image"].shape == (1, 8, 8)
        assert float(it["image"][0, 0, 0]) == it["slice_index"]  # the image is the drawn slice
        drawn.append(it["slice_index"])
    assert set(drawn) == {0, 1, 2, 9, 10, 11}  # 3..8 are within 2 slices of a lesion

    with_lesions = RandAxialSliced(exclude_lesion=False)
    with_lesions.set_random_state(seed=0)
    assert {with_lesions(d)["slice_index"] for _ in range(100)} == set(range(12))


def test_rand_axial_slice_is_reproducible_with_set_random_state():
    d = lesion_volume()

    def draws(seed: int) -> list[int]:
        t = RandAxialSliced(lesion_margin=0)
        t.set_random_state(seed=seed)
        return [t(d)["slice_index"] for _ in range(20)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_rand_axial_slice_falls_back_to_the_first_liver_slice():
    d = lesion_volume(n_slices=4, lesion_slices=(0, 1, 2, 3))
    t = RandAxialSliced(lesion_margin=3)
    t.set_random_state(seed=0)
    it = t(d)
    assert it["slice_index"] == 0 and it["has_lesion"] == 1


# ----------------------------------------------------------------------------------------------- orientation


def prepared_slices(image_path: Path, label_path: Path, settings: PrepareSettings) -> list[dict]:
    """Load a case as ``prepare`` does and cut it into liver slices."""
    data = load_case(image_path, label_path, (1,), (2,))
    vol = volume_transform(settings, (1,), (2,))(data)
    return AxialSlicesd(keys=("image", "label"))(vol)


def assert_same_slices(a: list[dict], b: list[dict]) -> None:
    """Two slice lists hold the same slices with identical arrays and fields."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in ("slice_index", "liver_area", "lesion_area", "has_lesion"):
            assert x[key] == y[key]
        np.testing.assert_array_equal(x["image"].numpy(), y["image"].numpy())
        np.testing.assert_array_equal(x["label"].numpy(), y["label"].numpy())


def test_lps_and_ras_storage_give_identical_slices(tmp_path):
    out = {}
    for orientation in ("RAS", "LPS"):
        case = make_phantom_case(5, size=96, n_slices=16, orientation=orientation)
        ct, seg = tmp_path / f"{orientation}_ct.nii.gz", tmp_path / f"{orientation}_seg.nii.gz"
        save_nifti(ct, case.ct, case.affine)
        save_nifti(seg, case.label, case.affine)
        out[orientation] = prepared_slices(ct, seg, PrepareSettings(size=SIZE))
    assert any(it["has_lesion"] for it in out["RAS"])
    assert_same_slices(out["RAS"], out["LPS"])


@pytest.mark.slow
@pytest.mark.shared_data
def test_ircadb_patient_17_lps_and_ras_give_identical_slices(tmp_path):
    ct = shared_path("ircadb", "ircadb_p17_ct.nii.gz")
    seg = shared_path("ircadb", "ircadb_p17_label_liver1_tumor2.nii.gz")
    ct_img, seg_img = nib.load(ct), nib.load(seg)
    affine = ct_img.affine
    assert nib.aff2axcodes(affine)[:2] == ("L", "P")  # stored as read from DICOM
    # the same voxels stored RAS: reverse x and y, negate their columns, move the origin to the far corner
    ras = affine.copy()
    ras[:3, 3] += affine[:3, :2] @ (np.array(ct_img.shape[:2]) - 1.0)
    ras[:3, :2] *= -1.0
    assert nib.aff2axcodes(ras)[:2] == ("R", "A")
    ras_ct, ras_seg = tmp_path / "p17_ras_ct.nii", tmp_path / "p17_ras_seg.nii"
    save_nifti(ras_ct, np.asanyarray(ct_img.dataobj)[::-1, ::-1], ras)
    save_nifti(ras_seg, np.asanyarray(seg_img.dataobj)[::-1, ::-1], ras)
    settings = PrepareSettings(size=128)
    assert_same_slices(prepared_slices(ct, seg, settings), prepared_slices(ras_ct, ras_seg, settings))


def test_shift_liver_median_hu_centres_the_liver_and_keeps_meta():
    from transforms.intensity import ShiftLiverMedianHU, ShiftLiverMedianHUd

    hu = np.full((1, 8, 8, 3), -100.0, dtype=np.float32)
    label = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    label[0, 2:6, 2:6] = 1
    hu[label > 0] = 60.0
    label[0, 2, 2, 0] = 2  # a lesion voxel counts as liver
    img = MetaTensor(torch.as_tensor(hu), affine=torch.eye(4) * 2, meta={"filename_or_obj": "/data/ct.nii.gz"})
    out = ShiftLiverMedianHUd("image", reference_hu=100.0)({"image": img, "label": label})
    assert out["liver_median_shift_hu"] == 40.0
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "/data/ct.nii.gz"
    np.testing.assert_allclose(out["image"].numpy()[label > 0], 100.0)
    np.testing.assert_allclose(out["image"].numpy()[label == 0], -60.0)
    assert out["image"].dtype == torch.float32 and np.array_equal(img.numpy(), hu)  # input untouched
    with pytest.raises(InputDataError, match="no liver voxel") as info:
        ShiftLiverMedianHU()(img, np.zeros_like(label))
    assert "/data/ct.nii.gz" in str(info.value)
    with pytest.raises(InputDataError, match="liver mask shape"):
        ShiftLiverMedianHU()(img, label[:, :4])
