"""HU windowing: a preset of MONAI's ``ScaleIntensityRange(d)``, not a rewrite."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import ScaleIntensityRange, ScaleIntensityRanged

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
