"""Training glue for MONAI's ignite workflows: our iteration function, the skip-decay schedule, data helpers.

The bundle's ``train.yaml`` wires these into ``monai.engines.SupervisedTrainer``; nothing here is bundle-specific.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.handlers import CheckpointLoader, ValidationHandler
from monai.transforms import Compose, EnsureTyped, LoadImaged, Randomizable, Transform
from monai.utils import IgniteInfo, min_version, optional_import

from networks.losses import DetectorLoss
from networks.scoring import DEFAULT_SF
from pipeline.baselines import baseline_report
from pipeline.io import atomic_write, atomic_write_bytes, atomic_write_json
from pipeline.metrics import roc_auc
from transforms.errors import InputDataError
from transforms.roi import LiverMasksd

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while hasattr(network, "module") or hasattr(network, "_orig_mod"):
        network = getattr(network, "module", None) or network._orig_mod
    return network


def slice_loading(extra: Sequence[Any] = ()) -> Compose:
    """Load a prepared slice: ``{"image": .npy, "label": .npy}`` -> image (1, S, S) float32 in [0, 1], label (1, S, S)
    uint8 (0/1/2), ``liver`` and ``lesion`` (1, S, S) float32 {0, 1}; then ``extra`` transforms."""
    return Compose(
        [
            LoadImaged(keys=["image", "label"], reader="NumpyReader", image_only=True),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            EnsureTyped(keys="label", track_meta=False),
            LiverMasksd(keys="label"),
            *extra,
        ]
    )


def slice_dataset(entries: Sequence[dict], transform: Compose, cache: bool = True, **kwargs) -> CacheDataset:
    """A dataset of manifest slice entries; the deterministic loading prefix is cached in memory."""
    return CacheDataset(list(entries), transform, cache_rate=1.0 if cache else 0.0, progress=False, **kwargs)


class DetectorTrainStep:
    """``iteration_update`` for ``SupervisedTrainer``: one optimisation step of the joint detector.

    Reads from the batch ``image`` (the synthesised input, (B, 1, H, W) in [0, 1]), ``clean`` (the restoration
    target) and ``anomaly_mask`` (the segmentation target, {0, 1}). The network is called through its ``forward``
    (``output="both"``) so DistributedDataParallel synchronises gradients. Uses the trainer's AMP flag and scaler.

    Returns ``[{"loss": float, "restoration": float, "segmentation": float, "alpha": float}]`` as the engine output:
    a one-item list of dicts, the shape MONAI's decollated trainer output has, so MONAI's handlers and the
    ``--tracking mlflow`` defaults (``from_engine(['loss'], first=True)``) read the loss as they expect.
    """

    def __init__(self, loss: DetectorLoss | None = None, channels_last: bool = False, amp_dtype: str = "float16"):
        self.loss = loss
        self.channels_last = channels_last
        self.amp_dtype = getattr(torch, amp_dtype)

    def _to(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = torch.as_tensor(x).to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def __call__(self, engine: Any, batch: dict) -> list[dict]:
        device = engine.state.device
        image, clean, mask = (self._to(batch[k], device) for k in ("image", "clean", "anomaly_mask"))
        loss_fn = self.loss if self.loss is not None else engine.loss_function
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=bool(engine.amp)):
            restored, logits = engine.network(image)
            parts = loss_fn(restored, logits, clean, mask)
        loss = parts["loss"]
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["alpha"] = float(getattr(unwrap(engine.network), "alpha", None) or 0.0)
        return [out]


class SkipDecayAlphaHandler:
    """Decay the segmentation net's skip weight α linearly per iteration, from ``start`` to ``end`` over the first
    ``decay_fraction`` of all training iterations (WDMT: ``α -= deta / iters_per_epoch``), then hold it.

    α is a function of the iteration count alone, so a resumed run continues on the same schedule. The current α
    is written to ``engine.state.alpha`` (and saved with the weights, as a buffer of the network).
    """

    def __init__(self, network: torch.nn.Module, decay_fraction: float = 0.2, start: float = 1.0, end: float = 0.0):
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        self.network, self.decay_fraction, self.start, self.end = network, decay_fraction, start, end

    def alpha_at(self, iteration: int, total: int) -> float:
        """α before iteration ``iteration`` (1-based) of ``total``."""
        span = max(1.0, self.decay_fraction * total)
        return max(self.end, self.start - (self.start - self.end) * (iteration - 1) / span)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Any) -> None:
        total = engine.state.max_epochs * engine.state.epoch_length
        alpha = self.alpha_at(engine.state.iteration, total)
        unwrap(self.network).set_alpha(alpha)
        engine.state.alpha = alpha


class TrainingProgress:
    """A tqdm progress bar over each training epoch (ignite's ``ProgressBar``), attached only when ``enabled``.

    A handler of its own so that a config switches it with one key (``progress: false`` for logs to files;
    ``--progress false`` on the command line works too, see :func:`as_flag`).
    """

    def __init__(self, enabled: bool | str = True) -> None:
        self.enabled = as_flag(enabled)

    def attach(self, engine: Any) -> None:
        if self.enabled:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False, desc="train").attach(
                engine, output_transform=lambda out: {"loss": out[0]["loss"]}
            )


class WeightEMA:
    """Exponential moving average of the network's weights, as an ignite handler.

    ``model`` is what evaluation and checkpoints should use: with ``momentum=None`` it is the (unwrapped) network
    itself and nothing is copied; otherwise a frozen copy updated after every iteration as
    ``ema = (1 - momentum) * ema + momentum * weights``, with buffers (BatchNorm statistics, the skip-decay α) copied.
    Averaging damps the swings of small-data training between checkpoints.
    """

    def __init__(self, network: torch.nn.Module, momentum: float | None = None) -> None:
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1) or None, got {momentum}")
        self.network, self.momentum = network, momentum
        if momentum is None:
            self.model = unwrap(network)
        else:
            self.model = copy.deepcopy(unwrap(network)).eval()
            self.model.requires_grad_(False)

    def attach(self, engine: Any) -> None:
        if self.momentum is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Any) -> None:
        source = unwrap(self.network)
        for ema_p, p in zip(self.model.parameters(), source.parameters()):
            ema_p.lerp_(p.detach(), self.momentum)
        for ema_b, b in zip(self.model.buffers(), source.buffers()):
            ema_b.copy_(b)


def epochs_for_iterations(iterations: int, n_train: int, batch_size: int) -> int:
    """Epochs needed for about ``iterations`` optimisation steps (at least one)."""
    per_epoch = max(1, math.ceil(n_train / batch_size))
    return max(1, round(iterations / per_epoch))


# ---------------------------------------------------------------------------------------------------- resuming


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def as_flag(value: bool | str | int | None) -> bool:
    """A yes/no option from a config or the command line: ``monai.bundle run --resume true`` passes the string
    ``"true"``, which plain ``bool()`` would also read as true for ``"false"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off", "", "none", "null"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def _numpy_state_to_dict(state: tuple) -> dict:
    """A legacy numpy ``RandomState.get_state()`` tuple as plain values and a tensor (``torch.load(weights_only)``
    refuses numpy arrays)."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_dict(state: Mapping) -> tuple:
    keys = torch.as_tensor(state["keys"]).cpu().numpy().astype(np.uint32)
    return state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])


def _randomizables(objects: Sequence[Any]) -> list[Randomizable]:
    """The MONAI ``Randomizable`` objects among ``objects`` and nested in them (attributes of transforms, the lists
    of a ``Compose``), each once, in a fixed depth-first order."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            children = obj
        elif isinstance(obj, (Transform, Randomizable)):
            if isinstance(obj, Randomizable):
                found.append(obj)
            children = list(vars(obj).values())
        else:
            return
        for child in children:
            visit(child)

    visit(list(objects))
    return found


class RNGState:
    """The random generators of a training process as one checkpointable object (``state_dict``/``load_state_dict``).

    Captures torch's CPU generator, the current CUDA device's generator (when CUDA is in use), numpy's global
    generator, Python's ``random``, and ``R`` (a numpy ``RandomState``) of every MONAI ``Randomizable`` in
    ``transforms`` or nested in them (e.g. ``RandLiverAnomalyd``, its ``RandLiverAnomaly`` and ``RandPerlinMask``;
    shared generators are simply stored once per holder). The generators are read when ``state_dict`` is called, not
    when this object is built, because MONAI's ``DataLoader`` gives transforms new ``RandomState`` objects.

    With ``num_workers > 0`` the workers' transforms are reseeded from torch's generator at every epoch, so restoring
    torch's state is what makes them continue. Under ``torch.distributed`` only rank 0's generators are saved; the
    other ranks keep the generators of their fresh start (``load_state_dict`` leaves them alone), so their draws stay
    different from rank 0's.

    ``state_dict()`` holds tensors and plain Python values only, so ``torch.load(..., weights_only=True)`` reads it.
    """

    def __init__(self, transforms: Sequence[Any] = ()) -> None:
        self.transforms = list(transforms)

    def state_dict(self) -> dict:
        """The current state of every generator (see the class docstring)."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if cuda else [],
            "numpy": _numpy_state_to_dict(np.random.get_state()),
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "transforms": [_numpy_state_to_dict(t.R.get_state()) for t in _randomizables(self.transforms)],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the generators from ``state_dict()`` output; a no-op on ranks > 0 under ``torch.distributed``.

        Raises ``ValueError`` when the number of randomizable transforms differs from the saved one (the training
        pipeline changed between the runs).
        """
        if not _is_rank_zero():
            return
        randomizables = _randomizables(self.transforms)
        if len(state["transforms"]) != len(randomizables):
            raise ValueError(
                f"the checkpoint holds random states of {len(state['transforms'])} transforms, the training pipeline "
                f"has {len(randomizables)}: resume with the configuration the checkpoint was written with."
            )
        # map_location may have moved the byte tensors to a GPU; the setters want CPU tensors
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.as_tensor(state["cuda"][0]).cpu())
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        for transform, saved in zip(randomizables, state["transforms"]):
            transform.R.set_state(_numpy_state_from_dict(saved))


class BestMetricState:
    """The best validation score so far, as a checkpointable object, so that a resumed training keeps comparing with
    the score reached before the interruption: ``models/model.pt`` is only replaced by a better model.

    Holds the evaluator's ``state.best_metric`` / ``best_metric_epoch`` and the list of the key-metric
    ``CheckpointSaver`` (``saver``, optional: ``None`` where the saver is disabled, e.g. DDP ranks > 0).
    """

    def __init__(self, evaluator: Any, saver: Any = None) -> None:
        self.evaluator, self.saver = evaluator, saver

    def _tracker(self) -> Any:
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        """``{"best_metric": float, "best_metric_epoch": int, "saved": [(score, filename), ...]}``."""
        tracker = self._tracker()
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "saved": [(float(score), str(name)) for score, name in tracker._saved] if tracker is not None else [],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the best score and, when a saver is given, its list of saved best checkpoints."""
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if self._tracker() is not None:
            self.saver.load_state_dict({"_saved": [tuple(item) for item in state["saved"]]})


def _with_engine(objects: Mapping[str, Any], engine: Any, engine_key: str | None) -> dict[str, Any]:
    """``objects`` without ``None`` values, plus ``engine`` under ``engine_key`` (when given)."""
    out = {k: v for k, v in objects.items() if v is not None}
    if engine_key is not None:
        if engine_key in out:
            raise ValueError(f"{engine_key!r} is reserved for the engine the handler is attached to")
        out[engine_key] = engine
    return out


class ResumeCheckpoint:
    """Save everything a training needs to continue to one file, every ``save_interval`` epochs (an ignite handler).

    ``save_dict`` maps names to objects with ``state_dict()`` (network, optimizer, LR scheduler, EMA model,
    :class:`RNGState`, :class:`BestMetricState`); ``None`` values are left out (e.g. the EMA model when there is no
    EMA). The engine the handler is attached to is added under ``engine_key`` (its epoch and iteration): a bundle
    config cannot name the trainer inside the trainer's own handler list. Wrapped networks (DDP) are saved unwrapped.

    The file is replaced atomically (:func:`pipeline.io.atomic_write`: a temporary file in the same folder, fsync,
    ``os.replace``), so ``save_dir/filename`` is always a complete checkpoint, even if the process is killed while
    writing. Only rank 0 writes under ``torch.distributed``. Attach it after the LR scheduler and validation
    handlers, so that the epoch's LR step and best score are in the file.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "resume.pt",
        save_interval: int = 1,
        engine_key: str | None = "trainer",
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be at least 1, got {save_interval}")
        self.path = Path(save_dir) / filename
        self.save_dict, self.save_interval, self.engine_key = dict(save_dict), int(save_interval), engine_key

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)

    def __call__(self, engine: Any) -> None:
        if not _is_rank_zero():
            return
        checkpoint = {
            k: unwrap(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj.state_dict()
            for k, obj in _with_engine(self.save_dict, engine, self.engine_key).items()
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda temp: torch.save(checkpoint, temp))
        engine.logger.debug(f"Saved the resume checkpoint of epoch {engine.state.epoch} to {self.path}")


class ResumeFrom:
    """Continue an interrupted training from a :class:`ResumeCheckpoint` file (an ignite handler).

    ``attach`` registers a loader on ``Events.STARTED`` only when ``enabled`` (a bool, or a command-line string such
    as ``"true"``) and ``path`` exists; a missing file starts the training from scratch with a warning, or raises
    :class:`~transforms.errors.InputDataError` when ``required`` (an explicitly named checkpoint). The loader is
    MONAI's ``CheckpointLoader`` on ``load_dict`` (``None`` values left out) plus the engine under ``engine_key``,
    so the trainer continues after the saved epoch (ignite resumes from ``state.epoch``; a larger ``max_epochs``
    than the saved run's is kept), the skip-decay α (a function of ``state.iteration``) and the LR schedule go on
    where they were. It then logs the epoch, iteration and the restored entries.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        load_dict: Mapping[str, Any],
        enabled: bool | str = True,
        required: bool | str = False,
        engine_key: str | None = "trainer",
        map_location: Any = None,
    ) -> None:
        self.path = Path(path)
        self.load_dict, self.engine_key, self.map_location = dict(load_dict), engine_key, map_location
        self.enabled, self.required = as_flag(enabled), as_flag(required)
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Any) -> None:
        if not self.enabled:
            return
        self.logger = engine.logger
        if not self.path.is_file():
            if self.required:
                raise InputDataError(
                    self.path, "the checkpoint to resume from does not exist.", "check the --resume_from path."
                )
            self.logger.warning(f"No checkpoint to resume from at {self.path}: training starts from scratch.")
            return
        objects = _with_engine(self.load_dict, engine, self.engine_key)
        CheckpointLoader(str(self.path), objects, map_location=self.map_location).attach(engine)
        engine.add_event_handler(Events.STARTED, self.report, sorted(objects))

    def report(self, engine: Any, names: Sequence[str]) -> None:
        """Log what was restored (runs right after the loader)."""
        alpha = getattr(unwrap(engine.network), "alpha", None) if hasattr(engine, "network") else None
        alpha_text = "" if alpha is None else f", alpha {float(alpha):.6g}"
        self.logger.info(
            f"Resumed from {self.path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}{alpha_text}; "
            f"restored {', '.join(names)}. Training continues with epoch {engine.state.epoch + 1} of "
            f"{engine.state.max_epochs}."
        )


# ------------------------------------------------------------------------------------------ schedule and curves


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    kind: str = "cosine",
    epochs: int = 100,
    warmup_epochs: int = 0,
    min_lr_fraction: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of a training run, stepped once per epoch (MONAI's ``LrScheduleHandler``).

    ``"step"``: DRAEM's MultiStepLR (x0.2 at 80 % and 90 % of the epochs). ``"cosine"``: linear warm-up over
    ``warmup_epochs`` from ``1 / (warmup_epochs + 1)`` of the base rate, then a half cosine down to
    ``min_lr_fraction`` of it at the last epoch: no sudden drop, so the validation curve of small-data training does
    not hinge on where a milestone falls. ``"constant"``: the base rate throughout. A warm-up longer than the run
    (a short test run with the default 5 warm-up epochs) is cut to ``epochs - 1``.

    Raises:
        ValueError: unknown ``kind``, ``epochs < 1``, negative ``warmup_epochs`` or ``min_lr_fraction`` outside
            ``[0, 1]``.
    """
    epochs, warmup = int(epochs), int(warmup_epochs)
    if epochs < 1 or warmup < 0 or not 0.0 <= min_lr_fraction <= 1.0:
        raise ValueError(
            f"need epochs >= 1, warmup_epochs >= 0 and min_lr_fraction in [0, 1]; got epochs={epochs}, "
            f"warmup_epochs={warmup}, min_lr_fraction={min_lr_fraction}."
        )
    if kind == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.8 * epochs), int(0.9 * epochs)], gamma=0.2)
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    if kind != "cosine":
        raise ValueError(f"unknown lr_schedule {kind!r}; use 'cosine', 'step' or 'constant'.")
    warmup = min(warmup, epochs - 1)

    def factor(epoch: int) -> float:  # epoch = number of completed epochs (the scheduler's counter)
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        progress = min(1.0, (epoch - warmup) / max(1, epochs - 1 - warmup))
        return min_lr_fraction + (1.0 - min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def validation_due(interval: int):
    """An ignite event filter: every ``interval``-th epoch and the last one (so a run's final weights are always
    validated, and a run shorter than ``interval`` still selects a checkpoint)."""

    def due(engine: Any, epoch: int) -> bool:
        return epoch % interval == 0 or epoch == engine.state.max_epochs

    return due


class IntervalValidation(ValidationHandler):
    """MONAI's epoch-level ``ValidationHandler``, run every ``interval`` epochs *and at the last epoch*
    (:func:`validation_due`)."""

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=validation_due(self.interval)), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


class SyntheticAnomalyAUROC:
    """Training health: pixel AUROC of the pretext task on a fixed set of synthesised validation slices.

    ``n_slices`` evenly spaced slices of ``dataset`` (validation items: ``image``, ``liver``, ``lesion``) get one
    synthetic anomaly each from ``synthesis`` (a ``RandLiverAnomalyd`` built like the training one, ``prob`` 1), drawn
    once with its own generator seeded by ``seed``: the same set at every call, and the training's random streams are
    untouched. The score is the pixel AUROC of the network's anomaly map against the synthetic mask over liver pixels
    outside real lesions. High here but low on the real lesions means "trained, but the pretext does not transfer";
    low here means "not trained yet".

    ``__call__(network)`` returns the AUROC (nan when no slice got an anomaly).
    """

    def __init__(self, dataset: Sequence[Mapping], synthesis: Any, n_slices: int = 32, seed: int = 0,
                 batch_size: int = 16) -> None:
        self.dataset, self.synthesis = dataset, synthesis
        self.n_slices, self.seed, self.batch_size = int(n_slices), int(seed), int(batch_size)
        self._set: dict[str, torch.Tensor] | None = None

    def _build(self) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        index = np.unique(np.linspace(0, n - 1, min(self.n_slices, n)).round().astype(int)) if n else []
        self.synthesis.set_random_state(seed=self.seed)
        items = [self.synthesis(dict(self.dataset[int(i)])) for i in index]
        keys = ("image", "anomaly_mask", "liver", "lesion")
        return {k: torch.stack([torch.as_tensor(item[k]).float() for item in items]) for k in keys} if items else {}

    @torch.no_grad()
    def __call__(self, network: torch.nn.Module) -> float:
        if self._set is None:
            self._set = self._build()
        if not self._set:
            return float("nan")
        net = unwrap(network)
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        maps = torch.cat(
            [net.anomaly_map(x.to(device)).float().cpu() for x in self._set["image"].split(self.batch_size)]
        )
        net.train(was_training)
        region = (self._set["liver"] > 0) & (self._set["lesion"] == 0)
        target = self._set["anomaly_mask"][region] > 0
        if not target.any() or target.all():
            return float("nan")
        return roc_auc(maps[region].numpy(), target.numpy())


class ValidationCurve:
    """Learning curves as files: after every ``interval``-th training epoch and the last (attach it after
    :class:`IntervalValidation`), append the evaluator's metrics, the synthetic-anomaly health metric, the learning
    rate, α, the iteration and the wall-clock to ``output_dir/curve.json`` and ``curve.csv`` (rank 0 only, atomic
    writes).

    ``curve.json`` = ``{"rows": [{"epoch", "iteration", "elapsed_s", "lr", "alpha", <metric>: float, ...}],
    "baselines": {...} | null}``; ``elapsed_s`` counts training seconds over resumed runs too. ``baselines`` are the
    trivial baselines on the evaluated slices (``pipeline.baselines.baseline_report``), computed once, so a plot can
    draw them as horizontal lines. A resumed training keeps the rows of the epochs it had finished.
    """

    def __init__(self, evaluator: Any, output_dir: str | os.PathLike, interval: int = 1,
                 health: SyntheticAnomalyAUROC | None = None, network: torch.nn.Module | None = None,
                 baseline_items: Sequence[Mapping] | None = None, sf: int = DEFAULT_SF,
                 mm_per_pixel: float | None = None) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        self.evaluator, self.output_dir, self.interval = evaluator, Path(output_dir), int(interval)
        self.health, self.network, self.baseline_items, self.sf = health, network, baseline_items, int(sf)
        self.mm_per_pixel = mm_per_pixel
        self.rows: list[dict[str, Any]] | None = None
        self.baselines: dict[str, Any] | None = None
        self._clock: float | None = None
        self._elapsed_before = 0.0

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=validation_due(self.interval)), self)

    def _start(self, engine: Any) -> None:
        if self._clock is not None:
            return
        self._clock = time.monotonic()
        first_epoch = engine.state.epoch - 1  # epochs already done (a resumed run starts after them)
        self.rows = []
        saved = self.output_dir / "curve.json"
        if first_epoch > 0 and saved.is_file():
            old = json.loads(saved.read_bytes())
            self.rows = [row for row in old.get("rows", []) if row.get("epoch", 0) <= first_epoch]
            self.baselines = old.get("baselines")
            self._elapsed_before = float(self.rows[-1]["elapsed_s"]) if self.rows else 0.0

    def _baselines(self) -> dict[str, Any] | None:
        if not self.baseline_items:
            return None
        stack = {k: np.stack([np.asarray(item[k], dtype=np.float32)[0] for item in self.baseline_items])
                 for k in ("image", "liver", "lesion")}
        labels = [bool(item.get("has_lesion", stack["lesion"][i].any())) for i, item in enumerate(self.baseline_items)]
        if all(labels) or not any(labels):
            return None
        case_ids = [str(item.get("case_id", "")) for item in self.baseline_items]
        return baseline_report(stack["image"], stack["liver"], stack["lesion"], sf=self.sf, labels=labels,
                               case_ids=case_ids, mm_per_pixel=self.mm_per_pixel)

    def __call__(self, engine: Any) -> None:
        if not _is_rank_zero():
            return
        if self.rows is None:
            self._start(engine)
        row: dict[str, Any] = {
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "elapsed_s": round(self._elapsed_before + time.monotonic() - self._clock, 1),
            "lr": float(engine.optimizer.param_groups[0]["lr"]) if getattr(engine, "optimizer", None) else None,
            "alpha": float(getattr(engine.state, "alpha", float("nan"))),
        }
        # undefined values (nan: one class only) are written as null by atomic_write_json, empty in the CSV
        row.update({name: float(value) for name, value in self.evaluator.state.metrics.items()})
        if self.health is not None:
            row["synthetic_pixel_auroc_liver"] = float(self.health(self.network or engine.network))
        if self.baselines is None and self.baseline_items:
            self.baselines = self._baselines()
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self._write()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k not in ("lr",))
        engine.logger.info(f"curve: epoch {row['epoch']}, iteration {row['iteration']}: {shown}")

    def _write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_dir / "curve.json", {"rows": self.rows, "baselines": self.baselines})
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        lines = [",".join(columns)] + [
            ",".join(_csv_value(row.get(c)) for c in columns) for row in self.rows
        ]
        atomic_write_bytes(self.output_dir / "curve.csv", ("\n".join(lines) + "\n").encode("utf-8"))


def _csv_value(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else str(value)
