"""Raw CT volumes -> cached liver slices + a manifest with case-level splits (nnU-Net style: resumable, atomic).

Output folder::

    OUT/manifest.json                 MONAI-datalist-compatible: "training" / "validation" / "test" slice lists
    OUT/cases/<case_id>/case.json     written last: a case folder exists only when complete
    OUT/cases/<case_id>/sNNNN_image.npy   (1, S, S) float32 in [0, 1], 0 outside the liver
    OUT/cases/<case_id>/sNNNN_label.npy   (1, S, S) uint8: 0 background, 1 liver, 2 lesion

Each case is built in a hidden temporary folder and renamed into place, so a killed run leaves no half-written case;
re-running skips finished cases whose settings match and rebuilds the rest. Slice indices count along the
superior axis after orientation to RAS.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.common.case_ids import check_case_id
from pipeline.common.files import atomic_write_json, ensure_output_dir, inside_folder
from pipeline.common.io import load_case
from pipeline.common.parallel import map_cases
from pipeline.data.datasets import CaseRecord
from pipeline.data.manifest import write_manifest
from pipeline.data.settings import PrepareSettings, SplitSettings, volume_transform
from transforms.slicing import AxialSlicesd

SHARD_FORMAT, SHARD_NAME = "hepafair-prepare-shard/1", "shard.json"


# case.json layout: 2 = every liver slice is stored whatever --min-liver-area (the manifest applies it), so 2.5D
# neighbours come from the same slices as at inference; folders of layout 1 (no "layout" key) are rebuilt.
CASE_LAYOUT = 2


def _case_is_current(case_dir: Path, record: CaseRecord, settings: PrepareSettings) -> dict | None:
    try:
        info = json.loads((case_dir / "case.json").read_bytes())
    except (OSError, json.JSONDecodeError):
        return None
    same_source = info.get("source") == record.to_json()
    current = same_source and info.get("settings") == settings.to_json() and info.get("layout") == CASE_LAYOUT
    return info if current else None


def prepare_case(record: CaseRecord, settings: PrepareSettings, cases_dir: Path) -> dict:
    """Preprocess one volume into ``cases_dir/<case_id>/`` atomically; return its ``case.json`` content."""
    final = cases_dir / record.case_id
    current = _case_is_current(final, record, settings)
    if current is not None:
        return current
    data = load_case(record.image, record.label, record.liver_values, record.lesion_values, record.series_uid)
    series_uid = data["image"].meta.get("series_uid")
    data["case_id"] = record.case_id
    vol = volume_transform(settings, record.liver_values, record.lesion_values)(data)
    # every slice with liver (or every slice, for --min-liver-area 0): a 2.5D model's neighbours are liver slices at
    # inference too (transforms.context); the manifest keeps only slices with min_liver_area for the splits
    items = AxialSlicesd(keys=("image", "label"), min_liver_area=min(settings.min_liver_area, 1))(vol)

    info = {
        "case_id": record.case_id,
        "layout": CASE_LAYOUT,
        "source": record.to_json(),
        "settings": settings.to_json(),
        "roi": vol["roi"],
        "n_volume_slices": int(vol["image"].shape[-1]),
        "liver_voxels": [int(v) for v in vol["liver_voxels"]],
        "lesion_voxels": [int(v) for v in vol["lesion_voxels"]],
        "has_lesion": bool(np.asarray(vol["lesion_voxels"]).sum() > 0),
    }
    if series_uid is not None:
        info["series_uid"] = series_uid
    if "liver_median_shift_hu" in vol:
        info["liver_median_shift_hu"] = round(float(vol["liver_median_shift_hu"]), 2)
    fields = ("slice_index", "liver_area", "lesion_area", "has_lesion")
    slices = (({k: it[k] for k in fields}, it["image"].numpy(), it["label"].numpy()) for it in items)
    return write_case(cases_dir, record.case_id, slices, info)


def write_case(
    cases_dir: Path, case_id: str, slices: Iterable[tuple[dict, np.ndarray, np.ndarray]], info: dict
) -> dict:
    """Write one case folder atomically and return its ``case.json`` content (``info`` + the ``slices`` table).

    ``slices`` yields ``(fields, image, label)``: ``fields`` holds at least ``slice_index``; image (1, S, S) is saved
    as float32, label (1, S, S) as uint8. Everything goes into a hidden temporary folder, ``case.json`` last; the
    folder is then renamed into place (a stale one moved aside first), so a case folder exists only when complete.
    """
    check_case_id(case_id)
    # a case id is one safe name (datasets.CaseRecord checks it); these keep every rename/removal below inside
    final = inside_folder(cases_dir, cases_dir / case_id)
    tmp = inside_folder(cases_dir, cases_dir / f".{case_id}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = []
    try:
        for fields, image, label in slices:
            z = fields["slice_index"]
            np.save(tmp / f"s{z:04d}_image.npy", np.asarray(image, dtype=np.float32))
            np.save(tmp / f"s{z:04d}_label.npy", np.asarray(label, dtype=np.uint8))
            table.append(dict(fields))
        info = {**info, "slices": table}
        atomic_write_json(tmp / "case.json", info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_case_folder(cases_dir, tmp, final)
    return info


def replace_case_folder(cases_dir: Path, tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final`` (both in ``cases_dir``), a stale ``final`` moved aside first
    and removed after, so that ``final`` is never half-written."""
    old = inside_folder(cases_dir, cases_dir / f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prepare(
    records: Sequence[CaseRecord],
    out_dir: str | Path,
    settings: PrepareSettings = PrepareSettings(),
    split: SplitSettings = SplitSettings(),
    strict: bool = False,
    progress: bool = True,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Preprocess ``records`` into ``out_dir`` and write ``out_dir/manifest.json``; return the manifest.

    A case that fails (bad input) is recorded under ``"failures"`` and the others go on, unless ``strict``,
    which re-raises the first error. Callers decide the exit status from ``manifest["failures"]``.

    Args:
        workers: cases prepared at once, in a process pool (:func:`pipeline.common.parallel.map_cases`); the case
            folders and the manifest are byte-identical for any number.
        shard: ``(I, N)``: ``records`` is shard I of N of a cohort (:func:`pipeline.data.shards.select_shard`); the
            folder then gets ``shard.json`` instead of a manifest (splits need every case:
            :func:`merge_shards` builds the manifest).
    """
    out = ensure_output_dir(out_dir)
    cases_dir = ensure_output_dir(out / "cases")
    # Left by a killed run: a case being built or swapped out, a manifest being written.
    for stale in (*cases_dir.glob(".*.tmp-*"), *cases_dir.glob(".*.old-*"), *out.glob(".tmp-*-manifest.json")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="prepare", unit="volume", file=sys.stderr)

    def done(k: int, info: dict | None, error: BaseException | None) -> None:
        if bar is not None:
            bar.set_postfix_str(records[k].case_id)
            bar.update()

    try:
        results = map_cases(partial(prepare_case, settings=settings, cases_dir=cases_dir), records, workers,
                            strict=strict, on_done=done)
    finally:
        if bar is not None:
            bar.close()
    infos = [info for info, error in results if error is None]
    failures = [{"case_id": r.case_id, "image": str(r.image), "label": str(r.label), "error": str(error)}
                for r, (_, error) in zip(records, results) if error is not None]
    if shard is not None:
        document = {"format": SHARD_FORMAT, "shard": list(shard), "settings": settings.to_json(),
                    "cases": sorted(i["case_id"] for i in infos), "failures": failures}
        atomic_write_json(out / SHARD_NAME, document)
        return document
    return write_manifest(out, infos, failures, settings, split)


