"""The ``python -m pipeline`` command line: phantom, prepare, demo (and the steps that build on them)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.common.arguments import (
    add_deprecated_alias,
    hu_or_off,
    int_list,
    parse_shard,
    positive_float,
    positive_int,
    unit_float,
)
from pipeline.common.bundle import run_bundle
from transforms.errors import InputDataError

if TYPE_CHECKING:
    from pipeline.data.settings import SplitSettings


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``prepare`` and ``demo``: preprocessing, case-level splits, dataset, parallel."""
    _add_preprocessing_arguments(p.add_argument_group("preprocessing"))
    _add_split_arguments(p.add_argument_group("case-level splits"))
    _add_dataset_arguments(p.add_argument_group("dataset"))
    w = p.add_argument_group("parallel")
    w.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="volumes prepared at once, in N processes (outputs identical to 1; memory grows with N; "
                   "default: 1)")
    w.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                   help="prepare only shard I of N (0-based; every N-th case by case id) into --out, which then "
                   "holds shard.json instead of a manifest; join the shards with --merge")


def _add_preprocessing_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--hu-window",
        nargs=2,
        type=float,
        default=(-200.0, 250.0),
        metavar=("MIN", "MAX"),
        help="HU window mapped to [0, 1] (default: -200 250)",
    )
    g.add_argument(
        "--field-mm",
        type=positive_float,
        default=300.0,
        help="in-plane field of view around the liver, in mm (default: 300)",
    )
    g.add_argument(
        "--size", type=positive_int, default=256, help="slice size in pixels after resampling (default: 256)"
    )
    g.add_argument("--min-liver-area", type=int, default=1,
                   help="the splits keep slices with at least this many liver voxels, native grid; every liver slice "
                   "is stored all the same, as 2.5D neighbours (default: 1)")
    g.add_argument("--liver-reference-hu", type=hu_or_off, default=100.0, metavar="HU|off",
                   help="shift each volume's HU so that its liver median is HU before windowing (per-volume "
                   "normalisation across contrast phases and scanners; default: 100; off: HU as scanned)")
    g.add_argument(
        "--keep-outside-liver",
        action="store_true",
        help="do not zero the image outside the liver (default: zeroed, as BMAD)",
    )


def _add_split_arguments(s: argparse._ArgumentGroup) -> None:
    s.add_argument(
        "--val-fraction",
        type=unit_float,
        default=0.5,
        help="fraction of cases with lesions that go to validation, the rest to test (default: 0.5)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the case shuffle (default: 0)")
    s.add_argument("--train-cases", nargs="*", default=(), metavar="ID", help="force these cases into training")
    s.add_argument("--val-cases", nargs="*", default=(), metavar="ID", help="force these cases into validation")
    s.add_argument("--test-cases", nargs="*", default=(), metavar="ID", help="force these cases into test")
    s.add_argument(
        "--normal-from-abnormal",
        type=int,
        default=0,
        metavar="N",
        help="N cases with lesions give their lesion-free slices to training and leave evaluation "
        "(a patient is never in two splits; default: 0)",
    )
    s.add_argument(
        "--lesion-margin",
        type=int,
        default=2,
        metavar="K",
        help="with --normal-from-abnormal, also drop K slices on either side of a lesion (default: 2)",
    )


def _add_dataset_arguments(d: argparse._ArgumentGroup) -> None:
    from pipeline.data.datasets import LAYOUTS, PRESETS

    d.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="dataset layout (default: auto)")
    label_preset = d.add_argument(
        "--label-preset",
        choices=sorted(PRESETS),
        default=None,
        help="which label values mean liver / lesion (default: the layout's own; datalist entries may name their own)",
    )
    add_deprecated_alias(d, "--preset", label_preset)
    d.add_argument(
        "--liver-values",
        type=int_list,
        default=None,
        metavar="V[,V]",
        help="label values meaning liver (overrides the label preset)",
    )
    d.add_argument(
        "--lesion-values",
        type=int_list,
        default=None,
        metavar="V[,V]",
        help="label values meaning liver lesion (overrides the label preset)",
    )
    d.add_argument("--strict", action="store_true", help="stop at the first bad case instead of recording it")


def run_prepare(args: argparse.Namespace, data: Sequence[str], out: str | Path) -> int:
    """Discover, preprocess and summarise; non-zero exit when any case failed."""
    from pipeline.data.datasets import discover
    from pipeline.data.manifest import assign_splits, summarize
    from pipeline.data.prepare import prepare
    from pipeline.data.settings import PrepareSettings
    from pipeline.data.shards import select_shard

    records = []
    for root in data:
        records += discover(root, args.layout, args.label_preset, args.liver_values, args.lesion_values)
    from pipeline.common.case_ids import read_case_ids_unique

    read_case_ids_unique([r.case_id for r in records], [r.image for r in records])
    split = split_settings(args)
    try:  # a misspelt or doubly named case is reported before the volumes are processed, not after
        assign_splits([{"case_id": r.case_id, "has_lesion": False} for r in records], split)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shard is not None:
        records = select_shard(records, *args.shard, key=lambda r: r.case_id)
    try:
        settings = PrepareSettings(
            hu_window=tuple(args.hu_window),
            field_mm=args.field_mm,
            size=args.size,
            min_liver_area=args.min_liver_area,
            mask_outside=not args.keep_outside_liver,
            liver_reference_hu=args.liver_reference_hu,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = prepare(records, out, settings, split, strict=args.strict, workers=args.workers, shard=args.shard)
    if args.shard is not None:
        print(f"shard {args.shard[0]}/{args.shard[1]}: {len(manifest['cases'])} cases -> {Path(out) / 'shard.json'} "
              "(join the shards with `prepare --merge OUT SHARD_DIR...`)")
    else:
        print(summarize(manifest))
        print(f"manifest: {Path(out) / 'manifest.json'}")
    failures = manifest["failures"]
    if failures:
        print(
            f"prepare: {len(failures)} of {len(records)} cases failed: {', '.join(f['case_id'] for f in failures)}",
            file=sys.stderr,
        )
        return 1
    return 0


def split_settings(args: argparse.Namespace) -> SplitSettings:
    """The case-level split options of :func:`add_prepare_arguments`."""
    from pipeline.data.settings import SplitSettings

    return SplitSettings(
        val_fraction=args.val_fraction,
        seed=args.seed,
        train_cases=args.train_cases,
        val_cases=args.val_cases,
        test_cases=args.test_cases,
        normal_from_abnormal=args.normal_from_abnormal,
        lesion_margin=args.lesion_margin,
    )


def cmd_phantom(argv: Sequence[str]) -> int:
    from pipeline.data.phantom import main as phantom_main

    return phantom_main(argv)


def cmd_prepare(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hepafair prepare",
        description="Raw CT volumes (NIfTI, or DICOM series folders named in a datalist) + liver labels -> cached "
        "liver slices and a manifest with case-level splits. Re-running skips finished cases; a failed case is "
        "recorded and the others go on. Many volumes: --workers N here, --shard I/N + --merge across machines.",
    )
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH",
        help="dataset folder or datalist JSON (repeatable: e.g. BTCV normals + LiTS)",
    )
    p.add_argument("--out", help="output folder (cases/ + manifest.json)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar=("OUT", "SHARD_DIR"),
        default=None,
        help="join folders prepared with --shard I/N into OUT (cases linked, one manifest with the splits a single "
        "run makes; give the same split options as there would be)",
    )
    p.add_argument(
        "--export-bmad",
        metavar="DIR",
        default=None,
        help="also write the slices in BMAD's liver folder layout (PNG) to DIR",
    )
    add_prepare_arguments(p)
    args = p.parse_args(argv)
    if args.merge is not None:
        if args.data or len(args.merge) < 2:
            p.error("--merge OUT SHARD_DIR [SHARD_DIR ...] joins prepared shards; it takes no --data.")
        from pipeline.data.manifest import summarize
        from pipeline.data.shards import merge_shards

        manifest = merge_shards(args.merge[0], args.merge[1:], split_settings(args))
        print(summarize(manifest))
        print(f"manifest: {Path(args.merge[0]) / 'manifest.json'}")
        return 1 if manifest["failures"] else 0
    if not args.data or not args.out:
        p.error("give --data PATH and --out FOLDER (or --merge OUT SHARD_DIR...).")
    status = run_prepare(args, args.data, args.out)
    if args.export_bmad:
        from pipeline.data.bmad import export_bmad

        counts = export_bmad(args.out, args.export_bmad)
        print(f"BMAD layout: {sum(counts.values())} PNGs -> {args.export_bmad}")
    return status


def cmd_demo(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline demo",
        description="End to end on generated data, no external data needed: phantom cohort -> prepare -> train "
        "(MONAI bundle) -> evaluate -> Image/Pixel AUROC beside the trivial baselines. Phantoms exercise "
        "the software; they say nothing about performance on real CT.",
    )
    p.add_argument("--out", default="demo_out", help="working folder (default: demo_out)")
    p.add_argument("--cases", type=int, default=10, help="phantom volumes (default: 10)")
    p.add_argument("--size", type=int, default=128, help="slice size; 128 keeps CPU training to minutes (default)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default: 6, a few CPU minutes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    from pipeline.data.phantom import write_phantom_cohort

    print(f"[1/4] phantom cohort: {args.cases} volumes -> {out / 'raw'}", flush=True)
    write_phantom_cohort(out / "raw", n_cases=args.cases, seed=args.seed)
    print(f"[2/4] prepare -> {out / 'prepared'}", flush=True)
    prep_args = argparse.ArgumentParser()
    add_prepare_arguments(prep_args)
    prep = prep_args.parse_args(["--label-preset", "phantom", "--size", str(args.size), "--seed", str(args.seed)])
    if run_prepare(prep, [str(out / "raw")], out / "prepared") != 0:
        return 1
    bundle_root = (out / "bundle").resolve()
    common = {"dataset_dir": (out / "prepared").resolve(), "seed": args.seed}
    print(f"[3/4] train {args.epochs} epochs -> {bundle_root / 'models'}", flush=True)
    if run_bundle("training", ["train.yaml"], bundle_root, epochs=args.epochs, **common) != 0:
        return 1
    print("[4/4] evaluate on the test split", flush=True)
    if run_bundle("evaluating", ["train.yaml", "evaluate.yaml"], bundle_root, **common) != 0:
        return 1
    report_path = bundle_root / "eval" / "metrics.json"
    print(format_report(json.loads(report_path.read_bytes())))
    print(f"report: {report_path}")
    return 0


def format_report(report: dict) -> str:
    """The model's AUROCs beside every trivial baseline, as a small table, and whether the model beats them all."""
    m, b = report["metrics"], report["baselines"]

    def f(v: object) -> str:
        return "  n/a" if v is None else f"{float(v):.3f}"

    header = f"{'score':<30}{'image AUROC':>12}{'pixel AUROC':>13}{'pixel (liver)':>15}{'pixel (liver, eroded)':>23}"
    lines = [
        f"split {report['split']}: {report['n_slices']} slices, {report['n_lesion_slices']} with lesion",
        header,
        f"{'model':<30}{f(m.get('image_auroc')):>12}{f(m.get('pixel_auroc')):>13}{f(m.get('pixel_auroc_liver')):>15}"
        f"{f(m.get('pixel_auroc_liver_eroded')):>23}",
    ]
    from pipeline.evaluate.baselines import MAP_BASELINES

    pixel = b["pixel_auroc"]
    for name in MAP_BASELINES:
        lines.append(f"{name + ' baseline':<30}{f(b['image_auroc'].get(name)):>12}{f(pixel.get(name + '_all')):>13}"
                     f"{f(pixel.get(name + '_liver')):>15}{f(pixel.get(name + '_liver_eroded')):>23}")
    for name in ("liver_area", "liver_mean_low", "liver_std", "random"):
        lines.append(f"{name + ' baseline':<30}{f(b['image_auroc'][name]):>12}")
    beaten = beats_every_baseline(report)
    lines.append("model above every baseline (image AUROC and pixel AUROC in the liver): "
                 + ("yes" if beaten else "NO: at this budget a trivial cue does as well or better"))
    return "\n".join(lines)


def beats_every_baseline(report: dict) -> bool:
    """Whether the model's image AUROC is above every baseline's and its pixel AUROC inside the liver above every
    pixel-map baseline's (undefined values count as not beaten)."""
    m, b = report["metrics"], report["baselines"]
    image, pixel = m.get("image_auroc"), m.get("pixel_auroc_liver")
    if image is None or pixel is None:
        return False
    image_baselines = [v for k, v in b["image_auroc"].items() if k != "random"]
    from pipeline.evaluate.baselines import MAP_BASELINES

    # a report written before a map baseline existed lacks its key: judged on the baselines it has
    maps = b["pixel_auroc"]
    pixel_baselines = [maps[f"{name}_liver"] for name in MAP_BASELINES if f"{name}_liver" in maps]
    return all(v is not None and image > v for v in image_baselines) and all(
        v is not None and pixel > v for v in pixel_baselines)


def cmd_export_bmad(argv: Sequence[str]) -> int:
    from pipeline.data.bmad import main_export

    return main_export(argv)


def cmd_import_bmad(argv: Sequence[str]) -> int:
    from pipeline.data.bmad_import import main_import

    return main_import(argv)


def cmd_infer(argv: Sequence[str]) -> int:
    from pipeline.infer.command import main as infer_main

    return infer_main(argv)


def cmd_compare(argv: Sequence[str]) -> int:
    from pipeline.report.compare import main as compare_main

    return compare_main(argv)


def cmd_figures(argv: Sequence[str]) -> int:
    from pipeline.report.figures import main as figures_main

    return figures_main(argv)


COMMANDS = {
    "phantom": (cmd_phantom, "generate a phantom CT cohort (NIfTI, LiTS layout)"),
    "prepare": (cmd_prepare, "raw volumes -> cached liver slices + manifest"),
    "export-bmad": (cmd_export_bmad, "prepared folder -> BMAD liver PNG layout"),
    "import-bmad": (cmd_import_bmad, "BMAD liver PNG folder -> prepared folder + manifest"),
    "demo": (cmd_demo, "run the whole pipeline on generated data"),
    "infer": (cmd_infer, "CT (NIfTI or DICOM folder) + liver mask -> lesion heatmap, mask, report: "
                         "hepafair infer -i CT -l LIVER -o OUT"),
    "compare": (cmd_compare, "train + evaluate method variants over seeds -> results.md/json, roc.png"),
    "figures": (cmd_figures, "synthesis and inference grids (PNG) from a prepared folder and a trained bundle"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: hepafair COMMAND [options]   (or python -m pipeline COMMAND; COMMAND --help for its options)"
              "\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<12} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    func, _ = COMMANDS[argv[0]]
    try:
        return func(argv[1:])
    except InputDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every output is written under a temporary name and renamed: nothing half-written
        print("interrupted: the finished outputs are kept and complete; run the same command again to continue.",
              file=sys.stderr)
        return 130
