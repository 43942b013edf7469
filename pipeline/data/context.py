"""2.5D input for prepared slices: each manifest entry learns which prepared files are its neighbours.

``prepare`` stores every liver slice of a case (``cases/<case>/sNNNN_image.npy``), so the neighbours of any slice of a
split -- also those a split leaves out, e.g. training's slices near a lesion -- are on disk. The neighbour rule is
:mod:`transforms.context`'s (spacing in mm, edge replication at the liver's ends), the same that inference applies to
a volume; :class:`transforms.context.StackSliceContextd` then loads them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nibabel.orientations import io_orientation

from transforms.context import context_indices, context_offsets
from transforms.errors import InputDataError

__all__ = ["case_slice_mm", "with_slice_context"]


def case_slice_mm(info: dict) -> float:
    """The axial slice spacing in mm of a prepared case (its ``case.json``): the length of the source voxel axis
    that orientation to the prepared axes puts last (the slicing axis)."""
    affine = np.asarray(info["roi"]["source_affine"], dtype=float)
    axis = int(np.flatnonzero(io_orientation(affine)[:, 0] == 2)[0])
    return float(np.linalg.norm(affine[:3, axis]))


def with_slice_context(entries: Sequence[dict], root: str | Path, context_slices: int,
                       context_mm: float = 3.0) -> list[dict]:
    """Copies of manifest ``entries`` (absolute ``image``/``label`` paths, ``case_id``, ``slice_index``) with a
    ``context`` list: ``{"image", "label"}`` of the ``2 n + 1`` slices the network sees, inferior to superior.

    ``context_slices`` = 0 returns the entries unchanged (plain 2D input). ``root`` is the prepared folder (the
    manifest's ``root``); each case's ``case.json`` gives its liver slices and slice spacing.

    Raises:
        InputDataError: a case's ``case.json`` is missing or unreadable, or an entry's slice is not one of its liver
            slices.
    """
    if int(context_slices) == 0:
        return list(entries)
    root = Path(root)
    neighbours: dict[str, dict[int, list[int]]] = {}
    out = []
    for entry in entries:
        case_id = str(entry["case_id"])
        if case_id not in neighbours:
            neighbours[case_id] = _case_neighbours(root / "cases" / case_id / "case.json", context_slices, context_mm)
        z = int(entry["slice_index"])
        if z not in neighbours[case_id]:
            raise InputDataError(entry["image"], f"slice {z} is not a prepared liver slice of case {case_id!r}.",
                                 "re-run `python -m pipeline prepare`.")
        folder = Path(entry["image"]).parent
        context = [{"image": str(folder / f"s{k:04d}_image.npy"), "label": str(folder / f"s{k:04d}_label.npy")}
                   for k in neighbours[case_id][z]]
        out.append({**entry, "context": context})
    return out


def _case_neighbours(path: Path, context_slices: int, context_mm: float) -> dict[int, list[int]]:
    """slice index -> the slice indices of its channels, for one prepared case."""
    try:
        info = json.loads(path.read_bytes())
        available = [int(s["slice_index"]) for s in info["slices"]]
        slice_mm = case_slice_mm(info)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise InputDataError(path, f"cannot read the case's slices and spacing ({exc}).",
                             "re-run `python -m pipeline prepare`.") from exc
    rows = context_indices(available, context_offsets(context_slices, context_mm, slice_mm))
    return {z: [int(k) for k in row] for z, row in zip(available, rows)}
