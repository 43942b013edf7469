"""The exponential moving average of the network's weights that evaluation and checkpoints use."""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from pipeline.common.wrappers import unwrap

__all__ = ["WeightEMA"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")


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
