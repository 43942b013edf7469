"""Method variants as configuration, and one variant x seed run (train, then evaluate) in its own bundle root.

A variant is an override file ``configs/variants/<name>.yaml`` of the bundle, merged on ``train.yaml`` for training
and on ``train.yaml`` + ``evaluate.yaml`` for evaluation; nothing about a variant lives in code. :func:`run_variant`
runs both steps through MONAI's own CLI (:func:`pipeline.common.bundle.run_bundle`), each with its output in the
run folder's ``train.log`` / ``evaluate.log``, and resumes what is already done.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from pipeline.common.bundle import BUNDLE_DIR, run_bundle
from pipeline.common.files import ensure_output_dir
from pipeline.report.tables import curve_summary

__all__ = [
    "VARIANTS_DIR",
    "available_variants",
    "variant_configs",
    "uses_ood_source",
    "run_variant",
    "read_curve",
]

VARIANTS_DIR = BUNDLE_DIR / "configs" / "variants"

OOD_REFERENCE = "@ood_source"


def available_variants() -> list[str]:
    """Names of the variant files in ``configs/variants/`` (file stems), sorted."""
    return sorted(p.stem for p in VARIANTS_DIR.glob("*.yaml"))


def variant_configs(variant: str, evaluation: bool = False) -> list[str]:
    """Config files of ``variant`` relative to the bundle's ``configs/``, in merge order.

    Training: ``train.yaml`` then the variant; evaluation adds ``evaluate.yaml`` last (it only replaces ``validate#``
    keys, which no variant sets).

    Raises:
        ValueError: no such variant file.
    """
    if not (VARIANTS_DIR / f"{variant}.yaml").is_file():
        raise ValueError(f"unknown variant {variant!r}; the variants are {', '.join(available_variants())}.")
    configs = ["train.yaml", f"variants/{variant}.yaml"]
    return configs + ["evaluate.yaml"] if evaluation else configs


def uses_ood_source(variant: str) -> bool:
    """Whether the merged configuration of ``variant`` draws anomalies from the run-time ``ood_source`` folder."""
    files = [BUNDLE_DIR / "configs" / c for c in variant_configs(variant)]
    return OOD_REFERENCE in str(ConfigParser.load_config_files(files).get("anomaly_source"))


def run_variant(
    variant: str,
    seed: int,
    run_dir: Path,
    train_overrides: Mapping[str, Any],
    eval_overrides: Mapping[str, Any],
    ensemble_of: Sequence[Path] = (),
) -> dict[str, Any]:
    """Train then evaluate one variant x seed in the bundle root ``run_dir``, resuming what is already done.

    With ``ensemble_of`` (finished run folders of the variant) nothing trains: the evaluation scores the mean map of
    their models (``ensemble_bundles``), and ``seed`` is the record's label only.

    ``eval/metrics.json`` present: nothing runs (for an ensemble: when it was made from the same ``ensemble_of``).
    ``models/model.pt`` and ``models/checkpoint_final.pt`` present
    (training completed): only the evaluation runs. Otherwise training runs with ``resume=True``, so a killed
    training continues from its ``models/resume.pt`` (and starts from scratch without one). A folder is reused as it
    is: delete it to train again with other settings.

    Returns ``{"variant", "seed", "run_dir", "status": "ok" | "skipped" | "failed", "step", "returncode", "log",
    "seconds", "report"}``; ``report`` is the evaluation report (``eval/metrics.json``) or None when failed.
    """
    report_path = run_dir / "eval" / "metrics.json"
    record: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "run_dir": str(run_dir),
        "status": "skipped",
        "step": None,
        "curve": None,
        "returncode": 0,
        "log": None,
        "seconds": 0.0,
        "report": None,
    }
    start = time.monotonic()
    if ensemble_of and report_path.is_file() and _ensemble_members(report_path) != [str(d) for d in ensemble_of]:
        report_path.unlink()  # the mean map of other runs (fewer seeds finished then): score this set again
    if not report_path.is_file():
        record["status"] = "ok"
        models = run_dir / "models"
        steps = []
        trained = (models / "model.pt").is_file() and (models / "checkpoint_final.pt").is_file()
        if not (trained or ensemble_of):
            steps.append(("training", variant_configs(variant), {"resume": True, **train_overrides}))
        if ensemble_of:
            eval_overrides = {**eval_overrides, "ensemble_bundles": [str(d) for d in ensemble_of]}
        steps.append(("evaluating", variant_configs(variant, evaluation=True), eval_overrides))
        ensure_output_dir(run_dir)
        for step, configs, overrides in steps:
            log = run_dir / ("train.log" if step == "training" else "evaluate.log")
            returncode = _call_logged(log, run_bundle, step, configs, run_dir, **overrides)
            if returncode == 0 and step == "evaluating" and not report_path.is_file():
                returncode = 1  # the bundle ended "successfully" without its report: count it as a failure
            if returncode != 0:
                record.update(status="failed", step=step, returncode=returncode, log=str(log))
                break
    record["seconds"] = round(time.monotonic() - start, 1)
    if record["status"] != "failed":
        record["report"] = json.loads(report_path.read_bytes())
    record["curve"] = curve_summary(read_curve(run_dir))
    return record


def _ensemble_members(report_path: Path) -> list[str] | None:
    try:
        return json.loads(report_path.read_bytes()).get("ensemble_bundles")
    except (OSError, json.JSONDecodeError):
        return None


def read_curve(run_dir: Path) -> dict[str, Any] | None:
    """The run's learning curve (``eval/curve.json``, written by training), or None."""
    path = run_dir / "eval" / "curve.json"
    return json.loads(path.read_bytes()) if path.is_file() else None


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[None]:
    """Send this process's output to ``log_path``: ``sys.stdout``/``sys.stderr``, and file descriptors 1 and 2, which
    a child process (the bundle run) inherits."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        log = open(log_path, "a", buffering=1, encoding="utf-8")  # closed by the with statement below
        with log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _call_logged(log_path: Path, func: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """``func(*args, **kwargs)`` with its output in ``log_path``; an exception becomes exit status 1, logged."""
    with _output_to(log_path):
        try:
            return int(func(*args, **kwargs))
        except Exception as exc:  # one broken run must not stop the comparison; the log keeps the reason
            print(f"{type(exc).__name__}: {exc}", flush=True)
            return 1
