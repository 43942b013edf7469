"""Many cases: :func:`pipeline.infer.volume.infer_volume` on each record, in worker processes if asked, a failed case
recorded and the others continued, and one summary JSON."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from networks.scoring import DEFAULT_SF
from pipeline.common.case_ids import read_case_ids_unique
from pipeline.common.files import atomic_write_json, ensure_output_dir
from pipeline.common.parallel import map_cases
from pipeline.data.datasets import CaseRecord
from pipeline.data.settings import PrepareSettings
from pipeline.infer.paths import check_batch_outputs
from pipeline.infer.volume import infer_volume

__all__ = ["SUMMARY_NAME", "infer_cases"]

SUMMARY_NAME = "inference_summary.json"
SUMMARY_FORMAT = "hepafair-inference-summary/1"


def infer_cases(
    records: Sequence[CaseRecord],
    detector: Any,
    *,
    settings: PrepareSettings,
    threshold: float,
    out_dir: str | os.PathLike,
    min_lesion_mm3: float = 100.0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    overlay: bool = False,
    strict: bool = False,
    progress: bool = True,
    workers: int = 1,
    summary_name: str = SUMMARY_NAME,
    sf: int = DEFAULT_SF,
    slice_context: Mapping[str, Any] | None = None,
) -> dict:
    """Run :func:`~pipeline.infer.volume.infer_volume` on every record; write and return ``out_dir/<summary_name>``.

    A case that fails with bad input (:class:`InputDataError`, ``OSError``) is recorded and the others go on, unless
    ``strict``, which re-raises the first error. Callers decide the exit status from ``summary["n_failed"]``.

    Args:
        detector: the detector; with ``workers > 1`` a picklable function returning one instead (e.g.
            ``functools.partial(build_detector, ...)``), called once in each worker process.
        workers: cases inferred at once, in worker processes (:func:`pipeline.common.parallel.map_cases`); outputs are
            identical to ``workers=1``.
        summary_name: the summary's file name (one per shard when shards share ``out_dir``).
    """
    out = ensure_output_dir(out_dir)
    read_case_ids_unique([r.case_id for r in records], [r.image for r in records])
    check_batch_outputs(records, out, overlay)
    options = dict(settings=settings, threshold=threshold, min_lesion_mm3=min_lesion_mm3, batch_size=batch_size,
                   device=device, out_dir=out, overwrite=overwrite, overlay=overlay, sf=sf,
                   slice_context=slice_context)
    if workers > 1:
        func, initializer, initargs = partial(_infer_record, **options), _set_worker_detector, (detector,)
    else:
        func, initializer, initargs = partial(_infer_record, detector=detector, **options), None, ()
    done = partial(_print_progress, records) if progress else None
    results = map_cases(func, records, workers, strict=strict, on_done=done, initializer=initializer,
                        initargs=initargs)
    rows = [_summary_row(record, report, error) for record, (report, error) in zip(records, results)]
    failed = [r["case_id"] for r in rows if r["status"] == "failed"]
    summary = {
        "format": SUMMARY_FORMAT,
        "n_cases": len(rows),
        "n_failed": len(failed),
        "failed": failed,
        "threshold": float(threshold),
        "settings": settings.to_json(),
        "cases": rows,
    }
    atomic_write_json(out / summary_name, summary)
    return summary


def _print_progress(records: Sequence[CaseRecord], k: int, report: dict | None, error: BaseException | None) -> None:
    detail = (f"score {report['volume_score']:.3f}, {report['n_lesions']} lesion(s)" if error is None
              else f"FAILED: {error}")
    print(f"[{k + 1}/{len(records)}] {records[k].case_id}: {detail}", file=sys.stderr, flush=True)


def _summary_row(record: CaseRecord, report: dict | None, error: BaseException | None) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": record.case_id, "image": str(record.image), "label": str(record.label)}
    if error is not None:
        row.update(status="failed", error=str(error))
    else:
        row.update(status="ok", volume_score=report["volume_score"], n_lesions=report["n_lesions"],
                   report=report["outputs"]["report"], seconds=report["timings_s"]["total"])
    return row


_WORKER_DETECTOR: Any = None  # the detector of this worker process (map_cases initializer)


def _set_worker_detector(make_detector: Any) -> None:
    global _WORKER_DETECTOR
    _WORKER_DETECTOR = make_detector()


def _infer_record(record: CaseRecord, detector: Any = None, **options: Any) -> dict:
    return infer_volume(record.image, record.label, detector if detector is not None else _WORKER_DETECTOR,
                        liver_values=record.liver_values, lesion_values=record.lesion_values,
                        case_id=record.case_id, series_uid=record.series_uid, **options)

