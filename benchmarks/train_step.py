"""One process, one width preset: time the training step and report the process's peak memory.

Run by ``python -m benchmarks`` in a fresh subprocess per preset, so that each peak RSS belongs to one preset alone:
``python -m benchmarks.train_step --width-preset default --size 256 --batch 8 --warmup 1 --steps 5``. Prints one JSON
line: ``{"preset", "size", "batch", "amp_dtype", "channels_last", "step_s": [...], "maxrss_mb", "threads",
"parameters"}``. ``--amp-dtype bfloat16 --channels-last`` times the step as the bundle runs it with ``amp: true,
amp_dtype: bfloat16, channels_last: true`` (autocast in bfloat16; network and inputs in channels_last memory format).
Warm-up steps may use a smaller batch (``--warmup-batch``): for the paper preset a step takes minutes on a CPU, and
the one-time costs a warm-up absorbs (Adam state, oneDNN kernel choice, lazy imports) hardly depend on the batch size.

The step is the bundle's own :class:`pipeline.train.step.DetectorTrainStep` (forward with both outputs, the joint
loss, backward, Adam) on a fixed synthetic batch; data loading and anomaly synthesis are not included.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from networks.detector import FrequencyAwareDetector
from networks.losses import DetectorLoss
from pipeline.train.step import DetectorTrainStep


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch as the train loader gives it: ``image`` (the clean slice with a square anomaly pasted in),
    ``clean`` and ``anomaly_mask``, all (batch, 1, size, size) float32; images in [0, 1], the mask {0, 1}."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, 1, size, size, generator=generator)
    mask = torch.zeros_like(clean)
    mask[..., size // 4 : size // 2, size // 4 : size // 2] = 1.0
    image = torch.where(mask > 0, torch.rand(clean.shape, generator=generator), clean)
    return {"image": image, "clean": clean, "anomaly_mask": mask}


def measure(preset: str, size: int, batch: int, warmup: int, steps: int, warmup_batch: int | None = None,
            amp_dtype: str | None = None, channels_last: bool = False) -> dict:
    """Seconds of ``steps`` training steps after ``warmup`` untimed ones (of ``warmup_batch`` slices, default
    ``batch``), and the process's peak RSS in MiB. ``amp_dtype`` (e.g. ``"bfloat16"``) turns autocast on in that
    dtype; ``channels_last`` converts the network and the inputs, as the bundle's options of the same names do."""
    torch.manual_seed(0)
    network = FrequencyAwareDetector.from_preset(preset)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu")),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-4),
        loss_function=DetectorLoss(),
        amp=amp_dtype is not None,
        scaler=None,  # bfloat16 needs no loss scaling (the bundle's CPU GradScaler is disabled, the same)
    )
    step = DetectorTrainStep(channels_last=channels_last, amp_dtype=amp_dtype or "float16")
    warm = synthetic_batch(warmup_batch or batch, size)
    for _ in range(warmup):
        step(engine, warm)
    data = synthetic_batch(batch, size)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(engine, data)
        times.append(time.perf_counter() - start)
    return {
        "preset": preset,
        "size": size,
        "batch": batch,
        "amp_dtype": amp_dtype,
        "channels_last": channels_last,
        "step_s": times,
        # Linux reports ru_maxrss in KiB
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in network.parameters()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints the JSON result as the last line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--width-preset", default="default", choices=sorted(FrequencyAwareDetector.PRESETS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--warmup-batch", type=int, default=None, help="batch of the warm-up steps (default --batch)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"),
                        help="autocast dtype (default: off)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last network and inputs")
    args = parser.parse_args(argv)
    result = measure(args.width_preset, args.size, args.batch, args.warmup, args.steps, args.warmup_batch,
                     args.amp_dtype, args.channels_last)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
