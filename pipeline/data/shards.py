"""A cohort over many machines: shard ``I`` of ``N`` of the case list, and the merge of prepared shards.

``--shard I/N`` (parsed by :func:`pipeline.common.arguments.parse_shard`; 0-based, as SLURM array and Kubernetes
indexed-job indices are) keeps every ``N``-th case of the list sorted by case id, starting at ``I``; every node
discovers the same list, so the shards are disjoint and together complete. A prepared shard folder holds ``cases/``
and ``shard.json`` (no manifest: the case-level splits need every case). :func:`merge_shards` links the shards' case
folders into one folder and writes the manifest a single run would have written, splits included.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pipeline.common.files import ensure_output_dir, inside_folder
from pipeline.data.manifest import write_manifest
from pipeline.data.prepare import SHARD_FORMAT, SHARD_NAME, replace_case_folder
from pipeline.data.settings import SplitSettings, prepare_settings_from_json
from transforms.errors import InputDataError

__all__ = ["select_shard", "merge_shards"]

T = TypeVar("T")


def select_shard(items: Sequence[T], index: int, count: int, key: Callable[[T], str]) -> list[T]:
    """Shard ``index`` of ``count``: every ``count``-th item of ``items`` sorted by ``key``, starting at ``index``."""
    ordered = sorted(items, key=key)
    return [item for k, item in enumerate(ordered) if k % count == index]


def merge_shards(out_dir: str | os.PathLike, shard_dirs: Sequence[str | os.PathLike], split: SplitSettings) -> dict:
    """Link (or copy, across file systems) every shard's case folders into ``out_dir/cases`` and write the manifest.

    Raises:
        InputDataError: a folder is not a prepared shard, shards are missing or given twice, their preparation
            settings differ, or two shards hold the same case.
    """
    documents = [_read_shard(Path(d)) for d in shard_dirs]
    counts = {doc["shard"][1] for doc in documents}
    indices = sorted(doc["shard"][0] for doc in documents)
    if len(counts) > 1 or indices != list(range(next(iter(counts)))):
        raise InputDataError(shard_dirs[0], f"the shard folders hold shards {indices} of "
                                            f"{' / '.join(str(c) for c in sorted(counts))}: some are missing, given "
                                            "twice or from another split of the cohort.",
                             "give every shard folder of one `--shard I/N` run, each once.")
    settings = documents[0]["settings"]
    for folder, doc in zip(shard_dirs, documents):
        if doc["settings"] != settings:
            raise InputDataError(folder, f"prepared with other settings than {shard_dirs[0]}: {doc['settings']} vs "
                                         f"{settings}.", "prepare every shard with the same options.")
    out = ensure_output_dir(out_dir)
    cases_dir = ensure_output_dir(out / "cases")
    infos, failures, origin = [], [], {}
    for folder, doc in zip(shard_dirs, documents):
        for case_id in doc["cases"]:
            if case_id in origin:
                raise InputDataError(folder, f"case {case_id!r} is also in {origin[case_id]}.",
                                     "merge the shards of one `--shard I/N` run.")
            origin[case_id] = folder
            infos.append(_link_case(Path(folder) / "cases" / case_id, cases_dir))
        failures += doc["failures"]
    failures.sort(key=lambda f: f["case_id"])
    return write_manifest(out, infos, failures, prepare_settings_from_json(settings), split)


def _read_shard(folder: Path) -> dict:
    try:
        doc = json.loads((folder / SHARD_NAME).read_bytes())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(folder, f"not a prepared shard: cannot read {SHARD_NAME} ({exc}).",
                             "run `python -m pipeline prepare --shard I/N --out FOLDER` for each shard first.") from exc
    if doc.get("format") != SHARD_FORMAT:
        raise InputDataError(folder / SHARD_NAME, f"not a hepafair shard file (format {doc.get('format')!r}).")
    return doc


def _link_case(source: Path, cases_dir: Path) -> dict:
    """Hard-link ``source`` (a finished case folder) into ``cases_dir`` atomically; return its ``case.json``."""
    try:
        info = json.loads((source / "case.json").read_bytes())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(source, f"the shard lists this case but its case.json cannot be read ({exc}).",
                             "prepare the shard again (finished cases are skipped).") from exc
    final = inside_folder(cases_dir, cases_dir / source.name)
    if final.resolve() == source.resolve():
        return info
    tmp = inside_folder(cases_dir, cases_dir / f".{source.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    replace_case_folder(cases_dir, tmp, final)
    return info


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)
