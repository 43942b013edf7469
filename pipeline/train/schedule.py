"""Schedules over the training: the learning rate per epoch (:func:`lr_schedule`) and the segmentation net's skip
weight α per iteration (:class:`SkipDecayAlphaHandler`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from pipeline.common.wrappers import unwrap

__all__ = ["SkipDecayAlphaHandler", "lr_schedule"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")


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
