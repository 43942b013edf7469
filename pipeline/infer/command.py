"""``python -m pipeline infer``: the command line of whole-volume inference (arguments, cases, bundle, exit status)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from networks.detector import FrequencyAwareDetector
from networks.ensemble import FLIP_CHOICES
from networks.scoring import DEFAULT_SF
from pipeline.common.arguments import (
    add_deprecated_alias,
    flip_list,
    int_list,
    non_negative_float,
    parse_shard,
    positive_float,
    positive_int,
    unit_float,
)
from pipeline.common.bundle import BUNDLE_DIR, BUNDLE_ENV, default_bundle
from pipeline.data.datasets import LAYOUTS, PRESETS, CaseRecord, discover, resolve_preset
from pipeline.data.settings import PrepareSettings, prepare_settings_from_json
from pipeline.data.shards import select_shard
from pipeline.infer.batch import SUMMARY_NAME, infer_cases
from pipeline.infer.paths import default_case_id, missing_label_error
from pipeline.infer.settings import build_detector, read_inference_settings, recorded_slice_context
from transforms.errors import InputDataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hepafair infer",
        description="CT volume(s) + liver mask(s) -> lesion heatmap, lesion mask and JSON report per case, on the "
        "input's own grid. Several cases: repeat --image/--label, or give --data; a bad case is recorded in "
        f"OUT/{SUMMARY_NAME} and the others go on (non-zero exit at the end).",
    )
    _input_arguments(p.add_argument_group("inputs"))
    _model_arguments(p.add_argument_group("model"))
    out = p.add_argument_group("outputs")
    out.add_argument("-o", "--out", required=True, help="output folder")
    out.add_argument("--min-lesion-mm3", type=non_negative_float, default=100.0,
                     help="drop lesion candidates smaller than this (default: 100 mm^3)")
    out.add_argument("--overlay", action="store_true", help="also write <case>_overlay.png (top 3 slices)")
    out.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never replaced)")
    out.add_argument("--strict", action="store_true", help="stop at the first bad case instead of recording it")
    run = p.add_argument_group("parallel")
    run.add_argument("--workers", type=positive_int, default=1, metavar="N",
                     help="cases inferred at once, in N processes each holding the model (default: 1)")
    run.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                     help="infer only shard I of N of the cases (0-based, every N-th by case id); the summary is "
                     "then OUT/inference_summary.shard-I-of-N.json, so shards may share OUT")
    return p


def _input_arguments(inputs: argparse._ArgumentGroup) -> None:
    inputs.add_argument("-i", "--image", action="append", default=[], metavar="CT",
                        help="CT NIfTI in HU, or a folder holding a DICOM CT series (repeatable)")
    inputs.add_argument("--series-uid", action="append", default=[], metavar="UID",
                        help="SeriesInstanceUID to read from a DICOM folder holding several series; one per --image "
                        "in the same order ('' for a NIfTI or a single-series folder)")
    inputs.add_argument("-l", "--label", action="append", default=[], metavar="LABEL",
                        help="liver mask / label map (on the CT's grid, or on a coarser one covering it) or a "
                        "TotalSegmentator output folder; one per --image, in the same order")
    inputs.add_argument("--data", action="append", default=[], metavar="PATH",
                        help="dataset folder or datalist JSON (repeatable), discovered as by `prepare`")
    inputs.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="layout of --data")
    label_preset = inputs.add_argument(
        "--label-preset", choices=sorted(PRESETS), default=None,
        help="which label values mean liver / lesion (default: lits, liver 1, lesion 2)")
    add_deprecated_alias(inputs, "--preset", label_preset)
    inputs.add_argument("--liver-values", type=int_list, default=None, metavar="V[,V]",
                        help="label values meaning liver (overrides the label preset)")
    inputs.add_argument("--lesion-values", type=int_list, default=None, metavar="V[,V]",
                        help="label values meaning lesion, counted as liver (overrides the label preset)")


def _model_arguments(model: argparse._ArgumentGroup) -> None:
    model.add_argument("-b", "--bundle", action="append", default=[], metavar="BUNDLE",
                       help="bundle root (holding models/model.pt and models/inference.json) or a checkpoint file; "
                       "repeat it for a seed ensemble (the mean of the models' maps; needs --threshold). Default: "
                       f"${BUNDLE_ENV}, else the bundle of this installation ({BUNDLE_DIR}) when it holds weights")
    model.add_argument("--tta-flips", type=flip_list, default=[], metavar="F[,F]",
                       help=f"test-time flips averaged with the slice as it is: {', '.join(FLIP_CHOICES)} "
                       "(needs --threshold). Measured on IRCADb p17 they lowered the AUROCs (bundle docs).")
    width_preset = model.add_argument(
        "--width-preset", default=None, choices=sorted(FrequencyAwareDetector.PRESETS),
        help="network width preset (default: the bundle's inference.json, else 'default')")
    add_deprecated_alias(model, "--network-preset", width_preset)
    model.add_argument("--threshold", type=unit_float, default=None,
                       help="lesion threshold on the heatmap (default: the bundle's validation-chosen threshold; "
                       "an ensemble or flips need it given: their mean map is smoother than the one it was chosen on)")
    model.add_argument("--size", type=positive_int, default=None,
                       help="slice size (default: the bundle's training setting)")
    model.add_argument("--field-mm", type=positive_float, default=None,
                       help="in-plane field around the liver in mm (default: the bundle's training setting)")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    model.add_argument("--batch-size", type=positive_int, default=16, help="slices per network call (default: 16)")


def _records(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[CaseRecord]:
    """The cases named on the command line: --image/--label pairs, then everything --data discovers."""
    if not args.image and not args.data:
        parser.error("give --image CT --label LIVER (repeatable) or --data PATH.")
    if args.image and not args.label:
        raise missing_label_error(args.image[0])
    if len(args.label) != len(args.image):
        parser.error(f"{len(args.image)} --image but {len(args.label)} --label: give one label per image.")
    if args.series_uid and len(args.series_uid) != len(args.image):
        parser.error(f"{len(args.image)} --image but {len(args.series_uid)} --series-uid: give one per image, in the "
                     "same order ('' where none is needed).")
    values = resolve_preset(args.label_preset, args.liver_values, args.lesion_values)
    uids = [uid.strip() or None for uid in args.series_uid] or [None] * len(args.image)
    records = [
        CaseRecord(default_case_id(image), Path(image), Path(label), "cli", values.liver_values, values.lesion_values,
                   series_uid=uid)
        for image, label, uid in zip(args.image, args.label, uids)
    ]
    for root in args.data:
        records += discover(root, args.layout, args.label_preset, args.liver_values, args.lesion_values)
    return records


def _bundles(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """``--bundle`` as given, else the installation's bundle when it holds weights; an ensemble needs --threshold."""
    bundles = list(args.bundle)
    if not bundles:
        installed = default_bundle()
        if installed is None:
            parser.error(f"no --bundle given, ${BUNDLE_ENV} is not set and the bundle of this installation "
                         f"({BUNDLE_DIR}) holds no trained weights (models/model.pt): train one (README, "
                         "'Training') or pass --bundle PATH.")
        bundles = [str(installed)]
    if (len(bundles) > 1 or bool(args.tta_flips)) and args.threshold is None:
        parser.error("a seed ensemble (several --bundle) or --tta-flips needs --threshold T: the bundles' thresholds "
                     "were chosen on one model's maps.")
    return bundles


def _threshold_and_settings(args: argparse.Namespace, parser: argparse.ArgumentParser,
                            bundle_settings: dict) -> tuple[float, PrepareSettings]:
    """The lesion threshold (``--threshold``, else the first bundle's) and the preprocessing every bundle shares,
    with ``--size``/``--field-mm`` applied."""
    threshold = args.threshold if args.threshold is not None else bundle_settings.get("threshold")
    if threshold is None:
        raise InputDataError(args.bundle[0], "the bundle holds no lesion threshold (models/inference.json is missing "
                                             "or training found no validation lesion to choose one).",
                             "pass --threshold T (a heatmap value in [0, 1]).")
    settings = prepare_settings_from_json(bundle_settings.get("prepare_settings"))
    for other in args.bundle[1:]:
        other_settings = read_inference_settings(other)
        if prepare_settings_from_json(other_settings.get("prepare_settings")) != settings:
            raise InputDataError(other, f"its slices were prepared with other settings than {args.bundle[0]}'s "
                                        "(models/inference.json, prepare_settings).",
                                 "ensemble only bundles trained on the same prepared data settings.")
        if recorded_slice_context(other_settings) != recorded_slice_context(bundle_settings):
            raise InputDataError(other, f"its network sees another slice context than {args.bundle[0]}'s "
                                        "(models/inference.json, slice_context).",
                                 "ensemble only bundles trained with the same 2.5D input.")
    overrides = {k: v for k, v in (("size", args.size), ("field_mm", args.field_mm)) if v is not None}
    try:
        settings = dataclasses.replace(settings, **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    return float(threshold), settings


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline infer``: exit 0 when every case succeeded, 1 when some failed, 2 on a usage error."""
    parser = _parser()
    args = parser.parse_args(argv)
    records = _records(args, parser)
    args.bundle = _bundles(args, parser)
    bundle_settings = read_inference_settings(args.bundle[0])
    threshold, settings = _threshold_and_settings(args, parser, bundle_settings)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    make_detector = partial(build_detector, args.bundle, args.width_preset, device, args.tta_flips)
    detector = make_detector()  # here too with --workers: a bundle that does not load fails before any case
    divisor = max([int(getattr(m, "divisor", 1)) for m in detector.modules()] + [1])
    if settings.size % divisor:
        parser.error(f"slice size {settings.size} does not fit the network, which needs a multiple of {divisor} "
                     "(--size, or the bundle's prepare_settings).")
    summary_name = SUMMARY_NAME
    if args.shard is not None:
        records = select_shard(records, *args.shard, key=lambda r: r.case_id)
        summary_name = f"inference_summary.shard-{args.shard[0]}-of-{args.shard[1]}.json"
    summary = infer_cases(
        records, make_detector if args.workers > 1 else detector, settings=settings, threshold=threshold,
        out_dir=args.out, min_lesion_mm3=args.min_lesion_mm3, batch_size=args.batch_size, device=device,
        overwrite=args.overwrite, overlay=args.overlay, strict=args.strict, workers=args.workers,
        summary_name=summary_name, sf=int(bundle_settings.get("sf", DEFAULT_SF)),
        slice_context=recorded_slice_context(bundle_settings).to_json(),
    )
    line = f"infer: {summary['n_cases'] - summary['n_failed']} of {summary['n_cases']} cases done -> {args.out}"
    if summary["n_failed"]:
        print(f"{line}; {summary['n_failed']} failed: {', '.join(summary['failed'])} "
              f"(see {Path(args.out) / summary_name})", file=sys.stderr)
        return 1
    print(line)
    return 0
