"""Multi-process training: the bundle's multi_gpu_train.yaml run by torchrun with 2 CPU processes (gloo).

The run writes one log per rank (torchrun ``--log-dir``/``--redirects``), so every check below can say which rank
did what: both ranks train and validate, only rank 0 prints statistics, writes TensorBoard files and checkpoints.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser

from networks.detector import FrequencyAwareDetector
from pipeline.data.datasets import discover
from pipeline.data.phantom import write_phantom_cohort
from pipeline.data.prepare import prepare
from pipeline.data.settings import PrepareSettings

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "liver_ct_anomaly_detection"
CONFIGS = BUNDLE / "configs"
SIZE = 64
NPROC = 2
TIMEOUT_S = 240  # a collective mismatch hangs forever instead of failing: never wait without a limit

# Handlers that must run on rank 0 only; everything else in the handler lists (LR schedule, EMA, skip decay,
# validation) must run on every rank.
RANK0_ONLY = {"StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver", "pipeline.train.progress.TrainingProgress"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]


def _target(handler: object) -> str | None:
    return handler.get("_target_") if isinstance(handler, dict) else None


def test_rank0_only_overrides_point_at_rank0_handlers():
    """train.yaml lists its handlers by key; multi_gpu_train.yaml disables exactly the rank-0-only ones, by key."""
    train = ConfigParser(ConfigParser.load_config_file(CONFIGS / "train.yaml"))
    multi = ConfigParser.load_config_file(CONFIGS / "multi_gpu_train.yaml")
    disabled = set()
    for key, value in multi.items():
        if key.endswith("#_disabled_"):
            assert value == "$torch.distributed.get_rank() > 0", key
            disabled.add(key.removesuffix("#_disabled_"))
    expected = set()
    for section in ("train", "validate"):
        for ref in train[f"{section}#handlers"]:
            assert isinstance(ref, str) and ref.startswith("@"), f"{section}#handlers: {ref!r} is not a reference"
            if _target(train[ref[1:]]) in RANK0_ONLY:
                expected.add(ref[1:])
    assert disabled == expected, f"multi_gpu_train.yaml disables {sorted(disabled)}; needed: {sorted(expected)}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """One 2-process training epoch on a tiny prepared phantom set; returns the paths, exit code and per-rank logs."""
    root = tmp_path_factory.mktemp("ddp")
    write_phantom_cohort(root / "raw", n_cases=4, size=SIZE, n_slices=10)
    manifest = prepare(discover(root / "raw", label_preset="phantom"), root / "prepared", PrepareSettings(size=SIZE),
                       progress=False)
    assert len(manifest["training"]) >= NPROC and len(manifest["validation"]) >= NPROC
    bundle_root, log_dir = root / "bundle_root", root / "logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes=1", f"--nproc_per_node={NPROC}", "--log-dir", str(log_dir), "--redirects", "3",
        "-m", "monai.bundle", "run", "training",
        "--config_file", repr([str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")]),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--bundle_root", str(bundle_root),
        "--dataset_dir", str(root / "prepared"),
        "--epochs", "1",
        "--batch_size", "2",
        "--log_every", "1",
        # a real weight average, so the EMA copy of the DDP-wrapped network is exercised too
        "--ema_momentum", "0.5",
    ]  # fmt: skip
    # own session: on a timeout the whole torchrun tree (agent + workers) is killed, not just the agent
    proc = subprocess.Popen(cmd, cwd=BUNDLE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s (a rank waits on a collective?):\n{output[-3000:]}")
    logs = {}
    for rank in range(NPROC):
        found = {name: sorted(log_dir.glob(f"*/attempt_*/{rank}/{name}.log")) for name in ("stdout", "stderr")}
        logs[rank] = {name: paths[-1].read_text() if paths else "" for name, paths in found.items()}
    return {"returncode": proc.returncode, "output": output, "logs": logs, "bundle_root": bundle_root}


def _describe(run: dict) -> str:
    parts = [run["output"][-2000:]]
    for rank, streams in run["logs"].items():
        parts += [f"--- rank {rank} stdout ---", streams["stdout"][-2000:], f"--- rank {rank} stderr ---",
                  streams["stderr"][-2000:]]
    return "\n".join(parts)


def test_both_ranks_train_and_validate(ddp_run):
    assert ddp_run["returncode"] == 0, _describe(ddp_run)
    best = {}
    for rank in range(NPROC):
        out = ddp_run["logs"][rank]["stdout"]
        assert "SupervisedTrainer - INFO - Engine run finished" in out, f"rank {rank} did not finish training"
        assert "SupervisedEvaluator - INFO - Engine run finished" in out, f"rank {rank} did not validate"
        best[rank] = re.findall(r"Got new best metric of val_image_auroc: (\S+)", out)
        assert best[rank], f"rank {rank} computed no validation metric"
    # each rank scored its own shard; the metric gathers all shards, so every rank must report the same value
    assert best[0] == best[1]


def test_only_rank0_reports_and_saves(ddp_run):
    assert ddp_run["returncode"] == 0, _describe(ddp_run)
    rank0, rank1 = ddp_run["logs"][0], ddp_run["logs"][1]
    for marker in ("Epoch[1] Metrics", "train_loss", "saved final checkpoint"):
        assert marker in rank0["stdout"], f"rank 0 log lacks {marker!r}"
        assert marker not in rank1["stdout"], f"rank 1 log has {marker!r}"
    assert "train: [" not in rank1["stderr"], "rank 1 shows a progress bar"
    all_logs = "".join(s["stdout"] for s in ddp_run["logs"].values())
    assert all_logs.count("saved final checkpoint") == 1

    models = ddp_run["bundle_root"] / "models"
    assert {"checkpoint_final.pt", "model.pt"} <= {p.name for p in models.glob("*.pt")}
    # TensorBoard files carry the writer's process id in their name: one process wrote them all
    events = list((ddp_run["bundle_root"] / "eval").glob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, [p.name for p in events]


def test_checkpoint_loads_into_the_plain_network(ddp_run):
    """Checkpoints hold the unwrapped module's weights (no ``module.`` prefix from DistributedDataParallel)."""
    assert ddp_run["returncode"] == 0, _describe(ddp_run)
    models = ddp_run["bundle_root"] / "models"
    network = FrequencyAwareDetector.from_preset("default")
    network.load_state_dict(torch.load(models / "model.pt", map_location="cpu", weights_only=True))
    final = torch.load(models / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(final["model"])
    assert not any(key.startswith("module.") for key in final["model"])
