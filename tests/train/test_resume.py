"""Training that survives a kill: models/resume.pt, --resume true, RNGState, ResumeCheckpoint and ResumeFrom."""

from __future__ import annotations

import io
import logging
import math
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointSaver

from pipeline.train.resume import BestMetricState, ResumeCheckpoint, ResumeFrom
from pipeline.train.rng import RNGState
from pipeline.train.runtime import as_flag
from pipeline.train.schedule import SkipDecayAlphaHandler, lr_schedule
from transforms.errors import InputDataError
from transforms.synthesis import RandLiverAnomalyd

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "liver_ct_anomaly_detection"
EPOCHS, TRAIN_SLICES, BATCH = 4, 4, 2
ITERS_PER_EPOCH = TRAIN_SLICES // BATCH


# ------------------------------------------------------------------------------------------------ unit tests


def _slice_dict(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    liver = np.zeros((1, 32, 32), np.float32)
    liver[:, 4:28, 4:28] = 1.0
    return {"image": rng.random((1, 32, 32), dtype=np.float32) * liver, "liver": liver}


def _draw(synthesis: RandLiverAnomalyd) -> list:
    """One value from every generator RNGState covers, plus three synthesised anomalies."""
    out = [torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]]
    for seed in range(3):
        out.append(synthesis(_slice_dict(seed))["anomaly_mask"].numpy().tolist())
    return out


def test_rng_state_round_trip_through_weights_only_file():
    synthesis = RandLiverAnomalyd(keys="image", prob=1.0)
    rng_state = RNGState([synthesis])
    # MONAI's DataLoader replaces the transforms' RandomState objects after the config is built
    synthesis.set_random_state(seed=7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _draw(synthesis)  # move every generator away from its seed

    buffer = io.BytesIO()
    torch.save(rng_state.state_dict(), buffer)
    expected = _draw(synthesis)
    other = _draw(synthesis)
    assert other != expected  # the draws really depend on the state

    buffer.seek(0)
    rng_state.load_state_dict(torch.load(buffer, weights_only=True))
    assert _draw(synthesis) == expected
    # the Perlin mask transform inside shares the restored generator
    assert synthesis.synth.perlin.R is synthesis.R


def test_rng_state_rejects_another_pipeline():
    state = RNGState([RandLiverAnomalyd(keys="image")]).state_dict()
    # RandLiverAnomalyd, RandLiverAnomaly, RandPerlinMask, RandLesionLikeAnomaly (all share one R)
    assert len(state["transforms"]) == 4
    with pytest.raises(ValueError, match="configuration the checkpoint was written with"):
        RNGState([]).load_state_dict(state)


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True),
        ("true", True),
        ("True", True),
        ("1", True),
        (False, False),
        ("false", False),
        ("no", False),
        (None, False),
        (0, False),
    ],
)
def test_as_flag(value, expected):
    assert as_flag(value) is expected


def test_as_flag_rejects_other_strings():
    with pytest.raises(ValueError, match="true or false"):
        as_flag("maybe")


def _toy_trainer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, log: list) -> Engine:
    def step(engine: Engine, batch: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        log.append(engine.state.epoch)
        return float(loss.detach())

    engine = Engine(step)
    engine.network = model
    return engine


def _toy_objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_resume_checkpoint_then_resume_from_continues_after_the_saved_epoch(tmp_path: Path, caplog):
    data = [torch.ones(2, 3)] * 3
    model, optimizer = _toy_objects(0)
    epochs_run: list[int] = []
    trainer = _toy_trainer(model, optimizer, epochs_run)
    ResumeCheckpoint(tmp_path, {"model": model, "optimizer": optimizer, "ema": None}).attach(trainer)
    trainer.run(data, max_epochs=2)
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert set(saved) == {"model", "optimizer", "trainer"}  # None entries are left out
    assert saved["trainer"]["iteration"] == 6
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed

    fresh_model, fresh_optimizer = _toy_objects(1)
    resumed_epochs: list[int] = []
    resumed = _toy_trainer(fresh_model, fresh_optimizer, resumed_epochs)
    handler = ResumeFrom(tmp_path / "resume.pt", {"model": fresh_model, "optimizer": fresh_optimizer}, "true")
    handler.attach(resumed)
    with caplog.at_level(logging.INFO):
        resumed.run(data, max_epochs=3)
    assert resumed_epochs == [3, 3, 3]
    assert resumed.state.iteration == 9
    assert "Resumed from" in caplog.text and "epoch 2, iteration 6" in caplog.text

    # the same three epochs without an interruption give the same weights
    model_c, optimizer_c = _toy_objects(0)
    _toy_trainer(model_c, optimizer_c, []).run(data, max_epochs=3)
    torch.testing.assert_close(fresh_model.weight, model_c.weight)


def test_resume_from_disabled_or_missing_file_loads_nothing(tmp_path: Path, caplog):
    model, optimizer = _toy_objects(0)
    trainer = _toy_trainer(model, optimizer, [])
    ResumeCheckpoint(tmp_path, {"model": model}).attach(trainer)
    trainer.run([torch.ones(2, 3)], max_epochs=2)

    for enabled, path in (
        (False, tmp_path / "resume.pt"),
        ("false", tmp_path / "resume.pt"),
        (True, tmp_path / "missing.pt"),
    ):
        epochs: list[int] = []
        engine = _toy_trainer(*_toy_objects(0), epochs)
        with caplog.at_level(logging.INFO):
            ResumeFrom(path, {"model": engine.network}, enabled=enabled).attach(engine)
        engine.run([torch.ones(2, 3)], max_epochs=2)
        assert epochs == [1, 2]  # from scratch: a loaded checkpoint (epoch 2) would have left nothing to run
    assert "No checkpoint to resume from" in caplog.text

    with pytest.raises(InputDataError, match="missing.pt"):
        ResumeFrom(tmp_path / "missing.pt", {"model": model}, enabled=True, required=True).attach(
            _toy_trainer(*_toy_objects(0), [])
        )


def test_best_metric_state_keeps_a_worse_model_from_replacing_the_best(tmp_path: Path):
    def setup(weight: float) -> tuple[SimpleNamespace, CheckpointSaver, Engine]:
        evaluator = SimpleNamespace(state=SimpleNamespace(best_metric=-1, best_metric_epoch=-1))
        model = torch.nn.Linear(1, 1)
        torch.nn.init.constant_(model.weight, weight)
        saver = CheckpointSaver(
            str(tmp_path), {"model": model}, save_key_metric=True, key_metric_name="auc", key_metric_filename="model.pt"
        )
        return evaluator, saver, Engine(lambda engine, batch: None)

    def saved_weight() -> float:
        return float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"])

    evaluator, saver, engine = setup(weight=1.0)
    engine.state.metrics = {"auc": 0.7}
    saver.metrics_completed(engine)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.7, 3
    buffer = io.BytesIO()
    torch.save(BestMetricState(evaluator, saver).state_dict(), buffer)

    evaluator, saver, engine = setup(weight=2.0)  # the resumed run
    buffer.seek(0)
    BestMetricState(evaluator, saver).load_state_dict(torch.load(buffer, weights_only=True))
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.7, 3)
    engine.state.metrics = {"auc": 0.6}
    saver.metrics_completed(engine)
    assert saved_weight() == 1.0  # worse than before the interruption: the best model stays
    engine.state.metrics = {"auc": 0.8}
    saver.metrics_completed(engine)
    assert saved_weight() == 2.0
    BestMetricState(evaluator, None).load_state_dict(BestMetricState(evaluator, saver).state_dict())  # no saver: ok


# ------------------------------------------------------------------------------------------ bundle, killed


@pytest.fixture(scope="module")
def prepared(tiny_phantom_set: Path) -> Path:
    return tiny_phantom_set


def _training_command(prepared: Path, bundle_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
        "--bundle_root", str(bundle_root), "--dataset_dir", str(prepared / "prepared"),
        "--epochs", str(EPOCHS), "--val_interval", str(EPOCHS), "--batch_size", str(BATCH),
        "--log_every", "1", "--progress", "false", "--ema_momentum", "0.5",
        # the paper's skip fade (the default holds alpha at 1): the restored alpha must follow the schedule
        "--alpha_end", "0.0",
        # a few training slices keep every epoch short; the schedule logic does not care about the size
        "--train#dataset#data", f"$@manifest['training'][:{TRAIN_SLICES}]",
        *extra,
    ]  # fmt: skip


def _scheduled_lrs(epochs: int) -> list[float]:
    """The learning rates of train.yaml's default schedule after each of ``epochs`` epochs."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.yaml")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=parser.get_parsed_content("learning_rate"))
    scheduler = lr_schedule(optimizer, parser.get_parsed_content("lr_schedule"), epochs,
                            parser.get_parsed_content("warmup_epochs"))
    lrs = []
    for _ in range(epochs):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def _saved_epoch(path: Path) -> int | None:
    """The epoch in a resume checkpoint; the file is only ever replaced by a rename, so it is complete or absent."""
    if not path.is_file():
        return None
    trainer = torch.load(path, weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


@contextmanager
def _background(command: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A process writing to ``log_path``, killed on the way out if it still runs."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=BUNDLE, stdout=log, stderr=log)
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_killed_training_resumes_where_it_stopped(prepared: Path, tmp_path: Path):
    bundle_root, reference_root = tmp_path / "bundle_root", tmp_path / "reference"
    resume_file = bundle_root / "models" / "resume.pt"
    # the same training without interruption runs alongside, to compare the weights with at the end
    with _background(_training_command(prepared, reference_root), tmp_path / "reference.log") as reference:
        with _background(_training_command(prepared, bundle_root), tmp_path / "first.log") as first:
            deadline = time.monotonic() + 300
            while (_saved_epoch(resume_file) or 0) < 1:
                log = (tmp_path / "first.log").read_text()[-3000:]
                assert first.poll() is None, f"training ended before it was killed:\n{log}"
                assert time.monotonic() < deadline, "no resume checkpoint after 300 s"
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)
            assert first.wait() == -signal.SIGKILL
        k = _saved_epoch(resume_file)  # re-read: an epoch may have completed between the poll and the kill
        assert 1 <= k < EPOCHS, f"killed after epoch {k}: nothing left to resume"
        assert not (bundle_root / "models" / "checkpoint_final.pt").exists()

        second = subprocess.run(
            _training_command(prepared, bundle_root, "--resume", "true"),
            cwd=BUNDLE, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]

    resumed = re.search(r"Resumed from (\S+): epoch (\d+), iteration (\d+), alpha ([-\d.e]+)", out)
    assert resumed is not None, out[-3000:]
    assert Path(resumed[1]) == resume_file
    assert int(resumed[2]) == k and int(resumed[3]) == k * ITERS_PER_EPOCH
    # the restored alpha is the schedule's value at the last iteration before the kill
    total = EPOCHS * ITERS_PER_EPOCH
    schedule = SkipDecayAlphaHandler(torch.nn.Identity(), decay_fraction=0.2)
    assert math.isclose(float(resumed[4]), schedule.alpha_at(k * ITERS_PER_EPOCH, total), abs_tol=1e-5)
    # only the remaining epochs ran, every iteration of them
    logged = {(int(e), int(i)) for e, i in re.findall(rf"Epoch: (\d+)/{EPOCHS}, Iter: (\d+)/{ITERS_PER_EPOCH}", out)}
    assert logged == {(e, i) for e in range(k + 1, EPOCHS + 1) for i in range(1, ITERS_PER_EPOCH + 1)}

    models = bundle_root / "models"
    final = torch.load(models / "checkpoint_final.pt", weights_only=True)
    assert float(final["model"]["segmentation.alpha"]) == schedule.alpha_at(total, total) == 0.0
    # the LR schedule went on to its end: the default warm-up + cosine stepped once per epoch, as uninterrupted
    assert final["lr_scheduler"]["last_epoch"] == EPOCHS
    expected = _scheduled_lrs(EPOCHS)
    assert math.isclose(final["optimizer"]["param_groups"][0]["lr"], expected[-1], abs_tol=1e-12)
    assert len(set(expected)) > 2, "the schedule must move for this check to mean something"
    last = torch.load(resume_file, weights_only=True)
    assert last["trainer"]["iteration"] == total
    assert set(last) == {"model", "optimizer", "lr_scheduler", "ema", "best", "rng", "trainer"}
    assert last["best"]["best_metric_epoch"] == EPOCHS
    assert (models / "inference.json").is_file()

    # weights, optimizer, EMA weights (model.pt) and random draws continued exactly as without the interruption
    reference_final = torch.load(reference_root / "models" / "checkpoint_final.pt", weights_only=True)
    for key in ("model", "optimizer"):
        torch.testing.assert_close(final[key], reference_final[key])
    torch.testing.assert_close(
        torch.load(models / "model.pt", weights_only=True),
        torch.load(reference_root / "models" / "model.pt", weights_only=True),
    )
