"""Case ids: one safe file name per case, unique within a dataset.

A case id becomes a folder name (``prepare``) and a file-name prefix (``infer``), so :func:`check_case_id` refuses
anything that is not one plain path component, :func:`case_id_from_name` makes a safe id from a file name, and
:func:`read_case_ids_unique` refuses an id used twice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from transforms.errors import InputDataError

__all__ = ["CASE_ID_MAX_LENGTH", "read_case_ids_unique", "check_case_id", "case_id_from_name"]

#: Longest case id accepted: it becomes a folder name and a file-name prefix.
CASE_ID_MAX_LENGTH = 128
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_CASE_ID_HINT = ("a case id must be one file name: letters, digits and . _ + - (not first), no folders, at most "
                 f"{CASE_ID_MAX_LENGTH} characters.")


def read_case_ids_unique(case_ids: Sequence[str], paths: Sequence[str | os.PathLike]) -> None:
    """Check that no case id is used twice (e.g. ``case_001.nii.gz`` in two folders of one dataset).

    Args:
        case_ids: one id per discovered case.
        paths: the file each id came from, same length as ``case_ids``.

    Raises:
        InputDataError: on the first repeated id, naming both files.
    """
    if len(case_ids) != len(paths):
        raise ValueError(f"got {len(case_ids)} case ids for {len(paths)} paths.")
    first_seen: dict[str, str | os.PathLike] = {}
    for case_id, path in zip(case_ids, paths):
        if case_id in first_seen:
            raise InputDataError(path, f"case id {case_id!r} is used by both {first_seen[case_id]} and {path}.",
                                 "rename one of the files or keep each dataset in its own folder.")
        first_seen[case_id] = path


def check_case_id(case_id: Any, source: str | os.PathLike | None = None) -> str:
    """Return ``case_id`` if it is safe as one path component, else raise.

    Case ids become folder names (``prepare``) and file-name prefixes (``infer``); one that held a separator, ``..``
    or an absolute path would make those writes land outside the output folder. Accepted: ``[A-Za-z0-9]`` first, then
    ``[A-Za-z0-9._+-]``, at most :data:`CASE_ID_MAX_LENGTH` characters.

    Raises:
        InputDataError: not a string, empty, too long, or with any other character (names ``source``).
    """
    if not isinstance(case_id, str):
        raise InputDataError(source, f"case id {case_id!r} is a {type(case_id).__name__}, not a string.", _CASE_ID_HINT)
    if len(case_id) > CASE_ID_MAX_LENGTH:
        raise InputDataError(source, f"case id {case_id[:40]!r}... is {len(case_id)} characters long.", _CASE_ID_HINT)
    if not _CASE_ID.fullmatch(case_id):
        raise InputDataError(source, f"case id {case_id!r} cannot be used as a file name.", _CASE_ID_HINT)
    return case_id


def case_id_from_name(name: str) -> str:
    """A safe case id (:func:`check_case_id`) made from a file name stem: every run of other characters becomes
    ``_``, leading ``._+-`` are dropped, the result is cut to :data:`CASE_ID_MAX_LENGTH` (``"case"`` if nothing is
    left). ``volume-12`` and ``ircadb_p17`` stay as they are."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).lstrip("._+-")[:CASE_ID_MAX_LENGTH]
    return safe or "case"
