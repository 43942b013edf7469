"""The training iteration: ``iteration_update`` of MONAI's ``SupervisedTrainer`` for the joint detector, and the
epoch count for an iteration budget."""

from __future__ import annotations

import math
from typing import Any

import torch

from networks.losses import DetectorLoss
from pipeline.common.wrappers import unwrap

__all__ = ["DetectorTrainStep", "epochs_for_iterations"]


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


def epochs_for_iterations(iterations: int, n_train: int, batch_size: int) -> int:
    """Epochs needed for about ``iterations`` optimisation steps (at least one)."""
    per_epoch = max(1, math.ceil(n_train / batch_size))
    return max(1, round(iterations / per_epoch))
