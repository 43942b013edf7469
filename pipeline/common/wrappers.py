"""The model inside the wrappers training puts around it."""

from __future__ import annotations

import torch

__all__ = ["unwrap"]


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while hasattr(network, "module") or hasattr(network, "_orig_mod"):
        network = getattr(network, "module", None) or network._orig_mod
    return network
