"""The random generators of a training process as one checkpointable object (:class:`RNGState`)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

from pipeline.train.runtime import is_rank_zero

__all__ = ["RNGState"]


def _numpy_state_to_dict(state: tuple) -> dict:
    """A legacy numpy ``RandomState.get_state()`` tuple as plain values and a tensor (``torch.load(weights_only)``
    refuses numpy arrays)."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_dict(state: Mapping) -> tuple:
    keys = torch.as_tensor(state["keys"]).cpu().numpy().astype(np.uint32)
    return state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])


def _randomizables(objects: Sequence[Any]) -> list[Randomizable]:
    """The MONAI ``Randomizable`` objects among ``objects`` and nested in them (attributes of transforms, the lists
    of a ``Compose``), each once, in a fixed depth-first order."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            children = obj
        elif isinstance(obj, (Transform, Randomizable)):
            if isinstance(obj, Randomizable):
                found.append(obj)
            children = list(vars(obj).values())
        else:
            return
        for child in children:
            visit(child)

    visit(list(objects))
    return found


class RNGState:
    """The random generators of a training process as one checkpointable object (``state_dict``/``load_state_dict``).

    Captures torch's CPU generator, the current CUDA device's generator (when CUDA is in use), numpy's global
    generator, Python's ``random``, and ``R`` (a numpy ``RandomState``) of every MONAI ``Randomizable`` in
    ``transforms`` or nested in them (e.g. ``RandLiverAnomalyd``, its ``RandLiverAnomaly`` and ``RandPerlinMask``;
    shared generators are simply stored once per holder). The generators are read when ``state_dict`` is called, not
    when this object is built, because MONAI's ``DataLoader`` gives transforms new ``RandomState`` objects.

    With ``num_workers > 0`` the workers' transforms are reseeded from torch's generator at every epoch, so restoring
    torch's state is what makes them continue. Under ``torch.distributed`` only rank 0's generators are saved; the
    other ranks keep the generators of their fresh start (``load_state_dict`` leaves them alone), so their draws stay
    different from rank 0's.

    ``state_dict()`` holds tensors and plain Python values only, so ``torch.load(..., weights_only=True)`` reads it.
    """

    def __init__(self, transforms: Sequence[Any] = ()) -> None:
        self.transforms = list(transforms)

    def state_dict(self) -> dict:
        """The current state of every generator (see the class docstring)."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if cuda else [],
            "numpy": _numpy_state_to_dict(np.random.get_state()),
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "transforms": [_numpy_state_to_dict(t.R.get_state()) for t in _randomizables(self.transforms)],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the generators from ``state_dict()`` output; a no-op on ranks > 0 under ``torch.distributed``.

        Raises ``ValueError`` when the number of randomizable transforms differs from the saved one (the training
        pipeline changed between the runs).
        """
        if not is_rank_zero():
            return
        randomizables = _randomizables(self.transforms)
        if len(state["transforms"]) != len(randomizables):
            raise ValueError(
                f"the checkpoint holds random states of {len(state['transforms'])} transforms, the training pipeline "
                f"has {len(randomizables)}: resume with the configuration the checkpoint was written with."
            )
        # map_location may have moved the byte tensors to a GPU; the setters want CPU tensors
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.as_tensor(state["cuda"][0]).cpu())
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        for transform, saved in zip(randomizables, state["transforms"]):
            transform.R.set_state(_numpy_state_from_dict(saved))
