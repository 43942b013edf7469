"""Training that survives a kill: the resume checkpoint (:class:`ResumeCheckpoint`), continuing from it
(:class:`ResumeFrom`) and the best validation score it carries (:class:`BestMetricState`). The random generators it
also holds are :class:`pipeline.train.rng.RNGState`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointLoader
from monai.utils import IgniteInfo, min_version, optional_import

from pipeline.common.files import atomic_write
from pipeline.common.wrappers import unwrap
from pipeline.train.runtime import as_flag, is_rank_zero
from transforms.errors import InputDataError

__all__ = ["BestMetricState", "ResumeCheckpoint", "ResumeFrom"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")


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
    :class:`~pipeline.train.rng.RNGState`, :class:`BestMetricState`); ``None`` values are left out (e.g. the EMA
    model when there is no EMA). The engine the handler is attached to is added under ``engine_key`` (its epoch and
    iteration): a bundle config cannot name the trainer inside the trainer's own handler list. Wrapped networks (DDP)
    are saved unwrapped.

    The file is replaced atomically (:func:`pipeline.common.files.atomic_write`: a temporary file in the same folder,
    fsync, ``os.replace``), so ``save_dir/filename`` is always a complete checkpoint, even if the process is killed
    while writing. Only rank 0 writes under ``torch.distributed``. Attach it after the LR scheduler and validation
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
        if not is_rank_zero():
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
