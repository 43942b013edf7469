"""The comparison's numbers as tables: per-variant summaries over seeds, learning-curve summaries and ``results.md``.

:func:`summarize_runs` reduces the run records of :func:`pipeline.report.variants.run_variant` to mean ± std per
variant; :func:`results_markdown` writes them beside the confound baselines evaluated on the same slices, and
:func:`curve_summary` / :func:`curve_markdown` say how stable each run's learning curve was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "TABLE_METRICS",
    "BASELINE_ROWS",
    "CURVE_METRICS",
    "summarize_runs",
    "results_markdown",
    "curve_summary",
    "curve_markdown",
    "fmt_value",
]

# (key in the report's "metrics", column title), in table order
TABLE_METRICS = (
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC (all)"),
    ("pixel_auroc_liver", "Pixel AUROC (liver)"),
    ("pixel_auroc_liver_eroded", "Pixel AUROC (liver eroded 3 px)"),
    ("pixel_auroc_liver_smoothed", "Pixel AUROC (liver, map smoothed 5 mm as deviation_smoothed)"),
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
    ("deviation_smoothed", "the same, Gaussian-smoothed (5 mm)", "deviation_smoothed"),
    ("local_contrast", "local contrast (30 mm liver mean - I)", "local_contrast"),
)
# the learning-curve metrics summarised per run: (curve.json key, title)
CURVE_METRICS = (("val_pixel_auroc_liver", "Pixel AUROC (liver)"), ("val_image_auroc", "Image AUROC"))


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


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of the defined values; ``std`` is the sample standard deviation (None below 2)."""
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else None,
        "std": float(finite.std(ddof=1)) if n > 1 else None,
        "n": n,
    }


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
        "pixels, and in the liver after the deviation_smoothed baseline's 5 mm Gaussian (like for like); AUPRO up "
        "to 30% FPR, the FPR counted over all pixels (BMAD) or liver pixels (a liver-only map makes "
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
                fmt_value(baselines["image_auroc"].get(key)),
                *(fmt_value(baselines["pixel_auroc"].get(f"{pixel}_{r}")) if pixel else "—" for r in regions),
                fmt_value(strata),
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
            cells += ["—"] * 4 if m is None else [fmt_value(m["last"]), f"{fmt_value(m['best'])} ({m['best_epoch']})",
                                                   f"{m['last_minus_best']:+.3f}", fmt_value(m["second_half_std"])]
        cells.append(fmt_value(c.get("last_synthetic_pixel_auroc_liver")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Last = the weights a training run ends with (the EMA copy when ema_momentum is set); best = the "
              "validation checkpoint, selected on the validation split itself (optimistic)."]
    return lines


def fmt_value(value: float | None) -> str:
    """A metric with three decimals, or an em dash when undefined."""
    return "—" if value is None else f"{value:.3f}"


def _fmt_mean_std(summary: Mapping[str, Any]) -> str:
    if summary["mean"] is None:
        return "—"
    if summary["std"] is None:
        return fmt_value(summary["mean"])
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _fmt_seconds(curve: Mapping[str, Any]) -> str:
    return "—" if curve.get("train_seconds") is None else f"{curve['train_seconds']:.0f}"
