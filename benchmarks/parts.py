"""The benchmark parts: prepare, train, highpass, infer. Each returns its figures and a dict of details.

Each cost is measured beside its floor in the same run:

- prepare: ``pipeline.data.prepare.prepare_case`` (NIfTI -> cached slices) against reading and decompressing the two
  NIfTI files with nibabel; target <= 2x the floor.
- train: slices/s of the training step and peak RSS, default vs paper width preset, one subprocess per preset
  (:mod:`benchmarks.train_step`); target: default >= 10x faster. Also the default in bfloat16 autocast with
  channels_last (the bundle's ``amp_dtype: bfloat16, channels_last: true``), against float32.
- highpass: the Butterworth high-pass alone against the whole detector forward (default preset).
- infer: ``pipeline.infer.volume.infer_volume`` against NIfTI decode + the detector's forward on the same slices.
- workers: ``pipeline.data.prepare.prepare`` of a small cohort (the benchmark case under several ids) with 1 and 2
  worker processes, in volumes/s, worker start-up included; 2 workers on 2 idle cores: ideally close to 2x.
"""

from __future__ import annotations

import cProfile
import importlib.util
import io
import json
import pstats
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from benchmarks.harness import Figure, ratio_figure, time_call
from networks.detector import FrequencyAwareDetector
from pipeline.common.io import save_nifti
from pipeline.data.datasets import PRESETS, CaseRecord
from pipeline.data.prepare import prepare, prepare_case
from pipeline.data.settings import PrepareSettings

__all__ = [
    "REPO",
    "SHARED_DATA",
    "TRAIN_BATCH",
    "INFER_BATCH",
    "benchmark_case",
    "decode_nifti",
    "bench_prepare",
    "profile_prepare",
    "bench_train",
    "bench_highpass",
    "bench_infer",
    "bench_workers",
]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TRAIN_BATCH = 8
INFER_BATCH = 16  # infer_volume's default
PAPER_MAX_STEPS = 2  # a paper-width step takes minutes on a CPU
PAPER_WARMUP_BATCH = 2  # not 1: batch norm needs two values per channel at the 1x1 bottom of small slices
TRAIN_TIMEOUT_S = 1800


def benchmark_case(tmp: Path) -> tuple[CaseRecord, str]:
    """IRCADb patient 17 from ``../shared/data`` or, when absent, a phantom of the same size written to ``tmp``.

    Returns the case and a one-line description of where it came from.
    """
    folder = SHARED_DATA / "ircadb"
    image, label = folder / "ircadb_p17_ct.nii.gz", folder / "ircadb_p17_label_liver1_tumor2.nii.gz"
    preset = PRESETS["ircadb"]
    if image.is_file() and label.is_file():
        return CaseRecord("ircadb_p17", image, label, "ircadb", preset.liver_values, preset.lesion_values), str(image)
    from pipeline.data.phantom import make_phantom_case

    case = make_phantom_case(seed=17, case_id="phantom_p17", size=512, n_slices=119)
    tmp.mkdir(parents=True, exist_ok=True)
    image, label = tmp / "phantom_p17_ct.nii.gz", tmp / "phantom_p17_label.nii.gz"
    save_nifti(image, case.ct, case.affine, overwrite=True)
    save_nifti(label, case.label, case.affine, overwrite=True)
    phantom = PRESETS["phantom"]
    description = f"phantom 512x512x119 (no {folder}); not real CT"
    return CaseRecord("phantom_p17", image, label, "phantom", phantom.liver_values, phantom.lesion_values), description


def decode_nifti(record: CaseRecord) -> tuple[int, ...]:
    """The floor of any pipeline step that reads a case: read and decompress the CT and the label into memory.

    Returns the CT's shape.
    """
    shape: tuple[int, ...] = ()
    for path in (record.image, record.label):
        array = np.asanyarray(nib.load(path).dataobj)
        shape = shape or array.shape
    return shape


def bench_prepare(record: CaseRecord, size: int, repeats: int, tmp: Path) -> tuple[list[Figure], dict]:
    """Seconds per volume of ``prepare_case`` into a fresh folder, beside the NIfTI decode floor, paired by repeat.

    One untimed round first, so the page cache and lazy imports do not land on the first timed repeat.
    """
    settings = PrepareSettings(size=size)
    decode_s, prepare_s = [], []
    info: dict = {}
    for i in range(repeats + 1):
        t_decode, shape = time_call(decode_nifti, record)
        out = tmp / f"prepare_{i}"
        t_prepare, info = time_call(prepare_case, record, settings, out / "cases")
        shutil.rmtree(out)
        if i > 0:
            decode_s.append(t_decode)
            prepare_s.append(t_prepare)
    full = Figure.from_values("prepare: NIfTI -> cached slices", "s/volume", prepare_s)
    floor = Figure.from_values("prepare floor: NIfTI decode", "s/volume", decode_s)
    ratio = Figure.from_values(
        "prepare / decode", "x", [p / d for p, d in zip(prepare_s, decode_s)], target=("<=", 2.0),
        note="paired by repeat",
    )  # fmt: skip
    details = {"volume_shape": list(shape), "slices_written": len(info.get("slices", [])), "size": size}
    return [full, floor, ratio], details


def profile_prepare(record: CaseRecord, size: int, tmp: Path, top: int = 15) -> str:
    """cProfile of one ``prepare_case`` run: the ``top`` functions by own time and by cumulative time."""
    profiler = cProfile.Profile()
    out = tmp / "prepare_profile"
    profiler.enable()
    prepare_case(record, PrepareSettings(size=size), out / "cases")
    profiler.disable()
    shutil.rmtree(out)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def _train_process(preset: str, size: int, warmup: int, steps: int, warmup_batch: int,
                   options: tuple[str, ...] = ()) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.train_step", "--width-preset", preset, "--size", str(size),
        "--batch", str(TRAIN_BATCH), "--warmup", str(warmup), "--warmup-batch", str(warmup_batch),
        "--steps", str(steps), *options,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train(size: int, repeats: int) -> tuple[list[Figure], dict]:
    """Training-step throughput and peak RSS of the default and paper presets at batch 8, in one process each.

    Default: ``repeats`` timed steps after one warm-up step. Paper: at most 2 timed steps after a warm-up step at
    batch 2 (one-time costs such as creating the Adam state do not depend on the batch size).
    """
    runs = {
        "default": _train_process("default", size, 1, repeats, TRAIN_BATCH),
        "paper": _train_process("paper", size, 1, min(repeats, PAPER_MAX_STEPS), PAPER_WARMUP_BATCH),
        "default bf16 cl": _train_process("default", size, 1, repeats, TRAIN_BATCH,
                                          ("--amp-dtype", "bfloat16", "--channels-last")),
    }
    figures, speed = [], {}
    for name, run in runs.items():
        speed[name] = Figure.from_values(
            f"train step ({name})", "slices/s", [run["batch"] / s for s in run["step_s"]],
            note=f"batch {run['batch']}, {size}x{size}, {len(run['step_s'])} timed steps, {run['parameters']:,} "
                 "parameters" + (", bfloat16 autocast, channels_last" if run.get("channels_last") else ""),
        )  # fmt: skip
        figures.append(speed[name])
    for name in ("default", "paper"):
        figures.append(Figure.from_values(f"train peak RSS ({name})", "MiB", [runs[name]["maxrss_mb"]],
                                          note="whole process (Python, torch, model, one batch)"))
    figures.append(ratio_figure("train speed default / paper", speed["default"], speed["paper"], target=(">=", 10.0),
                                note="min/max: the range the two spreads allow"))
    figures.append(ratio_figure("train speed bf16 cl / float32", speed["default bf16 cl"], speed["default"],
                                note="bfloat16 autocast + channels_last vs float32, default preset; CPU-dependent"))
    return figures, runs


def bench_highpass(size: int, repeats: int, inner: int = 10) -> tuple[list[Figure], dict]:
    """The Butterworth high-pass alone vs the detector's whole forward (default preset, batch 8, no gradients).

    The high-pass takes milliseconds, so each of its repeats is the mean of ``inner`` calls.
    """
    torch.manual_seed(0)
    network = FrequencyAwareDetector.from_preset("default").eval()
    highpass = network.highpass
    x = torch.rand(TRAIN_BATCH, 1, size, size)
    hp_ms, forward_ms = [], []
    with torch.inference_mode():
        highpass(x), network(x)  # warm-up: the cached filter, allocator and oneDNN kernels
        for _ in range(repeats):
            t_hp, _ = time_call(lambda: [highpass(x) for _ in range(inner)])
            t_forward, _ = time_call(lambda: network(x))
            hp_ms.append(1000.0 * t_hp / inner)
            forward_ms.append(1000.0 * t_forward)
    figures = [
        Figure.from_values(f"high-pass ({TRAIN_BATCH}x{size}^2)", "ms", hp_ms, note=f"mean of {inner} calls each"),
        Figure.from_values(f"detector forward ({TRAIN_BATCH}x{size}^2)", "ms", forward_ms),
        Figure.from_values("high-pass share of forward", "%", [100.0 * h / f for h, f in zip(hp_ms, forward_ms)],
                           note="paired by repeat"),
    ]
    return figures, {"batch": TRAIN_BATCH, "size": size, "inner_calls": inner}


def _decode_and_forward(record: CaseRecord, detector: torch.nn.Module, n_slices: int, size: int) -> None:
    """The floor of volume inference: decode the NIfTI files, then the detector on ``n_slices`` slices in batches
    of ``INFER_BATCH`` (random input: the cost does not depend on the values)."""
    decode_nifti(record)
    with torch.inference_mode():
        for first in range(0, n_slices, INFER_BATCH):
            detector.anomaly_map(torch.rand(min(INFER_BATCH, n_slices - first), 1, size, size))


def bench_infer(record: CaseRecord, size: int, repeats: int, tmp: Path) -> tuple[list[Figure], dict]:
    """Seconds per volume of ``pipeline.infer.volume.infer_volume`` beside its floor: NIfTI decode + the detector's
    forward on as many slices as the volume has liver slices, at the same batch size.

    Written against the API of ``pipeline.infer.settings`` (``load_detector``) and ``pipeline.infer.volume``
    (``infer_volume``); prints "not available" and returns no figures when they are absent. The detector has random
    weights (the speed does not depend on them) and the threshold is above any map value, so lesion-candidate
    post-processing is not timed.
    """
    if importlib.util.find_spec("pipeline.infer.volume") is None:
        print("infer: not available (pipeline.infer.volume is not installed)", file=sys.stderr)
        return [], {"status": "not available"}
    from pipeline.infer.settings import load_detector
    from pipeline.infer.volume import infer_volume

    torch.manual_seed(0)
    ckpt = tmp / "infer_model" / "model.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(FrequencyAwareDetector.from_preset("default").state_dict(), ckpt)
    detector = load_detector(ckpt)
    settings = PrepareSettings(size=size)
    decode_nifti(record)  # page cache
    with torch.inference_mode():
        detector.anomaly_map(torch.rand(INFER_BATCH, 1, size, size))  # warm-up
    infer_s, floor_s, stages = [], [], []
    for i in range(repeats):
        t_infer, report = time_call(
            infer_volume, record.image, record.label, detector, liver_values=record.liver_values,
            lesion_values=record.lesion_values, settings=settings, threshold=1.01, batch_size=INFER_BATCH,
            out_dir=tmp / f"infer_{i}",
        )  # fmt: skip
        n_slices = len(report["slices"])
        t_floor, _ = time_call(_decode_and_forward, record, detector, n_slices, size)
        shutil.rmtree(tmp / f"infer_{i}")
        infer_s.append(t_infer)
        floor_s.append(t_floor)
        stages.append(report.get("timings_s", {}))
    figures = [
        Figure.from_values("infer: NIfTI -> heatmap + mask + report", "s/volume", infer_s),
        Figure.from_values("infer floor: decode + detector forward", "s/volume", floor_s,
                           note=f"{n_slices} slices, batch {INFER_BATCH}"),
        Figure.from_values("infer / floor", "x", [a / b for a, b in zip(infer_s, floor_s)], note="paired by repeat"),
    ]
    stage_medians = {k: statistics.median(s[k] for s in stages) for k in stages[0]} if stages[0] else {}
    return figures, {"liver_slices": n_slices, "batch": INFER_BATCH, "stage_median_s": stage_medians}


def bench_workers(record: CaseRecord, size: int, repeats: int, tmp: Path, n_volumes: int = 4) -> tuple[list[Figure],
                                                                                                           dict]:
    """Volumes/s of ``prepare`` over ``n_volumes`` cases with 1 and 2 workers (a fresh folder each time)."""
    from dataclasses import replace

    records = [replace(record, case_id=f"{record.case_id}_{k}") for k in range(n_volumes)]
    rates: dict[int, list[float]] = {1: [], 2: []}
    for i in range(repeats):
        for workers in rates:
            out = tmp / f"workers_{workers}_{i}"
            seconds, _ = time_call(prepare, records, out, PrepareSettings(size=size), progress=False, workers=workers)
            shutil.rmtree(out)
            rates[workers].append(n_volumes / seconds)
    figures = [Figure.from_values(f"prepare --workers {w}", "volumes/s", v, note=f"{n_volumes} volumes, start-up "
                                  "included") for w, v in rates.items()]
    figures.append(Figure.from_values("2 workers / 1 worker", "x", [b / a for a, b in zip(rates[1], rates[2])],
                                      note="paired by repeat"))
    return figures, {"n_volumes": n_volumes, "size": size}
