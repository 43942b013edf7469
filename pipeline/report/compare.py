"""``python -m pipeline compare``: train and evaluate method variants over seeds, then tabulate and plot the results.

A variant is an override file ``configs/variants/<name>.yaml`` of the bundle, merged on ``train.yaml`` for training
and on ``train.yaml`` + ``evaluate.yaml`` for evaluation; nothing about a variant lives in this module. Each
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
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import ConfigParser

from networks.detector import FrequencyAwareDetector
from pipeline.common.arguments import add_deprecated_alias
from pipeline.common.bundle import BUNDLE_DIR, run_bundle
from pipeline.common.io import atomic_write_json, ensure_output_dir
from transforms.errors import InputDataError

__all__ = [
    "VARIANTS_DIR",
    "TABLE_METRICS",
    "available_variants",
    "variant_configs",
    "uses_ood_source",
    "run_variant",
    "summarize_runs",
    "results_markdown",
    "compare",
    "main",
]

VARIANTS_DIR = BUNDLE_DIR / "configs" / "variants"

# (key in the report's "metrics", column title), in table order
TABLE_METRICS = (
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC (all)"),
    ("pixel_auroc_liver", "Pixel AUROC (liver)"),
    ("pixel_auroc_liver_eroded", "Pixel AUROC (liver eroded 3 px)"),
    ("aupro", "AUPRO (all)"),
    ("aupro_liver", "AUPRO (liver)"),
    ("best_dice", "best Dice"),
    ("image_auroc_area_matched", "Image AUROC (liver-area strata)"),
)

# (key in the baselines' "image_auroc", row title, prefix of its "pixel_auroc" keys or None)
BASELINE_ROWS = (
    ("liver_area", "liver area", None),
    ("liver_mean_low", "liver mean (darker = anomalous)", None),
    ("liver_std", "liver std", None),
    ("random", "random", None),
    ("darkness", "darkness", "darkness"),
    ("deviation", "two-sided deviation from the liver median", "deviation"),
    ("local_contrast", "local contrast (30 mm liver mean - I)", "local_contrast"),
)
# the learning-curve metrics summarised per run: (curve.json key, title)
CURVE_METRICS = (("val_pixel_auroc_liver", "Pixel AUROC (liver)"), ("val_image_auroc", "Image AUROC"))

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
    record["curve"] = curve_summary(_read_curve(run_dir))
    return record


def _ensemble_members(report_path: Path) -> list[str] | None:
    try:
        return json.loads(report_path.read_bytes()).get("ensemble_bundles")
    except (OSError, json.JSONDecodeError):
        return None


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of the defined values; ``std`` is the sample standard deviation (None below 2)."""
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else None,
        "std": float(finite.std(ddof=1)) if n > 1 else None,
        "n": n,
    }


def summarize_runs(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-variant metric summaries over seeds, and the baselines of the evaluated slices.

    Returns ``{"variants": {name: {"n_seeds", "n_failed", "metrics": {key: {"mean", "std", "n"}}}},
    "baselines": report baselines or None, "split", "n_slices", "n_lesion_slices", "same_slices": bool}``, variants in
    the order they first appear. The baselines come from the first finished run; ``same_slices`` says whether every
    finished run evaluated the same number of slices and lesion slices.
    """
    finished = [r for r in records if r["report"] is not None]
    variants: dict[str, Any] = {}
    for name in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in finished if r["variant"] == name]
        curves = [r["curve"] for r in mine if r.get("curve")]
        variants[name] = {
            "n_seeds": len(mine),
            "n_failed": sum(r["variant"] == name and r["status"] == "failed" for r in records),
            "metrics": {key: _mean_std([r["report"]["metrics"].get(key) for r in mine]) for key, _ in TABLE_METRICS},
            "curve": {
                key: {part: _mean_std([c[key][part] for c in curves if key in c]) for part in
                      ("last", "best", "last_minus_best", "second_half_std")}
                for key, _ in CURVE_METRICS
            },
        }
    first = finished[0]["report"] if finished else {}
    sizes = {(r["report"].get("n_slices"), r["report"].get("n_lesion_slices")) for r in finished}
    return {
        "variants": variants,
        "baselines": first.get("baselines"),
        "split": first.get("split"),
        "n_slices": first.get("n_slices"),
        "n_lesion_slices": first.get("n_lesion_slices"),
        "same_slices": len(sizes) <= 1,
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _fmt_mean_std(summary: Mapping[str, Any]) -> str:
    if summary["mean"] is None:
        return "—"
    if summary["std"] is None:
        return _fmt(summary["mean"])
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def results_markdown(
    summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any]
) -> str:
    """The ``results.md`` text: the variant table, the baselines on the same slices, failed runs and the run facts."""
    lines = ["# Variant comparison", ""]
    header = ["variant", *(title for _, title in TABLE_METRICS), "n seeds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, item in summary["variants"].items():
        cells = [_fmt_mean_std(item["metrics"][key]) for key, _ in TABLE_METRICS]
        seeds = str(item["n_seeds"]) + (f" ({item['n_failed']} failed)" if item["n_failed"] else "")
        lines.append("| " + " | ".join([name, *cells, seeds]) + " |")
    lines += [
        "",
        f"Split `{summary['split']}`: {summary['n_slices']} slices, {summary['n_lesion_slices']} with a lesion. "
        "Mean ± sample standard deviation over the seeds that finished (one seed: its value). Image AUROC on the "
        "slice score (max of the sf x sf mean-filtered map); pixel AUROC on the raw map over all pixels or liver "
        "pixels; AUPRO up to 30% FPR, the FPR counted over all pixels (BMAD) or liver pixels (a liver-only map makes "
        "the former easy); best Dice at the threshold that maximises it on these slices (an upper bound); "
        "liver-area strata: mean image AUROC inside 4 liver-area quantile bins (near 0.5 when a score only tracks "
        "slice size).",
    ]
    if not summary["same_slices"]:
        lines += ["", "**Warning:** the runs did not evaluate the same slices; the baselines are those of the first."]
    lines += ["", "## Baselines on the same slices", ""]
    baselines = summary["baselines"]
    if baselines is None:
        lines.append("No run finished, so there are no baselines.")
    else:
        titles = ["score", "Image AUROC", "Pixel AUROC (all)", "Pixel AUROC (liver)",
                  "Pixel AUROC (liver eroded 3 px)", "Image AUROC (liver-area strata)"]
        lines += ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
        regions = ("all", "liver", "liver_eroded")
        for key, title, pixel in BASELINE_ROWS:
            strata = baselines.get("darkness_by_liver_area", {}).get("mean") if key == "darkness" else None
            cells = [
                _fmt(baselines["image_auroc"].get(key)),
                *(_fmt(baselines["pixel_auroc"].get(f"{pixel}_{r}")) if pixel else "—" for r in regions),
                _fmt(strata),
            ]
            lines.append("| " + " | ".join([title, *cells]) + " |")
    lines += curve_markdown(records)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [
            f"- {r['variant']} seed {r['seed']}: {r['step']} exited {r['returncode']} (log: `{r['log']}`)"
            for r in failed
        ]
    lines += ["", "## Run", ""]
    lines += [f"- {key}: {value}" for key, value in run_info.items() if key != "command"]
    lines += ["", "```bash", run_info["command"], "```", ""]
    return "\n".join(lines)


def curve_summary(curve: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What one run's learning curve (``eval/curve.json``) says about stability: for each of :data:`CURVE_METRICS`,
    the best value and its epoch, the last value (the final weights: EMA when on), their gap, and the spread of
    the second half of the curve; plus the last synthetic-anomaly health, the iterations and training seconds."""
    rows = (curve or {}).get("rows") or []
    if not rows:
        return None
    out: dict[str, Any] = {"iterations": rows[-1]["iteration"], "epochs": rows[-1]["epoch"],
                           "train_seconds": rows[-1].get("elapsed_s"),
                           "last_synthetic_pixel_auroc_liver": rows[-1].get("synthetic_pixel_auroc_liver")}
    for key, _ in CURVE_METRICS:
        points = [(row["epoch"], row[key]) for row in rows if row.get(key) is not None]
        if not points:
            continue
        best_epoch, best = max(points, key=lambda p: p[1])
        last = points[-1][1]
        second_half = [v for _, v in points[len(points) // 2:]]
        out[key] = {"best": best, "best_epoch": best_epoch, "last": last, "last_minus_best": last - best,
                    "second_half_std": float(np.std(second_half))}
    return out


def curve_markdown(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The "Learning curves" section of ``results.md``: one row per run with a curve (see :func:`curve_summary`)."""
    rows = [(r, r.get("curve")) for r in records if r.get("curve")]
    if not rows:
        return []
    header = ["run", "iterations (epochs)", "train s"]
    for _, title in CURVE_METRICS:
        header += [f"{title}: last", "best (epoch)", "last - best", "2nd-half std"]
    header.append("synthetic health (last)")
    lines = ["", "## Learning curves (validation every val_interval epochs; `curves.png`)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, c in rows:
        cells = [f"{r['variant']} seed {r['seed']}", f"{c['iterations']} ({c['epochs']})", _fmt_seconds(c)]
        for key, _ in CURVE_METRICS:
            m = c.get(key)
            cells += ["—"] * 4 if m is None else [_fmt(m["last"]), f"{_fmt(m['best'])} ({m['best_epoch']})",
                                                   f"{m['last_minus_best']:+.3f}", _fmt(m["second_half_std"])]
        cells.append(_fmt(c.get("last_synthetic_pixel_auroc_liver")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Last = the weights a training run ends with (the EMA copy when ema_momentum is set); best = the "
              "validation checkpoint, selected on the validation split itself (optimistic)."]
    return lines


def _fmt_seconds(curve: Mapping[str, Any]) -> str:
    return "—" if curve.get("train_seconds") is None else f"{curve['train_seconds']:.0f}"


def _read_curve(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "eval" / "curve.json"
    return json.loads(path.read_bytes()) if path.is_file() else None


def _curves_png(records: Sequence[Mapping[str, Any]], out_png: Path) -> Path | None:
    """All runs' learning curves in one figure (:func:`pipeline.report.figures.learning_curve_figure`), or None."""
    from pipeline.report.figures import learning_curve_figure

    curves = {f"{r['variant']} s{r['seed']}": _read_curve(Path(r["run_dir"])) for r in records}
    curves = {name: c for name, c in curves.items() if c and c.get("rows")}
    return learning_curve_figure(curves, out_png) if curves else None


def _mean_roc(curves: Sequence[Mapping[str, Sequence[float]]], n_points: int = 201) -> dict[str, list[float]]:
    """Vertical average of ROC curves: mean TPR at ``n_points`` evenly spaced FPRs (one curve: itself)."""
    if len(curves) == 1:
        return {"fpr": list(curves[0]["fpr"]), "tpr": list(curves[0]["tpr"])}
    grid = np.linspace(0.0, 1.0, n_points)
    tpr = np.mean([np.interp(grid, c["fpr"], c["tpr"]) for c in curves], axis=0)
    return {"fpr": grid.tolist(), "tpr": tpr.tolist()}


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
    out = ensure_output_dir(out)
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
        "extra": dict(extra or {}),
        **machine_info(),
    }
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
            {**train_common, "seed": seed, **(extra or {})},
            {**common, "seed": seed, "eval_split": eval_split, **(extra or {})},
        )
        records.append(record)
        if record["status"] == "failed":
            print(f"    FAILED at {record['step']} (exit {record['returncode']}), log: {record['log']}", flush=True)
        else:
            image_auroc = record["report"]["metrics"].get("image_auroc")
            print(f"    {record['status']} ({record['seconds']} s): image AUROC {_fmt(image_auroc)}", flush=True)

    if ensemble:
        records += _ensemble_records(out, records, {**common, "eval_split": eval_split, **(extra or {})})
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
