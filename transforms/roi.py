"""Liver masks and a fixed physical field of view around the liver.

Every slice of every volume leaves :class:`LiverROI` with the same millimetres per pixel, whatever the scanner's
spacing, so that a network trained on one dataset sees anatomy at the same scale in another.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.utils import TraceKeys, convert_to_tensor

from transforms.errors import InputDataError, file_of


class LiverMasks(Transform):
    """Binary liver and lesion masks from a label map with dataset-specific label values.

    The liver mask is the union of the liver *and* lesion values: tumours lie inside the liver, and a lesion at the
    liver edge must stay inside the region the model looks at.

    In: label of any shape, integer (or integral float) values. Out: ``(liver, lesion)``, float32 {0, 1} tensors of
    the same shape.
    """

    def __init__(self, liver_values: Sequence[int] = (1,), lesion_values: Sequence[int] = (2,)) -> None:
        if len(liver_values) == 0:
            raise ValueError("liver_values must name at least one label value")
        self.liver_values = tuple(int(v) for v in liver_values)
        self.lesion_values = tuple(int(v) for v in lesion_values)

    def __call__(self, label) -> tuple[torch.Tensor, torch.Tensor]:
        liver, lesion = self.boolean(label)
        return liver.float(), lesion.float()

    def boolean(self, label) -> tuple[torch.Tensor, torch.Tensor]:
        """``(liver, lesion)`` as bool tensors of the label's shape (a quarter of the memory of float32)."""
        # as stored: MONAI's convert_to_numpy would make a C-contiguous copy of a Fortran-ordered NIfTI volume
        lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        # A few numpy equality tests beat torch.isin (and torch's own ==) on large uint8/int16 volumes severalfold.
        # one new array per mask and no temporaries: fresh memory (page faults) dominates the cost on large volumes
        scratch = np.empty_like(lab, dtype=bool)  # in lab's memory order: mixed orders make numpy ~50x slower

        def union(values: Sequence[int], out: np.ndarray) -> np.ndarray:
            for v in values:
                np.logical_or(out, np.equal(lab, v, out=scratch), out=out)
            return out

        lesion = union(self.lesion_values, np.zeros_like(lab, dtype=bool))
        liver = union(self.liver_values, lesion.copy(order="K"))
        return torch.from_numpy(liver), torch.from_numpy(lesion)


class LiverROIResult(NamedTuple):
    """What :class:`LiverROI` returns; arrays are channel-first ``(1, S, S, Z)``."""

    image: torch.Tensor  # float32, the input intensities resampled; 0 outside the liver when masking
    liver: torch.Tensor  # float32 {0, 1}
    lesion: torch.Tensor  # float32 {0, 1}, inside ``liver``
    liver_voxels: np.ndarray  # (Z,) int64, liver voxels per slice counted on the native grid
    lesion_voxels: np.ndarray  # (Z,) int64, lesion voxels per slice counted on the native grid
    roi_affine: np.ndarray  # 4x4: ROI voxel -> world (mm), from the input affine
    box: tuple[int, int, int, int]  # native in-plane crop [x0, x1) x [y0, y1); may reach outside the image


#: Largest block of native-resolution slices LiverROI resamples at once (bytes).
ROI_BLOCK_BYTES = 512 * 2**20


class LiverROI(Transform):
    """Crop a fixed physical in-plane field centred on the volume's liver and resample it to ``size`` x ``size``.

    The field is ``field_mm`` wide in both in-plane axes, centred on the centre of the liver's bounding box over the
    whole volume (so all slices of a volume share one crop), padded with zeros where it leaves the image. The crop
    is resampled by area averaging when shrinking (bilinear when enlarging); masks are resampled the same way and
    thresholded at 0.5.
    Slices (the last axis) are never resampled. Per-slice liver/lesion voxel counts are taken on the native grid so
    that even a one-voxel liver slice is counted, whatever the output resolution.

    In: ``image`` (1, X, Y, Z) float (typically HU-windowed to [0, 1]); ``label`` (1, X, Y, Z) integer label map on the
    same grid; ``spacing`` (sx, sy) in mm, or taken from ``image``'s affine when it is a MetaTensor.
    Out: :class:`LiverROIResult` with (1, size, size, Z) float32 tensors; the image keeps its value range.

    Raises :class:`InputDataError` when the label holds no liver voxel.
    """

    def __init__(
        self,
        liver_values: Sequence[int] = (1,),
        lesion_values: Sequence[int] = (2,),
        field_mm: float = 300.0,
        size: int = 256,
        mask_outside: bool = True,
    ) -> None:
        if field_mm <= 0 or size <= 0:
            raise ValueError(f"field_mm and size must be positive, got {field_mm}, {size}")
        self.masks = LiverMasks(liver_values, lesion_values)
        self.field_mm = float(field_mm)
        self.size = int(size)
        self.mask_outside = mask_outside

    def __call__(self, image, label, spacing: Sequence[float] | None = None) -> LiverROIResult:
        affine = np.asarray(image.affine, dtype=np.float64) if isinstance(image, MetaTensor) else np.eye(4)
        if spacing is None:
            spacing = np.linalg.norm(affine[:3, :2], axis=0)
        sx, sy = float(spacing[0]), float(spacing[1])
        img = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
        # Whole-volume masks stay bool: they are only counted and cropped, and only the crop becomes float.
        liver, lesion = self.masks.boolean(label)
        if img.ndim != 4 or img.shape[0] != 1 or img.shape != liver.shape:
            raise ValueError(f"LiverROI expects image and label of shape (1, X, Y, Z), got {img.shape}, {liver.shape}")
        # numpy counts and reduces bool volumes ~10x faster than torch on CPU (torch widens bool to int64 first)
        liver_voxels = np.count_nonzero(liver[0].numpy(), axis=(0, 1))
        if liver_voxels.sum() == 0:
            raise InputDataError(
                file_of(label),
                "the label holds no liver voxel (looked for values "
                f"{self.masks.liver_values + self.masks.lesion_values}).",
                "check the dataset preset or pass the right --liver-values / --lesion-values.",
            )
        lesion_voxels = np.count_nonzero(lesion[0].numpy(), axis=(0, 1))

        # The centre of the liver's in-plane bounding box, in continuous voxel coordinates.
        footprint = liver[0].numpy().any(axis=2)  # (X, Y): the liver projected along the slices
        any_x = np.flatnonzero(footprint.any(axis=1))
        any_y = np.flatnonzero(footprint.any(axis=0))
        cx, cy = (int(any_x[0]) + int(any_x[-1]) + 1) / 2.0, (int(any_y[0]) + int(any_y[-1]) + 1) / 2.0
        w, h = max(1, round(self.field_mm / sx)), max(1, round(self.field_mm / sy))
        x0, y0 = round(cx - w / 2.0), round(cy - h / 2.0)
        box = (x0, x0 + w, y0, y0 + h)

        # Copy the part of the field that lies inside the image into a zero block laid out as a batch of slices
        # (k, 3, w, h): one pass over the crop instead of concatenating, padding and permuting whole volumes. The
        # block holds at most ROI_BLOCK_BYTES: a fine grid (0.1 mm pixels make a 300 mm field 3000 pixels wide) is
        # resampled a few slices at a time instead of allocating gigabytes.
        X, Y, Z = img.shape[1:]
        sx0, sx1, sy0, sy1 = max(x0, 0), min(x0 + w, X), max(y0, 0), min(y0 + h, Y)
        per_slice = 3 * w * h * 4
        step = max(1, min(Z, ROI_BLOCK_BYTES // per_slice))
        padded = (sx0, sx1, sy0, sy1) != (x0, x0 + w, y0, y0 + h)
        crop = img[0].numpy()[sx0:sx1, sy0:sy1, :]
        # the block's intensity range, for the clamp below: the crop's, and 0 where the field leaves the image
        low = torch.tensor(min(float(crop.min()), 0.0) if padded else float(crop.min()))
        high = torch.tensor(max(float(crop.max()), 0.0) if padded else float(crop.max()))
        stack = torch.empty((Z, 3, self.size, self.size), dtype=torch.float32) if step < Z else None
        for z0 in range(0, Z, step):
            block = torch.zeros((min(step, Z - z0), 3, w, h), dtype=torch.float32)
            block_np = block.numpy()  # same memory; numpy's transposing copy (and bool -> float cast) is ~2x torch's
            for c, vol in enumerate((img, liver, lesion)):
                part = vol[0].numpy()[sx0:sx1, sy0:sy1, z0 : z0 + step].transpose(2, 0, 1)
                block_np[:, c, sx0 - x0 : sx1 - x0, sy0 - y0 : sy1 - y0] = part
            if (w, h) != (self.size, self.size):
                # Area averaging is the antialiasing filter when shrinking (and far cheaper than antialiased
                # bilinear); when enlarging it would be nearest-neighbour, so bilinear is used instead.
                mode = "area" if w >= self.size and h >= self.size else "bilinear"
                extra = {} if mode == "area" else {"align_corners": False}
                block = F.interpolate(block, size=(self.size, self.size), mode=mode, **extra)
                # Both modes mix the inputs convexly, but float32 rounding can leave their range by an ulp.
                block[:, 0].clamp_(low, high)
            if stack is None:
                stack = block
            else:
                stack[z0 : z0 + step] = block
        # (3, S, S, Z) as a view of the slices-first buffer: AxialSlicesd moves the slices first again for free.
        out = stack.permute(1, 2, 3, 0)
        roi_image, roi_liver = out[0:1], (out[1:2] > 0.5).float()
        roi_lesion = (out[2:3] > 0.5).float() * roi_liver
        if self.mask_outside:
            roi_image = roi_image * roi_liver

        # ROI voxel (u, v, k) sits at native voxel (x0 - 0.5 + (u + 0.5) w / S, y0 - 0.5 + (v + 0.5) h / S, k).
        scale = np.diag([w / self.size, h / self.size, 1.0, 1.0])
        scale[0, 3] = x0 - 0.5 + 0.5 * w / self.size
        scale[1, 3] = y0 - 0.5 + 0.5 * h / self.size
        roi_affine = affine @ scale
        return LiverROIResult(roi_image, roi_liver, roi_lesion, liver_voxels, lesion_voxels, roi_affine, box)


def roi_to_source(roi_map: torch.Tensor, box: Sequence[int], source_shape: Sequence[int]) -> torch.Tensor:
    """Put maps on the ROI grid back on the source grid: the geometric inverse of :class:`LiverROI`.

    Each slice is resampled to the native crop size ``(w, h)`` of ``box`` (bilinear, ``align_corners=False``, the
    sampling positions of the ROI affine) and pasted at the box in a zero volume; parts of the box outside the image
    are dropped. Slices are not resampled (LiverROI never does).

    In: ``roi_map`` (C, S, S, Z) float; ``box`` ``(x0, x1, y0, y1)`` as :class:`LiverROIResult` holds it;
    ``source_shape`` ``(X, Y, Z)``. Out: (C, X, Y, Z) float32 tensor on ``roi_map``'s device, the same value range,
    laid out with X fastest (like the NIfTI volume it came from) so that writing it needs no transposing copy.
    """
    x0, x1, y0, y1 = (int(v) for v in box)
    sx, sy, sz = (int(v) for v in source_shape)
    if roi_map.ndim != 4 or roi_map.shape[-1] != sz:
        raise ValueError(f"roi_map must be (C, S, S, {sz}), got {tuple(roi_map.shape)}.")
    channels, w, h = roi_map.shape[0], x1 - x0, y1 - y0
    stack = roi_map.float().permute(0, 3, 1, 2).reshape(-1, 1, *roi_map.shape[1:3])  # (C*Z, 1, S, S): a batch
    if stack.shape[-2:] != (w, h):
        stack = F.interpolate(stack, size=(w, h), mode="bilinear", align_corners=False)
    stack = stack.reshape(channels, sz, w, h)
    out = torch.zeros((channels, sz, sy, sx), dtype=torch.float32, device=roi_map.device)  # (C, Z, Y, X)
    cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, sx), max(y0, 0), min(y1, sy)
    if cx0 < cx1 and cy0 < cy1:
        out[:, :, cy0:cy1, cx0:cx1] = stack[:, :, cx0 - x0 : cx1 - x0, cy0 - y0 : cy1 - y0].transpose(2, 3)
    return out.permute(0, 3, 2, 1)


class LiverROId(MapTransform, InvertibleTransform):
    """Dictionary twin of :class:`LiverROI`, invertible on ``keys``.

    Reads ``d[key]`` (CT, (1, X, Y, Z), typically windowed to [0, 1]) and ``d[label_key]`` (the dataset's label map on
    the same grid). Writes, all on the ROI grid (1, size, size, Z):

    - ``d[key]``: float32 MetaTensor whose affine maps ROI voxels to world mm (0 outside the liver when masking);
    - ``d[label_key]``: uint8 label in the project's own convention (0 background, 1 liver, 2 lesion);
    - ``d[liver_key]``, ``d[lesion_key]``: float32 {0, 1} masks;
    - ``d[liver_voxels_key]``, ``d[lesion_voxels_key]``: (Z,) int64 per-slice counts on the native grid;
    - ``d[roi_key]``: a dict with the native ``box``, ``source_shape``, ``field_mm``, ``size``, ``mm_per_pixel`` and
      ``source_affine``, enough to put a map computed on the ROI back on the input grid.

    The crop is recorded in ``d[key].applied_operations``, so that :meth:`inverse` (and MONAI's ``Invertd`` through
    a ``Compose`` holding this transform) puts a map on the ROI grid carrying that record back on the source grid
    (:func:`roi_to_source`) with the source affine.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str = "label",
        liver_values: Sequence[int] = (1,),
        lesion_values: Sequence[int] = (2,),
        field_mm: float = 300.0,
        size: int = 256,
        mask_outside: bool = True,
        liver_key: str = "liver",
        lesion_key: str = "lesion",
        liver_voxels_key: str = "liver_voxels",
        lesion_voxels_key: str = "lesion_voxels",
        roi_key: str = "roi",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.roi = LiverROI(liver_values, lesion_values, field_mm, size, mask_outside)
        self.label_key, self.liver_key, self.lesion_key = label_key, liver_key, lesion_key
        self.liver_voxels_key, self.lesion_voxels_key, self.roi_key = liver_voxels_key, lesion_voxels_key, roi_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            r = self.roi(image, d[self.label_key])
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            meta.pop("affine", None)
            src_affine = image.affine if isinstance(image, MetaTensor) else torch.eye(4)
            # what inverse() needs: the crop box and the source grid's affine (its shape is the recorded orig_size).
            # meta["spatial_shape"] stays the loaded shape, as MONAI's own spatial transforms leave it: MONAI Label's
            # Restored and the writers read it as the shape to restore.
            extra_info = {"box": list(r.box), "source_affine": np.asarray(src_affine, dtype=np.float64)}
            operations = list(image.applied_operations) if isinstance(image, MetaTensor) else []
            d[key] = MetaTensor(r.image, affine=torch.as_tensor(r.roi_affine), meta=meta, applied_operations=operations)
            self.push_transform(d[key], orig_size=tuple(int(n) for n in image.shape[1:]), extra_info=extra_info)
            d[self.label_key] = (r.liver + r.lesion).to(torch.uint8)
            d[self.liver_key], d[self.lesion_key] = r.liver, r.lesion
            d[self.liver_voxels_key], d[self.lesion_voxels_key] = r.liver_voxels, r.lesion_voxels
            d[self.roi_key] = {
                "box": list(r.box),
                "source_shape": [int(s) for s in image.shape[1:]],
                "field_mm": self.roi.field_mm,
                "size": self.roi.size,
                "mm_per_pixel": [float(v) for v in np.linalg.norm(r.roi_affine[:3, :2], axis=0)],
                "source_affine": np.asarray(src_affine, dtype=np.float64).tolist(),
            }
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict:
        """``d[key]`` (C, S, S, Z) on the ROI grid, carrying this transform's record, back on the source grid:
        (C, X, Y, Z) float32 with the source affine (the other keys are left as they are)."""
        d = dict(data)
        for key in self.key_iterator(d):
            roi_map = d[key]
            if not isinstance(roi_map, MetaTensor):
                raise ValueError(f"LiverROId.inverse needs d[{key!r}] as a MetaTensor holding applied_operations.")
            xform = self.pop_transform(roi_map)
            extra = xform[TraceKeys.EXTRA_INFO]
            source = MetaTensor(roi_to_source(roi_map.as_tensor(), extra["box"], xform[TraceKeys.ORIG_SIZE]))
            source.copy_meta_from(roi_map)
            source.affine = torch.as_tensor(np.asarray(extra["source_affine"]), dtype=torch.float64)
            d[key] = source
        return d


class LiverMasksd(MapTransform):
    """Dictionary twin of :class:`LiverMasks`: ``d[key]`` label map -> ``d[liver_key]``, ``d[lesion_key]``.

    In: label of any shape (e.g. (1, H, W) slices in the project's convention 1 liver, 2 lesion, the defaults).
    Out: float32 {0, 1} tensors of the same shape; the label itself is left as it is.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        liver_values: Sequence[int] = (1,),
        lesion_values: Sequence[int] = (2,),
        liver_key: str = "liver",
        lesion_key: str = "lesion",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.masks = LiverMasks(liver_values, lesion_values)
        self.liver_key, self.lesion_key = liver_key, lesion_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.liver_key], d[self.lesion_key] = self.masks(d[key])
        return d
