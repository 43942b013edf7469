"""``python -m pipeline compare``: train and evaluate method variants over seeds, then tabulate and plot the results.

A variant is an override file ``configs/variants/<name>.yaml`` of the bundle, merged on ``train.yaml`` for training
and on ``train.yaml`` + ``evaluate.yaml`` for evaluation; nothing about a variant lives in code
(:mod:`pipeline.report.variants` finds and runs them, :mod:`pipeline.report.tables` tabulates the results). Each
variant x seed trains into ``OUT/runs/<variant>/seed<k>/`` (a bundle root: ``models/``, ``eval/``, ``train.log``,
``evaluate.log``) through MONAI's own CLI, then is evaluated. A run whose ``eval/metrics.json`` exists is skipped, a
trained but unevaluated run is only evaluated, and a failed run is recorded while the others go on.

Outputs: ``OUT/results.json`` (every run's metrics and learning-curve summary), ``OUT/results.md`` (mean ± std over
seeds beside the confound baselines on the same slices, the learning-curve table, plus the command, date and machine),
``OUT/roc.png`` (image-level ROC curves) and ``OUT/curves.png`` (validation metrics against iterations, baselines as
horizontal lines).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from networks.detector import FrequencyAwareDetector
from pipeline.common.arguments import add_deprecated_alias
from pipeline.common.bundle import BUNDLE_DIR
from pipeline.common.files import atomic_write_json, ensure_output_dir
from pipeline.report.tables import fmt_value, results_markdown, summarize_runs
from pipeline.report.variants import available_variants, read_curve, run_variant, uses_ood_source, variant_configs
from transforms.errors import InputDataError

__all__ = ["compare", "machine_info", "code_version", "main"]


def compare(
    data: str | os.PathLike,
    out: str | os.PathLike,
    variants: Sequence[str],
    seeds: Sequence[int],
    epochs: int | None = None,
    anomaly_source: str | os.PathLike | None = None,
    eval_split: str = "test",
    width_preset: str = "default",
    extra: Mapping[str, str] | None = None,
    command: str = "",
    ensemble: bool = False,
) -> int:
    """Train and evaluate every variant x seed into ``out/runs/``, then write ``results.json``, ``results.md`` and
    ``roc.png`` in ``out``. Returns 0 when every run finished, 1 when some failed.

    Args:
        data: a prepared dataset folder (``python -m pipeline prepare``).
        out: output folder; re-running with the same folder resumes.
        variants: names of files in ``configs/variants/``.
        seeds: training seeds (``set_determinism``).
        epochs: training epochs, or None for ``train.yaml``'s.
        anomaly_source: the out-of-distribution image folder (brain MRI) for the variants that use it.
        eval_split: ``"validation"`` or ``"test"``.
        width_preset: network width preset.
        extra: further bundle overrides ``{key: value}``, given to both training and evaluation, as on the MONAI
            bundle command line (values are parsed by it: ``1e-4``, ``True``, ``None``).
        command: the command line, recorded in the results.
        ensemble: also evaluate each variant's seed ensemble (the mean map of its seeds' models), as a row
            ``"<variant> ensemble of <k>"``.

    Raises:
        ValueError: an unknown variant, no seed, or a variant that needs ``anomaly_source`` without it.
        InputDataError: ``data`` holds no ``manifest.json``.
    """
    data = _checked_request(data, variants, seeds, anomaly_source)
    out = ensure_output_dir(out)
    overrides = dict(extra or {})
    common: dict[str, Any] = {"dataset_dir": data, "width_preset": width_preset}
    train_common = dict(common)
    if epochs is not None:
        train_common["epochs"] = epochs
    if anomaly_source is not None:
        train_common["ood_source"] = Path(anomaly_source).resolve()
    run_info = {
        "command": command,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "data": str(data),
        "eval_split": eval_split,
        "epochs": epochs if epochs is not None else "train.yaml default",
        "width_preset": width_preset,
        "anomaly_source": str(anomaly_source) if anomaly_source is not None else None,
        "extra": overrides,
        **machine_info(),
    }
    records = _run_all(out, variants, seeds, train_common, common, eval_split, overrides)
    if ensemble:
        records += _ensemble_records(out, records, {**common, "eval_split": eval_split, **overrides})
    return _write_results(out, records, run_info)


def _checked_request(
    data: str | os.PathLike, variants: Sequence[str], seeds: Sequence[int], anomaly_source: str | os.PathLike | None
) -> Path:
    """The prepared dataset folder, resolved, once the request is known to be runnable (see :func:`compare`)."""
    if not variants or not seeds:
        raise ValueError("give at least one variant and one seed.")
    for name in variants:
        variant_configs(name)  # unknown names fail before any training
    needs_source = [name for name in variants if uses_ood_source(name)]
    if needs_source and anomaly_source is None:
        raise ValueError(
            f"variant(s) {', '.join(needs_source)} draw anomalies from the out-of-distribution source: give "
            "--anomaly-source DIR (a folder of brain MRI images), or leave these variants out."
        )
    data = Path(data).resolve()
    if not (data / "manifest.json").is_file():
        raise InputDataError(
            data, "no manifest.json: not a prepared dataset folder.", "run `python -m pipeline prepare`."
        )
    return data


def _run_all(
    out: Path,
    variants: Sequence[str],
    seeds: Sequence[int],
    train_common: Mapping[str, Any],
    common: Mapping[str, Any],
    eval_split: str,
    extra: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Train and evaluate every variant x seed into ``out/runs/<variant>/seed<k>``; the records in run order."""
    records = []
    # seed-major: an interrupted comparison has every variant at the seeds it reached, not some variants at all seeds
    jobs = [(name, seed) for seed in seeds for name in variants]
    for k, (name, seed) in enumerate(jobs, start=1):
        run_dir = out / "runs" / name / f"seed{seed}"
        print(f"[{k}/{len(jobs)}] {name} seed {seed} -> {run_dir}", flush=True)
        record = run_variant(
            name,
            seed,
            run_dir,
            {**train_common, "seed": seed, **extra},
            {**common, "seed": seed, "eval_split": eval_split, **extra},
        )
        records.append(record)
        if record["status"] == "failed":
            print(f"    FAILED at {record['step']} (exit {record['returncode']}), log: {record['log']}", flush=True)
        else:
            image_auroc = record["report"]["metrics"].get("image_auroc")
            print(f"    {record['status']} ({record['seconds']} s): image AUROC {fmt_value(image_auroc)}", flush=True)
    return records


def _write_results(out: Path, records: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any]) -> int:
    """Write ``results.json``, ``results.md``, ``roc.png`` and ``curves.png`` in ``out``; 1 when a run failed."""
    summary = summarize_runs(records)
    results = {
        "run": run_info,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "report"} | _run_metrics(r["report"]) for r in records],
    }
    atomic_write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(summary, records, run_info), encoding="utf-8")
    roc = _roc_png(records, summary, out / "roc.png")
    _curves_png(records, out / "curves.png")
    failed = [r for r in records if r["status"] == "failed"]
    print(f"results: {out / 'results.md'}, {out / 'results.json'}" + (f", {roc}" if roc else ""))
    if failed:
        names = ", ".join(f"{r['variant']}/seed{r['seed']} ({r['step']})" for r in failed)
        print(f"compare: {len(failed)} of {len(records)} runs failed: {names}", file=sys.stderr)
        return 1
    return 0


def _ensemble_records(
    out: Path, records: Sequence[Mapping[str, Any]], eval_overrides: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One extra record per variant with >= 2 finished seeds: the mean map of those seeds' models, evaluated into
    ``out/runs/<variant>/ensemble`` and named ``"<variant> ensemble of <k>"`` (seed ``-1``)."""
    extra = []
    for name in dict.fromkeys(r["variant"] for r in records):
        done = [Path(r["run_dir"]) for r in records if r["variant"] == name and r["report"] is not None]
        if len(done) < 2:
            continue
        run_dir = out / "runs" / name / "ensemble"
        print(f"[ensemble] {name}: mean map of {len(done)} seeds -> {run_dir}", flush=True)
        record = run_variant(name, -1, run_dir, {}, {**eval_overrides, "seed": 0}, ensemble_of=done)
        record["variant"] = f"{name} ensemble of {len(done)}"
        extra.append(record)
    return extra


def _run_metrics(report: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``results.json`` keeps of one evaluation report (the per-slice scores stay in the run's own report)."""
    if report is None:
        return {"metrics": None}
    keys = ("split", "n_slices", "n_lesion_slices", "metrics", "lesion_sensitivity_at_fp", "image_auroc_by_liver_area")
    return {k: report.get(k) for k in keys}


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, Python, torch and MONAI versions, the device a bundle run picks (``cuda:0`` or CPU) and
    the code's git commit."""
    import monai
    import torch

    device = f"cuda:0 ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": device,
        "code": code_version(),
    }


def code_version() -> str | None:
    """The git commit of this code (``git describe --always --dirty``), or None outside a git checkout."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=BUNDLE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _roc_png(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out_png: Path) -> Path | None:
    """Image-level ROC: the seed-mean curve of each variant and the darkness baseline of the first finished run.

    Returns the PNG path, or None when no finished run has a curve (reports written before ``image_roc`` existed, or
    slice sets with one class only).
    """
    from pipeline.report.figures import roc_figure

    finished = [r for r in records if r["report"] is not None]
    curves = {}
    for name, item in summary["variants"].items():
        mine = [r["report"].get("image_roc", {}).get("model") for r in finished if r["variant"] == name]
        mine = [c for c in mine if c is not None]
        if mine:
            curves[name] = {**_mean_roc(mine), "auroc": item["metrics"]["image_auroc"]["mean"]}
    if not curves:
        return None
    first = finished[0]["report"]
    darkness = first.get("image_roc", {}).get("darkness")
    baselines = None
    if darkness is not None:
        baselines = {"darkness baseline": {**darkness, "auroc": first["baselines"]["image_auroc"]["darkness"]}}
    several = any(item["n_seeds"] > 1 for item in summary["variants"].values())
    title = "Image-level ROC, mean over seeds" if several else "Image-level ROC"
    return roc_figure(curves, out_png, baselines=baselines, title=title)


def _mean_roc(curves: Sequence[Mapping[str, Sequence[float]]], n_points: int = 201) -> dict[str, list[float]]:
    """Vertical average of ROC curves: mean TPR at ``n_points`` evenly spaced FPRs (one curve: itself)."""
    if len(curves) == 1:
        return {"fpr": list(curves[0]["fpr"]), "tpr": list(curves[0]["tpr"])}
    grid = np.linspace(0.0, 1.0, n_points)
    tpr = np.mean([np.interp(grid, c["fpr"], c["tpr"]) for c in curves], axis=0)
    return {"fpr": grid.tolist(), "tpr": tpr.tolist()}


def _curves_png(records: Sequence[Mapping[str, Any]], out_png: Path) -> Path | None:
    """All runs' learning curves in one figure (:func:`pipeline.report.figures.learning_curve_figure`), or None."""
    from pipeline.report.figures import learning_curve_figure

    curves = {f"{r['variant']} s{r['seed']}": read_curve(Path(r["run_dir"])) for r in records}
    curves = {name: c for name, c in curves.items() if c and c.get("rows")}
    return learning_curve_figure(curves, out_png) if curves else None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _names(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline compare`` (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m pipeline compare",
        description="Train and evaluate method variants (bundle configs/variants/*.yaml) over seeds; write "
        "results.md, results.json and roc.png. Re-running resumes: finished runs are skipped.",
    )
    p.add_argument("--data", required=True, help="prepared dataset folder (python -m pipeline prepare)")
    p.add_argument("--out", required=True, help="output folder (runs/<variant>/seed<k>/ and the results)")
    p.add_argument(
        "--variants",
        required=True,
        type=_names,
        help=f"comma-separated variant names, or 'all' ({', '.join(available_variants())})",
    )
    p.add_argument("--seeds", type=_names, default=["0"], help="comma-separated training seeds (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: train.yaml's)")
    p.add_argument(
        "--anomaly-source",
        default=None,
        metavar="DIR",
        help="folder of out-of-distribution images (brain MRI) for the variants that use it (full, RE-MS, WD, ...)",
    )
    p.add_argument(
        "--eval-split", choices=("validation", "test"), default="test", help="evaluated split (default: test)"
    )
    width_preset = p.add_argument("--width-preset", default="default", choices=sorted(FrequencyAwareDetector.PRESETS),
                                  help="network width preset: default or paper (default: default)")
    add_deprecated_alias(p, "--preset", width_preset)
    p.add_argument(
        "--extra",
        nargs="+",
        action="extend",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="further bundle overrides for training and evaluation, e.g. batch_size=16 learning_rate=2e-4",
    )
    p.add_argument("--ensemble", action="store_true",
                   help="also evaluate each variant's seed ensemble (mean anomaly map of its seeds' models)")
    args = p.parse_args(argv)
    variants = available_variants() if args.variants == ["all"] else args.variants
    try:
        seeds = [int(s) for s in args.seeds]
    except ValueError:
        p.error(f"--seeds must be integers, got {','.join(args.seeds)}")
    try:
        return compare(
            args.data,
            args.out,
            variants,
            seeds,
            epochs=args.epochs,
            anomaly_source=args.anomaly_source,
            eval_split=args.eval_split,
            width_preset=args.width_preset,
            extra=dict(args.extra),
            command=shlex.join(["python", "-m", "pipeline", "compare", *argv]),
            ensemble=args.ensemble,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
