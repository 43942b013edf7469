"""Safe output: every file the pipeline writes goes through :func:`atomic_write`.

The data are written to a temporary name in the same folder, flushed to disk, then moved into place with
``os.replace``, so an interrupted run never leaves a half-written output behind. :func:`inside_folder` is the last
check before anything is written, renamed or removed; :func:`atomic_write_json` writes strict JSON (numpy/torch
values and paths made plain, NaN/Inf as ``null``). Problems are raised as :class:`transforms.errors.InputDataError`
naming the path and a fix.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transforms.errors import InputDataError

__all__ = [
    "inside_folder",
    "ensure_output_dir",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
]


def inside_folder(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` if it resolves to a place strictly inside ``folder`` (links followed), else raise ``InputDataError``:
    the last line of defence before anything is written, renamed or removed."""
    root, target = Path(folder).resolve(), Path(path).resolve()
    if target == root or root not in target.parents:
        raise InputDataError(path, f"refusing to write outside the output folder {root}.",
                             "check the case id and the output folder.")
    return Path(path)


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create an output folder (with parents) if needed and check that it can be written to.

    Raises:
        InputDataError: the path is an existing file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputDataError(path, "output path exists and is a file, not a folder.",
                             "choose another output folder or remove the file.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputDataError(path, f"cannot create the output folder ({exc.strerror}).",
                             "choose an output folder in a writable location.") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputDataError(path, "output folder is not writable.", "choose another output folder or fix its "
                                                                     "permissions.")
    return path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write_fn`` writes a temporary file in the same folder, which then replaces ``path``.

    The temporary name keeps the target's suffixes (``.nii.gz`` stays last), so writers that choose the format from
    the extension work. On any error the temporary file is removed and ``path`` is left untouched.

    Args:
        path: the final file; its folder must exist (see :func:`ensure_output_dir`).
        write_fn: called once with the temporary path; must create that file.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        InputDataError: the folder is missing, or writing/replacing fails with an OS error (disk full, permissions,
            ``path`` is a folder). Other exceptions from ``write_fn`` propagate unchanged.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputDataError(path, "cannot write: the output folder does not exist.",
                             "create it first (ensure_output_dir) or choose another output path.")
    temp = path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")
    try:
        write_fn(temp)
        # flush to disk before the rename, otherwise a crash could leave a complete name with incomplete content
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        raise InputDataError(path, f"cannot write the file ({exc.strerror or exc}).",
                             "check free disk space and permissions of the output folder.") from exc
    finally:
        temp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as strict UTF-8 JSON with a trailing newline: numpy/torch scalars and arrays and paths
    become plain JSON values, and undefined numbers (NaN, +-Inf) become ``null``, so strict readers accept every
    file the project writes."""
    plain = _non_finite_to_none(json.loads(json.dumps(obj, default=_json_default)))
    text = json.dumps(plain, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def _non_finite_to_none(obj: Any) -> Any:
    """``obj`` (parsed JSON) with every NaN and +-Inf float replaced by None."""
    if isinstance(obj, dict):
        return {k: _non_finite_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_non_finite_to_none(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    """``json.dumps``' fallback: tensors and numpy values as plain lists/numbers, paths as strings."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
