"""Figures as PNG files (matplotlib, Agg canvas, no pyplot state): ROC curves, the anomaly synthesis grid (as the
paper's Fig. 7) and the inference grid of a trained bundle (as the paper's Fig. 8).

Slices are stored as ``(X, Y)`` arrays in RAS; every panel is drawn as a radiological axial image (anterior up, the
patient's right on the image's left) through :func:`pipeline.common.display.ras_to_display`.
Grids have a fixed size: ``PANEL_INCHES`` per panel plus a ``TITLE_INCHES`` band of column titles, at ``DPI``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from networks.frequency import ButterworthHighPass
from pipeline.common.display import ras_to_display
from pipeline.data.context import with_slice_context
from pipeline.data.loading import slice_loading
from pipeline.data.manifest import load_manifest
from transforms.context import centre_channel
from transforms.errors import InputDataError
from transforms.synthesis import RandLiverAnomalyd

__all__ = [
    "DPI",
    "PANEL_INCHES",
    "TITLE_INCHES",
    "ROC_INCHES",
    "roc_figure",
    "synthesis_grid",
    "inference_grid",
    "main",
]

DPI = 100
PANEL_INCHES = 2.0
TITLE_INCHES = 0.3
ROC_INCHES = 6.0
SYNTHESIS_COLUMNS = ("input", "anomaly mask", "augmented", "high-pass")
INFERENCE_COLUMNS = ("CT", "high-pass", "restoration", "anomaly map", "ground truth")


def _save(fig: Figure, out_png: str | os.PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(out))
    return out


def roc_figure(
    curves: Mapping[str, Mapping[str, Any]],
    out_png: str | os.PathLike,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "Image-level ROC",
) -> Path:
    """Draw ROC curves into a square PNG (``ROC_INCHES`` x ``DPI`` pixels a side); return its path.

    Args:
        curves: ``{name: {"fpr": [...], "tpr": [...], "auroc": float or None (optional)}}``, one solid line each;
            the legend shows the AUROC when given.
        out_png: the PNG to write (parent folders are created).
        baselines: curves of the same form, drawn dashed (e.g. the darkness baseline).
        title: the axes title.
    """
    fig = Figure(figsize=(ROC_INCHES, ROC_INCHES), dpi=DPI)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="chance")
    for group, style in ((curves, "-"), (baselines or {}, "--")):
        for name, curve in group.items():
            auroc = curve.get("auroc")
            label = name if auroc is None else f"{name} ({auroc:.3f})"
            ax.plot(curve["fpr"], curve["tpr"], linestyle=style, linewidth=1.5, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8, title="AUROC in brackets", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png)


#: (curve.json key, panel title, baseline keys drawn as horizontal lines: (report section, key, label))
CURVE_PANELS = (
    ("val_pixel_auroc_liver", "Pixel AUROC inside the liver (validation)",
     (("pixel_auroc", "deviation_liver", "two-sided deviation"), ("pixel_auroc", "darkness_liver", "darkness"))),
    ("val_pixel_auroc_liver_smoothed", "Pixel AUROC in the liver, maps smoothed 5 mm (validation)",
     (("pixel_auroc", "deviation_smoothed_liver", "smoothed deviation"),)),
    ("val_image_auroc", "Image AUROC (validation)",
     (("image_auroc", "deviation", "two-sided deviation"), ("image_auroc", "darkness", "darkness"),
      ("image_auroc", "liver_area", "liver area"))),
    ("synthetic_pixel_auroc_liver", "Synthetic anomalies: pixel AUROC in the liver (health)", ()),
)


def learning_curve_figure(
    runs: Mapping[str, Mapping[str, Any]], out_png: str | os.PathLike, title: str = "Learning curves"
) -> Path:
    """Validation metrics against training iterations, one line per run, the trivial baselines as dashed horizontal
    lines (from the first run that has them); return the PNG path.

    Args:
        runs: ``{name: curve.json content}`` (``{"rows": [{"iteration", <metric>: float | None, ...}], "baselines":
            {...} | None}``), as :class:`pipeline.train.curves.ValidationCurve` writes it.
        out_png: the PNG to write (parent folders are created).
        title: the figure title.
    """
    fig = Figure(figsize=(5.0 * len(CURVE_PANELS), 4.0), dpi=DPI)
    axes = fig.subplots(1, len(CURVE_PANELS), squeeze=False)[0]
    baselines = next((run.get("baselines") for run in runs.values() if run.get("baselines")), None) or {}
    for ax, (key, panel_title, lines) in zip(axes, CURVE_PANELS):
        for name, run in runs.items():
            points = [(row["iteration"], row[key]) for row in run.get("rows", []) if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", linewidth=1.2, label=name)
        for (section, base_key, label), colour in zip(lines, ("0.3", "0.55", "0.75")):
            value = baselines.get(section, {}).get(base_key)
            if value is not None:
                ax.axhline(value, color=colour, linestyle="--", linewidth=1.0, label=f"{label} ({value:.3f})")
        ax.set(xlabel="training iteration", ylim=(0.0, 1.0), title=panel_title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def _grid(n_rows: int, columns: Sequence[str]) -> tuple[Figure, np.ndarray]:
    """A figure of ``n_rows`` x ``len(columns)`` image panels with column titles above the first row."""
    height = n_rows * PANEL_INCHES + TITLE_INCHES
    fig = Figure(figsize=(len(columns) * PANEL_INCHES, height), dpi=DPI)
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=1.0 - TITLE_INCHES / height, wspace=0.02, hspace=0.02)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, name in zip(axes[0], columns):
        ax.set_title(name, fontsize=9)
    return fig, axes


def _show(ax: Any, slice_xy: np.ndarray | None, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "gray") -> None:
    """Draw an ``(X, Y)`` RAS slice as a radiological image, or "none" for an absent one."""
    if slice_xy is None:
        ax.text(0.5, 0.5, "none", ha="center", va="center", color="0.5", transform=ax.transAxes)
        return
    ax.imshow(ras_to_display(slice_xy), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")


def _show_signed(ax: Any, slice_xy: np.ndarray) -> None:
    """Draw a signed image (the high-pass) with limits symmetric about 0 at its 99.5th absolute percentile."""
    limit = max(float(np.percentile(np.abs(slice_xy), 99.5)), 1e-6)
    _show(ax, slice_xy, vmin=-limit, vmax=limit)


def _xy(x: Any) -> np.ndarray:
    """A ``(1, X, Y)`` tensor or array -> ``(X, Y)`` float numpy array."""
    return np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float32)[0]


def synthesis_grid(
    prepared_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    n: int = 6,
    source: str | os.PathLike | None = None,
    seed: int = 0,
    constrain_to_liver: bool = True,
    highpass_cutoff: float = 30.0,
    highpass_order: int = 2,
    lesion_like_fraction: float = 0.0,
) -> Path:
    """The anomaly synthesis on training slices, one row per slice: input, anomaly mask, augmented, high-pass.

    Slices are drawn (``seed``) among the training slices with at least the median liver area, where a synthetic
    anomaly has room; each goes through the training loading, :class:`~transforms.synthesis.RandLiverAnomalyd` with
    probability 1 (``source``: image folder or None for the procedural texture; ``lesion_like_fraction``: the share
    drawn by the lesion-like synthesis instead, as the bundle's setting of that name) and
    :class:`~networks.frequency.ButterworthHighPass` of the augmented slice, as the model sees it.

    Returns the PNG path: ``4 * PANEL_INCHES`` x ``(rows * PANEL_INCHES + TITLE_INCHES)`` inches at ``DPI``, rows =
    ``min(n, eligible slices)``.

    Raises:
        InputDataError: the prepared folder has no training slice.
    """
    manifest = load_manifest(prepared_dir)
    entries = manifest.get("training", [])
    if not entries:
        raise InputDataError(Path(prepared_dir) / "manifest.json", "no training slices to synthesise anomalies on.")
    areas = np.array([e.get("liver_area", 0) for e in entries], dtype=np.float64)
    pool = [e for e, area in zip(entries, areas) if area >= np.median(areas)]
    rng = np.random.RandomState(seed)
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]

    synthesis = RandLiverAnomalyd(
        keys="image",
        liver_key="liver",
        source=source,
        prob=1.0,
        constrain_to_liver=constrain_to_liver,
        lesion_like_fraction=lesion_like_fraction,
        lesion_like={"hu_per_unit": float(np.diff(manifest["settings"]["hu_window"])[0])},
    )
    highpass = ButterworthHighPass(highpass_cutoff, highpass_order)  # the detector's own layer, as the model sees it
    loading = slice_loading([synthesis])
    loading.set_random_state(seed)  # after Compose(), which reseeds its transforms from MONAI's global seed

    fig, axes = _grid(len(chosen), SYNTHESIS_COLUMNS)
    for row, entry in zip(axes, chosen):
        d = loading(dict(entry))
        _show(row[0], _xy(d["clean"]))
        _show(row[1], _xy(d["anomaly_mask"]))
        _show(row[2], _xy(d["image"]))
        with torch.no_grad():
            _show_signed(row[3], _xy(highpass(torch.as_tensor(d["image"], dtype=torch.float32))))
    return _save(fig, out_png)


def _lesion_slices(entries: Sequence[dict], n: int, min_gap: int = 3) -> list[dict]:
    """Up to ``n`` lesion slices, largest lesion area first, at least ``min_gap`` slices apart within a case."""
    chosen: list[dict] = []
    ranked = sorted((e for e in entries if e.get("has_lesion")), key=lambda e: -e.get("lesion_area", 0))
    for entry in ranked:
        near = any(
            c["case_id"] == entry["case_id"] and abs(c["slice_index"] - entry["slice_index"]) < min_gap for c in chosen
        )
        if not near:
            chosen.append(entry)
        if len(chosen) == n:
            break
    return chosen


def inference_grid(
    bundle_root: str | os.PathLike,
    prepared_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    split: str = "test",
    n: int = 6,
    liver_only: bool = True,
    device: str | torch.device = "cpu",
) -> Path:
    """The trained model on the largest lesions of a split, one row per slice: CT, high-pass, restoration, anomaly
    map, ground truth (lesion white, liver gray).

    The model is ``bundle_root/models/model.pt`` with the architecture of ``models/inference.json``
    (:func:`pipeline.infer.settings.load_detector`); the panels come from ``forward_both`` and ``anomaly_map``. A part
    the variant lacks (no high-pass, no restoration net) shows "none". With ``liver_only`` (the evaluation's
    default) the map is zeroed outside the liver. Slices: largest lesion area first, at least 3 slices apart within a
    case.

    Returns the PNG path: ``5 * PANEL_INCHES`` x ``(rows * PANEL_INCHES + TITLE_INCHES)`` inches at ``DPI``.

    Raises:
        InputDataError: no weights in the bundle, or no lesion slice in the split.
    """
    from pipeline.infer.settings import load_detector, read_inference_settings, recorded_slice_context

    manifest = load_manifest(prepared_dir)
    chosen = _lesion_slices(manifest.get(split, []), n)
    if not chosen:
        raise InputDataError(Path(prepared_dir) / "manifest.json", f"the {split!r} split has no lesion slice to show.")
    detector = load_detector(bundle_root, device=device)
    context = recorded_slice_context(read_inference_settings(bundle_root))  # a 2.5D model sees the neighbours too
    data = [slice_loading()(e) for e in with_slice_context(chosen, manifest["root"], context.slices, context.mm)]
    image = torch.stack([torch.as_tensor(d["image"]) for d in data]).to(device)
    with torch.no_grad():
        restored, _ = detector.forward_both(image)
        amap = detector.anomaly_map(image)
        highpass = detector.highpass(image) if detector.highpass is not None else None
    fig, axes = _grid(len(chosen), INFERENCE_COLUMNS)
    for k, (row, entry, d) in enumerate(zip(axes, chosen, data)):
        liver, lesion = _xy(d["liver"]), _xy(d["lesion"])
        anomaly = _xy(amap[k]) * liver if liver_only else _xy(amap[k])
        _show(row[0], _xy(centre_channel(image[k])))  # panels show the slice itself (a 2.5D stack's middle)
        row[0].text(4, 12, f"{entry['case_id']} z{entry['slice_index']}", color="yellow", fontsize=7)
        if highpass is not None:
            _show_signed(row[1], _xy(centre_channel(highpass[k])))
        else:
            _show(row[1], None)
        _show(row[2], np.clip(_xy(centre_channel(restored[k])), 0.0, 1.0) if restored is not None else None)
        _show(row[3], anomaly, cmap="inferno")
        _show(row[4], 0.4 * liver + 0.6 * lesion)
    return _save(fig, out_png)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline figures`` (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline figures",
        description="PNG figures: the anomaly synthesis grid on training slices (synthesis.png) and, with --bundle, "
        "the trained model on the largest lesions of a split (inference.png). Slices are shown as radiological "
        "axial images.",
    )
    p.add_argument("--data", required=True, help="prepared dataset folder (python -m pipeline prepare)")
    p.add_argument("--bundle", default=None, metavar="ROOT", help="a trained bundle root (models/model.pt)")
    p.add_argument("--out", required=True, help="output folder for the PNG files")
    p.add_argument("--split", choices=("validation", "test"), default="test", help="split of the inference grid")
    p.add_argument("--n", type=int, default=6, help="rows per grid (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the slice choice and the synthesis (default: 0)")
    p.add_argument(
        "--anomaly-source", default=None, metavar="DIR", help="image folder for the synthesis (default: texture)"
    )
    p.add_argument(
        "--lesion-like-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of the synthesis grid's anomalies made lesion-like (0: the paper's blending; 1: all lesion-like)",
    )
    p.add_argument("--device", default="cpu", help="device of the inference grid (default: cpu)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    written = [
        synthesis_grid(
            args.data,
            out / "synthesis.png",
            n=args.n,
            source=args.anomaly_source,
            seed=args.seed,
            lesion_like_fraction=args.lesion_like_fraction,
        )
    ]
    if args.bundle:
        written.append(
            inference_grid(
                args.bundle, args.data, out / "inference.png", split=args.split, n=args.n, device=args.device
            )
        )
    for path in written:
        print(f"figure: {path}")
    return 0
