"""2.5D input: a slice together with its axial neighbours as channels (beyond the paper, quality lever "2.5D").

A lesion is a blob in 3D while a vessel is a tube: the slices above and below tell them apart where one slice cannot.
The network then sees ``k = 2 n + 1`` slices as channels, ordered from inferior to superior with the slice itself in
the middle, ``n`` on each side spaced ``context_mm`` apart (rounded to whole slices of the volume, at least one), so a
1.6 mm and a 3 mm volume give the network about the same anatomy. Neighbours come only from the *liver slices* of the
volume (those :func:`transforms.slicing.eligible_slices` keeps, which is what ``prepare`` stores); past the first or
last one the nearest liver slice stands in (edge replication), in training and in inference alike.

:func:`context_offsets` and :func:`context_indices` are the one definition of "which slices are the neighbours";
:class:`StackSliceContextd` loads them for prepared slices; :class:`pipeline.infer.slices.SliceInferer` gathers them
from a volume.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from transforms.errors import InputDataError

__all__ = [
    "SliceContext",
    "StackSliceContextd",
    "centre_channel",
    "context_indices",
    "context_offsets",
    "n_context_channels",
]


def n_context_channels(context_slices: int) -> int:
    """Channels of the network input with ``context_slices`` neighbours on each side: ``2 n + 1``."""
    if int(context_slices) != context_slices or context_slices < 0:
        raise ValueError(f"context_slices must be a non-negative integer, got {context_slices!r}.")
    return 2 * int(context_slices) + 1


def context_offsets(context_slices: int, context_mm: float, slice_mm: float) -> np.ndarray:
    """Slice offsets of the ``2 n + 1`` channels, e.g. ``[-2, 0, 2]`` for n = 1, 3 mm apart on a 1.6 mm volume.

    The step is ``round(context_mm / slice_mm)``, at least 1. In: ``slice_mm`` > 0, the volume's slice spacing.
    Out: (2 n + 1,) int64, ascending, 0 in the middle.
    """
    n = (n_context_channels(context_slices) - 1) // 2
    if not (np.isfinite(slice_mm) and slice_mm > 0):
        raise ValueError(f"the slice spacing must be a positive number of mm, got {slice_mm!r}.")
    if not (np.isfinite(context_mm) and context_mm > 0):
        raise ValueError(f"context_mm must be a positive number of mm, got {context_mm!r}.")
    step = max(1, int(round(float(context_mm) / float(slice_mm))))
    return np.arange(-n, n + 1, dtype=np.int64) * step


def context_indices(available: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray) -> np.ndarray:
    """For each slice of ``available`` (the liver slices of a volume), the slices its channels show.

    Channel ``j`` of slice ``z`` shows ``z + offsets[j]`` when that is a liver slice, else the liver slice nearest to
    it on the side of ``z`` (so a gap in the liver, or its top and bottom, repeat the closest slice that has liver).
    In: ``available`` (N,) distinct ints (any order), ``offsets`` (K,) ints. Out: (N, K) int64, rows in the order of
    ``available``; the column of offset 0 equals ``available``.
    """
    avail = np.asarray(available, dtype=np.int64).reshape(-1)
    sorted_avail = np.unique(avail)
    if len(sorted_avail) != len(avail):
        raise ValueError("context_indices needs distinct slice indices.")
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    target = avail[:, None] + offsets[None, :]
    # nearest liver slice between the centre and the target: the last one <= target for positive offsets, the first
    # one >= target for negative offsets (both exist: the centre itself qualifies)
    below = sorted_avail[np.clip(np.searchsorted(sorted_avail, target, side="right") - 1, 0, len(sorted_avail) - 1)]
    above = sorted_avail[np.clip(np.searchsorted(sorted_avail, target, side="left"), 0, len(sorted_avail) - 1)]
    return np.where(offsets[None, :] >= 0, below, above)


@dataclass(frozen=True)
class SliceContext:
    """What a model sees around a slice: ``slices`` neighbours on each side, ``mm`` apart (0 slices: plain 2D).

    Training records it in ``models/inference.json`` (``slice_context``); inference gathers the same neighbours.
    """

    slices: int = 0
    mm: float = 3.0

    def __post_init__(self) -> None:
        n_context_channels(self.slices)  # checks slices
        if not (np.isfinite(self.mm) and self.mm > 0):
            raise ValueError(f"the slice context's mm must be a positive number, got {self.mm!r}.")

    @property
    def channels(self) -> int:
        """Input channels of a network that sees this context: ``2 * slices + 1``."""
        return n_context_channels(self.slices)

    def offsets(self, slice_mm: float) -> np.ndarray:
        """The channels' slice offsets on a volume with slice spacing ``slice_mm`` (:func:`context_offsets`)."""
        return context_offsets(self.slices, self.mm, slice_mm)

    def to_json(self) -> dict:
        return {"slices": int(self.slices), "mm": float(self.mm)}

    @classmethod
    def from_json(cls, value: SliceContext | Mapping[str, Any] | None) -> SliceContext:
        """From ``{"slices", "mm"}`` (``inference.json``); None or absent keys: the defaults (plain 2D); a
        ``SliceContext`` is returned as it is."""
        if isinstance(value, SliceContext):
            return value
        value = dict(value or {})
        unknown = set(value) - {"slices", "mm"}
        if unknown:
            raise ValueError(f"unknown slice context keys {sorted(unknown)}; expected 'slices' and 'mm'.")
        return cls(int(value.get("slices", 0)), float(value.get("mm", 3.0)))


def centre_channel(x: torch.Tensor | np.ndarray, channel_dim: int = -3) -> torch.Tensor | np.ndarray:
    """The middle channel of a ``(..., C, H, W)`` stack (C odd), kept as a channel: ``(..., 1, H, W)``.

    For a 1-channel input this is the input itself (no copy).
    """
    c = x.shape[channel_dim]
    if c == 1:
        return x
    if c % 2 == 0:
        raise ValueError(f"a slice-context stack has an odd number of channels, got {c}.")
    index = [slice(None)] * x.ndim
    index[channel_dim] = slice(c // 2, c // 2 + 1)
    return x[tuple(index)]


class StackSliceContextd(MapTransform):
    """Load a prepared slice's neighbours and stack them as channels (2.5D input).

    Reads ``d[context_key]``: a list of ``{"image": path, "label": path}`` of the ``k`` slices (``.npy`` files written
    by ``prepare``, each (1, S, S) or (S, S)), in channel order, as :func:`pipeline.data.context.with_slice_context`
    writes it. Writes ``d[image_key]``: (k, S, S) float32 in [0, 1] (replacing the single slice) and
    ``d[liver_key]``: (k, S, S) float32 {0, 1}, each neighbour's own liver (label > 0), so a synthetic anomaly stays
    inside the liver on every channel. Without ``context_key`` in the dict nothing changes (plain 2D input).

    Raises:
        InputDataError: a neighbour file cannot be read or its shape differs from the others.
    """

    def __init__(self, context_key: str = "context", image_key: str = "image", liver_key: str = "context_liver",
                 allow_missing_keys: bool = True) -> None:
        super().__init__([context_key], allow_missing_keys)
        self.context_key, self.image_key, self.liver_key = context_key, image_key, liver_key

    @staticmethod
    def _load(path: str) -> np.ndarray:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputDataError(path, f"cannot read this neighbour slice ({exc}).",
                                 "re-run `python -m pipeline prepare` for its case.") from exc
        return array.reshape(array.shape[-2:]) if array.ndim == 3 and array.shape[0] == 1 else array

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.context_key not in d:
            return d
        entries = d[self.context_key]
        images = [self._load(e["image"]) for e in entries]
        labels = [self._load(e["label"]) for e in entries]
        shapes = {a.shape for a in images + labels}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise InputDataError(entries[0]["image"], f"the neighbour slices have shapes {sorted(shapes)}; "
                                 "expected one (S, S) shape.", "re-run `python -m pipeline prepare`.")
        d[self.image_key] = torch.as_tensor(np.stack(images).astype(np.float32, copy=False))
        d[self.liver_key] = torch.as_tensor((np.stack(labels) > 0).astype(np.float32))
        return d

