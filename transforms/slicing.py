"""3D volume -> 2D axial slices: every liver slice (preprocessing) or one random normal slice (training)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor


def eligible_slices(
    liver_voxels: np.ndarray,
    lesion_voxels: np.ndarray | None = None,
    min_liver_area: int = 1,
    exclude_lesion: bool = False,
    lesion_margin: int = 0,
) -> np.ndarray:
    """Indices of slices with at least ``min_liver_area`` liver voxels.

    With ``exclude_lesion``, slices holding a lesion and the ``lesion_margin`` slices on either side of one are left
    out: tumour borders are fuzzy along z, and the slice next to a labelled tumour is rarely a clean normal.
    In: (Z,) voxel counts. Out: sorted int64 indices.
    """
    liver_voxels = np.asarray(liver_voxels)
    keep = liver_voxels >= min_liver_area
    if exclude_lesion and lesion_voxels is not None:
        has = np.asarray(lesion_voxels) > 0
        # "full" then centre-crop: mode="same" returns max(Z, kernel) values when the margin outruns a short volume
        full = np.convolve(has.astype(np.int64), np.ones(2 * lesion_margin + 1, dtype=np.int64), mode="full")
        near = full[lesion_margin : lesion_margin + len(has)] > 0
        keep &= ~near
    return np.nonzero(keep)[0].astype(np.int64)


class AxialSlicesd(MapTransform):
    """One dictionary per liver slice of a volume.

    In: ``d[key]`` channel-first volumes (C, H, W, Z) for each key (e.g. image, label, liver, lesion, as written by
    :class:`~transforms.roi.LiverROId`), plus per-slice native voxel counts ``d[liver_voxels_key]`` and
    ``d[lesion_voxels_key]`` ((Z,) ints; computed from ``liver_key``/``lesion_key`` when absent).
    Out: a list of dicts, one per slice with ``liver_voxels >= min_liver_area``, each holding every key as a plain
    tensor (C, H, W) (dtype kept), and ``case_id`` (copied from ``d[case_id_key]`` if present), ``slice_index``
    (int, index along Z of the input), ``liver_area`` and ``lesion_area`` (native voxels), ``has_lesion`` (0/1).
    MONAI's ``Compose`` applies following transforms to every item of the list.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label", "liver", "lesion"),
        min_liver_area: int = 1,
        liver_key: str = "liver",
        lesion_key: str = "lesion",
        liver_voxels_key: str = "liver_voxels",
        lesion_voxels_key: str = "lesion_voxels",
        case_id_key: str = "case_id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_liver_area = int(min_liver_area)
        self.liver_key, self.lesion_key = liver_key, lesion_key
        self.liver_voxels_key, self.lesion_voxels_key = liver_voxels_key, lesion_voxels_key
        self.case_id_key = case_id_key

    def _counts(self, d: Mapping[Hashable, object]) -> tuple[np.ndarray, np.ndarray]:
        def count(count_key: str, mask_key: str) -> np.ndarray:
            if count_key in d:
                return np.asarray(d[count_key]).astype(np.int64)
            mask = convert_to_tensor(d[mask_key], track_meta=False)
            return (mask > 0).sum(dim=tuple(range(mask.ndim - 1))).long().numpy()

        return count(self.liver_voxels_key, self.liver_key), count(self.lesion_voxels_key, self.lesion_key)

    def slice_item(
        self, data: Mapping[Hashable, object], z: int, liver_voxels, lesion_voxels, volumes: dict | None = None
    ) -> dict:
        """The dictionary of slice ``z``: every key's (C, H, W) slice plus the per-slice fields.

        ``volumes`` (key -> (Z, C, H, W) slices-first tensors) lets a caller that takes many slices transpose each
        volume once: copying a slice out of the last axis is a strided gather, about 10x slower per slice.
        """
        if volumes is None:
            volumes = {
                key: convert_to_tensor(data[key], track_meta=False)[..., z : z + 1].movedim(-1, 0)
                for key in self.key_iterator(data)
            }
            z_in = 0
        else:
            z_in = z
        item = {key: vol[z_in].clone() for key, vol in volumes.items()}
        if self.case_id_key in data:
            item[self.case_id_key] = data[self.case_id_key]
        item.update(
            slice_index=int(z),
            liver_area=int(liver_voxels[z]),
            lesion_area=int(lesion_voxels[z]),
            has_lesion=int(lesion_voxels[z] > 0),
        )
        return item

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        liver_voxels, lesion_voxels = self._counts(data)
        volumes = {
            key: convert_to_tensor(data[key], track_meta=False).movedim(-1, 0).contiguous()
            for key in self.key_iterator(data)
        }
        return [
            self.slice_item(data, z, liver_voxels, lesion_voxels, volumes)
            for z in eligible_slices(liver_voxels, min_liver_area=self.min_liver_area)
        ]


class RandAxialSliced(RandomizableTransform, MapTransform):
    """Pick one random liver slice of a volume, for training straight from volumes (no prepare step).

    Same inputs as :class:`AxialSlicesd`; out: one dict like an item of its list. With ``exclude_lesion`` (default)
    only normal slices are drawn: no lesion on the slice nor within ``lesion_margin`` slices of one. A volume with no
    eligible slice gives its first liver slice with ``has_lesion`` set honestly, rather than failing mid-epoch.
    Randomness: only ``self.R``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label", "liver", "lesion"),
        min_liver_area: int = 1,
        exclude_lesion: bool = True,
        lesion_margin: int = 0,
        **slicer_kwargs,
    ) -> None:
        MapTransform.__init__(self, keys, slicer_kwargs.pop("allow_missing_keys", False))
        RandomizableTransform.__init__(self, prob=1.0)
        self.slicer = AxialSlicesd(keys, min_liver_area=min_liver_area, **slicer_kwargs)
        self.exclude_lesion, self.lesion_margin = exclude_lesion, int(lesion_margin)
        self._index = 0

    def randomize(self, candidates: Sequence[int]) -> None:
        self._index = int(candidates[self.R.randint(len(candidates))])

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        liver_voxels, lesion_voxels = self.slicer._counts(data)
        candidates = eligible_slices(
            liver_voxels, lesion_voxels, self.slicer.min_liver_area, self.exclude_lesion, self.lesion_margin
        )
        if len(candidates) == 0:
            candidates = eligible_slices(liver_voxels, min_liver_area=1)[:1]
        self.randomize(candidates)
        return self.slicer.slice_item(data, self._index, liver_voxels, lesion_voxels)


def stack_slices(items: Sequence[Mapping[Hashable, object]], key: str) -> torch.Tensor:
    """Stack ``key`` of per-slice dicts into one (N, C, H, W) tensor (for figures, baselines, evaluation)."""
    return torch.stack([convert_to_tensor(it[key], track_meta=False) for it in items])
