"""HU windowing: a preset of MONAI's ``ScaleIntensityRange(d)``, with the same arithmetic done in place."""

from __future__ import annotations

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import ScaleIntensityRange, ScaleIntensityRanged
from monai.utils import convert_to_tensor

#: The abdominal soft-tissue window used by BMAD's LiTS preprocessing (REFERENCES.md A6).
DEFAULT_HU_WINDOW: tuple[float, float] = (-200.0, 250.0)


class HUWindow(ScaleIntensityRange):
    """Map a CT window ``[hu_min, hu_max]`` linearly onto ``[0, 1]`` and clip.

    In: array/tensor of any shape, Hounsfield units (any real dtype). Out: same shape, float32 in [0, 1]
    (``hu_min`` and below -> 0, ``hu_max`` and above -> 1).
    """

    def __init__(self, hu_min: float = DEFAULT_HU_WINDOW[0], hu_max: float = DEFAULT_HU_WINDOW[1]) -> None:
        if not hu_max > hu_min:
            raise ValueError(f"HU window needs hu_max > hu_min, got [{hu_min}, {hu_max}]")
        super().__init__(a_min=hu_min, a_max=hu_max, b_min=0.0, b_max=1.0, clip=True)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``ScaleIntensityRange``'s result, bit for bit, in one allocation instead of four.

        A whole CT volume is 100-500 MB as float32; the parent's chain of out-of-place operations (through
        MetaTensor dispatch) made windowing the second most expensive step of ``prepare``. Returns a tensor
        (a MetaTensor with the input's meta data when meta tracking is on), float32, like the parent.
        """
        img = convert_to_tensor(img, track_meta=get_track_meta())
        data = img.as_tensor() if isinstance(img, MetaTensor) else img
        out = data - self.a_min  # the one new tensor; integer CT promotes to float32, float64 stays float64
        out.div_(self.a_max - self.a_min).clamp_(0.0, 1.0)
        out = out.to(torch.float32)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out)
            out.copy_meta_from(img)  # as MONAI's own operations on a MetaTensor propagate it
        return out


class HUWindowd(ScaleIntensityRanged):
    """Dictionary twin of :class:`HUWindow`: window ``keys`` (CT in HU, any shape) to float32 in [0, 1], clipped."""

    def __init__(
        self,
        keys: KeysCollection,
        hu_min: float = DEFAULT_HU_WINDOW[0],
        hu_max: float = DEFAULT_HU_WINDOW[1],
        allow_missing_keys: bool = False,
    ) -> None:
        if not hu_max > hu_min:
            raise ValueError(f"HU window needs hu_max > hu_min, got [{hu_min}, {hu_max}]")
        super().__init__(
            keys, a_min=hu_min, a_max=hu_max, b_min=0.0, b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys
        )
        self.scaler = HUWindow(hu_min, hu_max)
