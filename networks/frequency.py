"""Butterworth high-pass filter as a fixed (non-trainable) layer: FAIR's high-frequency extraction in torch."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ButterworthHighPass"]


class ButterworthHighPass(nn.Module):
    """Butterworth high-pass filter over the last two dimensions, ``real(ifft2(fft2(x) * H))``.

    The transfer function is ``H = 1 / (1 + (D0 / (D + 1e-6)) ** (2 * order))``, where ``D`` is the distance of a
    frequency from the centre of the centred (fftshift-ed) spectrum, measured in frequency-index units, and
    ``D0 = cutoff * min(H, W) / reference_size``, so the default 30 px at 256x256 scales with the image size.

    ``order=2`` (exponent 4) is FAIR's code (``data_loaderbhpf.py``); ``order=1`` (exponent 2) is the formula printed
    in the paper. The filter is built directly in the unshifted FFT layout (``ifftshift`` of the centred filter),
    which gives exactly the same result as FAIR's ``fftshift -> * H -> ifftshift`` on the data, without shifting
    the data. The result is the real part, not normalised, clipped or rescaled (as FAIR): roughly zero-mean and signed.

    The layer has no parameters and no buffers: the filter is cached per ``(H, W, device)`` in a plain dict, so it
    never enters ``state_dict`` (a TorchScript-compiled copy rebuilds it on every call). The FFTs run in float32
    (float64 for float64 input), also under autocast, and the result is cast back to the input dtype.

    Input: a floating tensor (or MetaTensor) of shape ``(..., H, W)`` -- a batch ``(B, C, H, W)`` or a single slice
    ``(C, H, W)`` -- any value range (the project feeds images in [0, 1]).
    Output: a real tensor of the same shape and dtype (float32 for non-floating input); a constant image maps to ~0.

    Args:
        cutoff: cutoff radius D0 in frequency-index units at ``reference_size`` (FAIR: 30 at 256x256).
        order: Butterworth order n; the exponent is ``2 * n``.
        reference_size: image size at which ``cutoff`` is given.
    """

    # TorchScript cannot type a dict keyed by tuples; scripted modules rebuild the filter on each call instead
    __jit_ignored_attributes__ = ["_filters"]

    def __init__(self, cutoff: float = 30.0, order: int = 2, reference_size: int = 256) -> None:
        super().__init__()
        if cutoff <= 0:
            raise ValueError(f"cutoff must be > 0, got {cutoff}.")
        if int(order) != order or order < 1:
            raise ValueError(f"order must be a positive integer, got {order}.")
        if reference_size <= 0:
            raise ValueError(f"reference_size must be > 0, got {reference_size}.")
        self.cutoff = float(cutoff)
        self.order = int(order)
        self.reference_size = int(reference_size)
        # a plain dict, not a buffer: the filter is derived from (H, W) and must not be saved or loaded
        self._filters: dict[tuple[int, int, str], torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, order={self.order}, reference_size={self.reference_size}"

    def scaled_cutoff(self, height: int, width: int) -> float:
        """Cutoff radius D0 in frequency-index units for an image of ``height`` x ``width``."""
        return self.cutoff * min(height, width) / self.reference_size

    def build_transfer_function(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The float32 filter ``H`` of shape ``(height, width)`` in unshifted FFT layout (zero frequency at [0, 0])."""
        # centred grid as FAIR (centre at (rows // 2, cols // 2)), then ifftshift into the layout of fft2
        rows = torch.arange(height, dtype=torch.float32, device=device) - height // 2
        cols = torch.arange(width, dtype=torch.float32, device=device) - width // 2
        distance = torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)
        d0 = self.scaled_cutoff(height, width)
        centred = 1.0 / (1.0 + (d0 / (distance + 1e-6)) ** (2 * self.order))
        return torch.fft.ifftshift(centred, dim=(-2, -1))

    @torch.jit.unused
    def transfer_function(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """:meth:`build_transfer_function`, cached per ``(height, width, device)``."""
        # torch.jit.trace re-traces to check its graph: a cache hit would record a constant where the first trace
        # recorded the ops that built the filter, so traces always rebuild it
        if torch.jit.is_tracing():
            return self.build_transfer_function(height, width, device)
        key = (int(height), int(width), str(device))
        if key not in self._filters:
            self._filters[key] = self.build_transfer_function(key[0], key[1], device)
        return self._filters[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the high-pass filter to ``x`` of shape ``(..., H, W)``; returns the same shape and dtype."""
        if x.ndim < 2:
            raise ValueError(f"expected a tensor of shape (..., H, W), got shape {list(x.shape)}.")
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if torch.jit.is_scripting():
            filt = self.build_transfer_function(x.shape[-2], x.shape[-1], x.device)
        else:
            filt = self.transfer_function(x.shape[-2], x.shape[-1], x.device)
        # FFTs in half precision are inaccurate (and CPU has no bf16 FFT); autocast never lowers FFTs, so the
        # explicit cast keeps them in float32 also under autocast
        spectrum = torch.fft.fft2(x.to(compute_dtype))
        filtered = torch.fft.ifft2(spectrum * filt).real
        return filtered.to(out_dtype)
