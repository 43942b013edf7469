"""Dictionary twin of the Butterworth high-pass, for figures and data inspection.

The filter itself lives in :class:`networks.frequency.ButterworthHighPass` (an ``nn.Module`` without parameters),
because the detector applies it inside the model, batched on the GPU; this twin only maps it over dictionary keys.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from networks.frequency import ButterworthHighPass


class ButterworthHighPassd(MapTransform):
    """Butterworth high-pass of ``keys``, written to ``output_keys`` (default: in place).

    In: (..., H, W) arrays or tensors, float (e.g. a (1, H, W) slice in [0, 1]). Out: float32 tensors of the same
    shape, roughly zero-mean and signed (FAIR applies no normalisation afterwards).
    """

    def __init__(
        self,
        keys: KeysCollection,
        cutoff: float = 30.0,
        order: int = 2,
        reference_size: int = 256,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.filter = ButterworthHighPass(cutoff, order, reference_size)
        self.output_keys = (
            self.keys if output_keys is None else tuple([output_keys] if isinstance(output_keys, str) else output_keys)
        )
        if len(self.output_keys) != len(self.keys):
            raise ValueError("output_keys must name one output per key")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            with torch.no_grad():
                d[out_key] = self.filter(convert_to_tensor(d[key], dtype=torch.float32, track_meta=False))
        return d
