"""What every per-slice synthetic-anomaly transform shares: the input check and the call around the drawn anomaly.

``RandLiverAnomaly`` (the paper's source blending) and ``RandLesionLikeAnomaly`` differ only in what they draw
(``randomize``) and how it changes the slice (``blend``); checking the inputs, the clean case, clipping and returning
the input's array type live here once.
"""

from __future__ import annotations

import numpy as np
from monai.config import NdarrayOrTensor
from monai.transforms import RandomizableTransform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type

from transforms.context import centre_channel
from transforms.errors import InputDataError, file_of

__all__ = ["SliceAnomaly", "checked_slice_and_liver"]


def checked_slice_and_liver(image: NdarrayOrTensor, liver: NdarrayOrTensor) -> tuple[np.ndarray, np.ndarray]:
    """``image`` as float32 numpy (C, H, W) and ``liver`` as numpy (1 or C, H, W), after checking both.

    C is 1 for a slice, or odd for a 2.5D stack (the slice in the middle channel, :mod:`transforms.context`); the
    liver mask is the middle slice's (1, H, W) or one per channel (C, H, W).

    Raises:
        InputDataError: (naming the image's file when its meta data has one) the image is not (C, H, W) with C odd,
            the liver mask has another shape, or the image holds NaN or inf.
    """
    image_np = convert_data_type(image, np.ndarray, dtype=np.float32)[0]
    liver_np = convert_data_type(liver, np.ndarray)[0]
    if image_np.ndim != 3 or image_np.shape[0] % 2 != 1:
        raise InputDataError(
            file_of(image), f"expected a (1, H, W) slice or an odd (C, H, W) stack, got shape {image_np.shape}."
        )
    c, spatial = image_np.shape[0], image_np.shape[1:]
    fits = liver_np.ndim == 3 and liver_np.shape[0] in (1, c) and liver_np.shape[1:] == spatial
    if not fits:
        raise InputDataError(
            file_of(image), f"liver mask shape {liver_np.shape} does not fit image shape {image_np.shape}."
        )
    if not np.isfinite(image_np).all():
        raise InputDataError(file_of(image), "the slice holds non-finite values (NaN or inf).")
    return image_np, liver_np


class SliceAnomaly(RandomizableTransform):
    """Base of the synthetic-anomaly transforms: ``(image, liver) -> (augmented, mask, has_anomaly)``.

    A subclass implements ``randomize(liver)`` (liver (1, H, W) numpy), which sets ``self._mask`` to the drawn (H, W)
    float32 {0, 1} mask, or None for a clean sample, and ``blend(image, liver)``, which returns the anomalous slice
    (C, H, W) float32 before clipping to [0, 1].

    Input: ``image`` (1, H, W) float in [0, 1] and ``liver`` (1, H, W) {0, 1}, numpy or torch; or a 2.5D stack
    (:mod:`transforms.context`): ``image`` (C, H, W), C odd, and ``liver`` (C, H, W) (each channel's liver) or
    (1, H, W) (the middle slice's). The anomaly is drawn on the middle slice's liver and goes through every channel
    (a prism along z), inside each channel's own liver when that is given and ``constrain_to_liver`` is set.
    Output: augmented (C, H, W) float32 in [0, 1] and mask (1, H, W) float32 {0, 1} (the middle slice's), both the
    array type of ``image`` (MetaTensor meta data kept), and ``has_anomaly`` 1.0 iff the mask is not empty.

    Raises:
        InputDataError: the image is not (C, H, W) with C odd, holds non-finite values, or the liver mask does not
            fit it.
    """

    backend = [TransformBackends.NUMPY]
    _mask: np.ndarray | None = None
    constrain_to_liver: bool = True

    def blend(self, image: np.ndarray, liver: np.ndarray) -> np.ndarray:
        """The slice with the drawn anomaly, (C, H, W) float32, not yet clipped."""
        raise NotImplementedError

    def channel_support(self, liver: np.ndarray) -> np.ndarray | float:
        """Where the drawn anomaly may change each channel: each channel's liver for a per-channel liver stack
        (C > 1) when constrained, else everywhere (1.0; the drawn mask already lies inside the middle liver)."""
        if self.constrain_to_liver and liver.shape[0] > 1:
            return (liver > 0).astype(np.float32)
        return 1.0

    def __call__(
        self, image: NdarrayOrTensor, liver: NdarrayOrTensor, randomize: bool = True
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor, float]:
        """Return ``(augmented, mask, has_anomaly)`` for one slice; see the class docstring."""
        image_np, liver_np = checked_slice_and_liver(image, liver)
        if randomize:
            self.randomize(centre_channel(liver_np))

        if self._mask is None:
            augmented, mask, has_anomaly = image_np, np.zeros((1, *image_np.shape[1:]), np.float32), 0.0
        else:
            if self._mask.shape != image_np.shape[1:]:
                raise ValueError(f"the drawn mask {self._mask.shape} does not fit the image {image_np.shape}.")
            augmented, mask, has_anomaly = self.blend(image_np, liver_np), self._mask[None], 1.0
        augmented = np.clip(augmented, 0.0, 1.0).astype(np.float32)
        return (
            convert_to_dst_type(augmented, dst=image, dtype=np.float32)[0],
            convert_to_dst_type(mask, dst=image, dtype=np.float32)[0],
            has_anomaly,
        )
