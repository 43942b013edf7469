"""``python -m benchmarks``: run the benchmark parts, print one table and optionally write JSON.

    python -m benchmarks [--parts prepare,train,highpass,infer,workers] [--repeats N] [--json OUT.json] [--size 256]
                         [--profile]

Figures compare only within one run on one machine: rerun the whole thing rather than mixing numbers of two runs.
The default run needs about 15 CPU-minutes (about 8-10 minutes on 2 idle cores), two thirds of it the paper-width
training steps; on a loaded machine it takes longer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks import parts
from benchmarks.harness import Figure, format_table, machine_info, write_report

PARTS = ("prepare", "train", "highpass", "infer", "workers")


def _parts(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none)'}; choose from {PARTS}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=_parts, default=list(PARTS),
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--repeats", type=_positive, default=3,
                        help="repeats per figure (timed training steps: this many for the default preset, at most "
                             f"{parts.PAPER_MAX_STEPS} for paper); default 3")
    parser.add_argument("--size", type=_positive, default=256, help="slice size in pixels (default 256)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures and details to this file")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of one prepare run (top functions by own and cumulative time)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts; exit status 1 when a part failed (its error is printed and kept in the JSON)."""
    args = build_parser().parse_args(argv)
    started = time.time()
    figures: list[Figure] = []
    details: dict = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="hepafair-bench-") as tmp_name:
        tmp = Path(tmp_name)
        record = source = None
        if {"prepare", "infer", "workers"} & set(args.parts) or args.profile:
            record, source = parts.benchmark_case(tmp / "data")
            details["data"] = source
        runs = {
            "prepare": lambda: parts.bench_prepare(record, args.size, args.repeats, tmp),
            "train": lambda: parts.bench_train(args.size, args.repeats),
            "highpass": lambda: parts.bench_highpass(args.size, args.repeats),
            "infer": lambda: parts.bench_infer(record, args.size, args.repeats, tmp),
            "workers": lambda: parts.bench_workers(record, args.size, args.repeats, tmp),
        }
        for name in args.parts:
            print(f"[{name}] running ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                part_figures, details[name] = runs[name]()
            except Exception as exc:  # one failing part must not lose the others' figures
                traceback.print_exc()
                failed.append(name)
                details[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            figures += part_figures
            print(f"[{name}] done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if args.profile:
            profile = parts.profile_prepare(record, args.size, tmp)
            details["prepare_profile"] = profile
            print(profile)
    meta = {
        **machine_info(),
        "parts": args.parts,
        "repeats": args.repeats,
        "size": args.size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "failed_parts": failed,
    }
    print(format_table(figures))
    print(f"data: {details.get('data', '-')}; {meta['torch_threads']} torch threads; {meta['duration_s']:.0f} s")
    if failed:
        print(f"FAILED parts: {', '.join(failed)}", file=sys.stderr)
    if args.json is not None:
        print(f"json: {write_report(args.json, meta, figures, details)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
