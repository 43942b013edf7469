"""Training glue for MONAI's ignite workflows: our iteration function, the skip-decay schedule, data helpers.

The bundle's ``train.yaml`` wires these into ``monai.engines.SupervisedTrainer``; nothing here is bundle-specific.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import CacheDataset
from monai.transforms import Compose, EnsureTyped, LoadImaged
from monai.utils import IgniteInfo, min_version, optional_import

from networks.losses import DetectorLoss
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

    A handler of its own so that a config switches it with one key (``progress: false`` for logs to files).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

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
