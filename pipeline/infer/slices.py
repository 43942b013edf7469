"""The 2D detector over a liver ROI volume, slice batch by slice batch: the one implementation of that step.

:class:`SliceInferer` is a MONAI inferer (``inferer(inputs, network, ...)``), so the bundle's inference workflow
(``configs/inference.yaml``, ``inferer``) and :func:`pipeline.infer.volume.detect_slices` (``python -m pipeline
infer``) run the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from networks.scoring import DEFAULT_SF, image_scores
from transforms.context import SliceContext, context_indices

__all__ = ["SliceInferer", "device_of", "slice_spacing_mm"]


class SliceInferer(Inferer):
    """Run a 2D anomaly detector on every liver slice of ROI volumes; the map is 0 outside the liver.

    Args:
        batch_size: slices per network call.
        sf: mean-filter size of the slice scores (:func:`networks.scoring.image_scores`; :meth:`volume` only).
        device: where the network runs; None: where its parameters are (the inputs' device for a parameter-free
            module). Maps come back on the inputs' device.
        context: the 2.5D input the network was trained with (:class:`transforms.context.SliceContext` or its JSON,
            ``models/inference.json``'s ``slice_context``); None: one slice per input (plain 2D).

    The network is called as ``network.anomaly_map(batch)`` when it has that method (the project's detectors),
    else ``network(batch)`` (e.g. ``network_def``, built with ``output="anomaly_map"``, or its TorchScript export):
    (B, C, S, S) in [0, 1] -> (B, 1, S, S) in [0, 1], C = ``context.channels`` (1 without context): each slice
    between its neighbours among the liver slices, as training saw them (:func:`transforms.context.context_indices`).
    """

    def __init__(self, batch_size: int = 16, sf: int = DEFAULT_SF, device: str | torch.device | None = None,
                 context: SliceContext | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size, self.sf = int(batch_size), int(sf)
        self.device = None if device is None else torch.device(device)
        self.context = SliceContext.from_json(context)

    def __call__(self, inputs: torch.Tensor, network: Any, liver: torch.Tensor | None = None,
                 liver_voxels: torch.Tensor | Sequence | None = None) -> MetaTensor:
        """``(B, 1, S, S, Z)`` ROI volumes (the preprocessing's ``image``, batched) -> their ``(B, 1, S, S, Z)`` maps.

        Args:
            liver: ``(B, 1, S, S, Z)`` ROI liver masks (the preprocessing's ``liver``). None: the nonzero pixels of
                ``inputs``, which the preprocessing zeroes outside the liver (``mask_outside``, the default); a
                caller that passes only the image (MONAI Label's ``BundleInferTask``) gets this.
            liver_voxels: ``(B, Z)`` native liver voxels per slice (the preprocessing's ``liver_voxels``), which
                choose the slices to run, as prepare counts them; None: the slices holding ROI liver. Both give the
                same map (slices without ROI liver are zeroed anyway).

        Returns a MetaTensor without meta (MONAI's ``Invertd`` gives it the image's records and meta).
        """
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"SliceInferer expects inputs of shape (B, 1, S, S, Z), got {tuple(inputs.shape)}")
        images = _plain(inputs)
        masks = images != 0 if liver is None else _plain(liver).to(images.device)
        maps = []
        for b in range(images.shape[0]):
            if liver_voxels is None:
                slices = np.flatnonzero(masks[b, 0].flatten(0, 1).any(dim=0).cpu().numpy())
            else:
                slices = np.flatnonzero(_plain(liver_voxels[b]).cpu().numpy() > 0)
            affine = getattr(inputs, "affine", None)  # a MetaTensor's (B, 4, 4) or (4, 4); none on a plain tensor
            slice_mm = None if affine is None else slice_spacing_mm(affine[b] if affine.ndim == 3 else affine)
            maps.append(self.volume(images[b, 0], network, masks[b, 0], slices, slice_mm)[0])
        return MetaTensor(torch.stack(maps)[:, None])

    def volume(self, roi_image: torch.Tensor, network: Any, roi_liver: torch.Tensor, liver_slices: np.ndarray,
               slice_mm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One volume: ``roi_image`` and ``roi_liver`` (S, S, Z), the slice indices to run -> ``(roi_map, scores)``,
        the (S, S, Z) map on ``roi_image``'s device (0 outside ``roi_liver`` and on the other slices) and the (Z,)
        slice scores (0 on the other slices). ``slice_mm``, the slice spacing, is needed with a context only."""
        device = self.device or device_of(network, roi_image.device)
        run = network.anomaly_map if hasattr(network, "anomaly_map") else network
        roi_map = torch.zeros_like(roi_image)
        scores = torch.zeros(roi_image.shape[-1])
        channels = self._channel_slices(liver_slices, slice_mm)
        with torch.inference_mode():
            for first in range(0, len(liver_slices), self.batch_size):
                ks = torch.as_tensor(liver_slices[first : first + self.batch_size])
                # (S, S, b, C) -> (b, C, S, S): each slice's channels, its neighbours under a context
                batch = roi_image[:, :, channels[first : first + self.batch_size]].permute(2, 3, 0, 1).to(device)
                liver = roi_liver[:, :, ks].permute(2, 0, 1)[:, None]
                amap = run(batch).float().to(roi_image.device) * liver
                roi_map[:, :, ks] = amap[:, 0].permute(1, 2, 0)
                scores[ks] = image_scores(amap, self.sf).cpu()
        return roi_map, scores


    def _channel_slices(self, liver_slices: np.ndarray, slice_mm: float | None) -> torch.Tensor:
        """(N, C) slice indices of every run slice's channels (the slice itself without a context)."""
        liver_slices = np.asarray(liver_slices, dtype=np.int64)
        if self.context.slices == 0:
            return torch.as_tensor(liver_slices[:, None])
        if slice_mm is None:
            raise ValueError("a network with a slice context needs the volume's slice spacing (slice_mm, or a "
                             "MetaTensor input with an affine).")
        return torch.as_tensor(context_indices(liver_slices, self.context.offsets(slice_mm)))


def slice_spacing_mm(affine: Any) -> float:
    """The slice spacing in mm of a ROI grid (the length of its last voxel axis) from its (4, 4) affine."""
    return float(np.linalg.norm(np.asarray(affine, dtype=float)[:3, 2]))


def _plain(data: Any) -> torch.Tensor:
    """A torch tensor without MONAI meta data (MetaTensor, tensor, numpy array or sequence in)."""
    if isinstance(data, MetaTensor):
        return data.as_tensor()
    return data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))


def device_of(network: Any, default: torch.device) -> torch.device:
    """Where ``network``'s parameters are; ``default`` for a module without any (or not a module)."""
    params = network.parameters() if isinstance(network, torch.nn.Module) else iter(())
    first = next(params, None)
    return first.device if first is not None else default
