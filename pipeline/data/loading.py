"""Loading prepared slices (the ``.npy`` pairs a manifest lists) as dictionaries for MONAI datasets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import CacheDataset
from monai.transforms import Compose, EnsureTyped, LoadImaged

from transforms.context import StackSliceContextd
from transforms.roi import LiverMasksd

__all__ = ["slice_dataset", "slice_loading"]


def slice_loading(extra: Sequence[Any] = ()) -> Compose:
    """Load a prepared slice: ``{"image": .npy, "label": .npy}`` -> image (1, S, S) float32 in [0, 1], label (1, S, S)
    uint8 (0/1/2), ``liver`` and ``lesion`` (1, S, S) float32 {0, 1}; then ``extra`` transforms.

    An entry with a ``context`` list (:func:`pipeline.data.context.with_slice_context`, 2.5D input) gets ``image``
    (k, S, S), the slice between its neighbours, and ``context_liver`` (k, S, S) (:class:`StackSliceContextd`);
    ``label``, ``liver`` and ``lesion`` stay the slice's own."""
    return Compose(
        [
            LoadImaged(keys=["image", "label"], reader="NumpyReader", image_only=True),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            EnsureTyped(keys="label", track_meta=False),
            LiverMasksd(keys="label"),
            StackSliceContextd(),
            *extra,
        ]
    )


def slice_dataset(entries: Sequence[dict], transform: Compose, cache: bool = True, **kwargs) -> CacheDataset:
    """A dataset of manifest slice entries; the deterministic loading prefix is cached in memory."""
    return CacheDataset(list(entries), transform, cache_rate=1.0 if cache else 0.0, progress=False, **kwargs)
