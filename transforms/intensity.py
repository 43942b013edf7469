"""HU windowing (a preset of MONAI's ``ScaleIntensityRange(d)``, its arithmetic done in place), the optional
per-volume normalisation to the liver's median HU, and the liver intensity jitter that augments normal slices."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform, ScaleIntensityRange, ScaleIntensityRanged, Transform
from monai.utils import TransformBackends, convert_to_tensor

from transforms.errors import InputDataError, file_of
from transforms.roi import LiverMasks

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


class ShiftLiverMedianHU(Transform):
    """Shift a CT volume's HU so that the median of its liver is ``reference_hu`` (per-volume normalisation).

    Contrast phase, scanner and patient move the whole liver by tens of HU between volumes (IRCADb's livers lie
    anywhere from about 60 to 130 HU); a model trained on normal livers of one brightness then sees another volume's
    entire liver as anomalous, or a lesion as normal. Shifting each volume so that its liver median sits at one
    reference keeps lesions' contrast *relative to their own liver*, which is what a radiologist reads. The median
    (over the liver mask, lesions included) is robust to lesions covering less than half of the liver.

    In: ``img`` (1, X, Y, Z) HU, any real dtype; ``liver`` bool/{0, 1} of the same shape. Out: float32 tensor of the
    same shape (a MetaTensor keeps its meta data), ``img - median(img[liver]) + reference_hu``; the applied shift
    is kept in ``self.last_shift``.

    Raises:
        InputDataError: the liver mask is empty or has another shape (named by the image's file when known).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, reference_hu: float = 100.0) -> None:
        self.reference_hu = float(reference_hu)
        self.last_shift = 0.0

    def __call__(self, img: NdarrayOrTensor, liver: NdarrayOrTensor) -> torch.Tensor:
        image = convert_to_tensor(img, track_meta=get_track_meta())
        data = image.as_tensor() if isinstance(image, MetaTensor) else image
        inside = convert_to_tensor(liver, track_meta=False) > 0
        if inside.shape != data.shape:
            raise InputDataError(file_of(img), f"liver mask shape {tuple(inside.shape)} differs from the image's "
                                 f"{tuple(data.shape)}.")
        if not inside.any():
            raise InputDataError(file_of(img), "no liver voxel to take the liver median HU from.",
                                 "check the label values of the dataset preset.")
        median = float(torch.median(data[inside].float()))
        self.last_shift = self.reference_hu - median
        out = data.to(torch.float32) + self.last_shift
        if isinstance(image, MetaTensor):
            out = MetaTensor(out)
            out.copy_meta_from(image)
        return out


class ShiftLiverMedianHUd(MapTransform):
    """Dictionary twin of :class:`ShiftLiverMedianHU`: ``d[key]`` (1, X, Y, Z) HU shifted so that its liver median
    (liver and lesion values of ``d[label_key]``) is ``reference_hu``; the shift in HU goes to ``d[shift_key]``."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str = "label",
        reference_hu: float = 100.0,
        liver_values: Sequence[int] = (1,),
        lesion_values: Sequence[int] = (2,),
        shift_key: str = "liver_median_shift_hu",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.shifter = ShiftLiverMedianHU(reference_hu)
        self.masks = LiverMasks(liver_values, lesion_values)
        self.label_key, self.shift_key = label_key, shift_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        liver = self.masks.boolean(d[self.label_key])[0]
        for key in self.key_iterator(d):
            d[key] = self.shifter(d[key], liver)
            d[self.shift_key] = self.shifter.last_shift
        return d


class RandLiverIntensityJitter(RandomizableTransform):
    """Randomly shift and stretch the intensities inside the liver, as another scanner or contrast phase would.

    ``out = clip(m + contrast * (x - m) + shift, 0, 1)`` on liver pixels, ``x`` elsewhere, with ``m`` the liver's
    mean, ``shift ~ U(-shift_hu, shift_hu) / hu_per_unit`` and ``contrast ~ U(contrast_range)``. It augments the
    *normal* training slices (before anomaly synthesis) so that a model trained on few patients does not learn
    their exact liver brightness as "normal" (IRCADb livers lie anywhere from about 60 to 130 HU).

    In: ``img`` (1, H, W) float in [0, 1] (a windowed slice), ``liver`` (1, H, W) {0, 1}. Out: float32 tensor of the
    same shape in [0, 1]; the input unchanged (as float32) when the coin with ``prob`` says no or the liver is empty.
    Draws from ``self.R`` only: one coin, then the shift and the contrast.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        prob: float = 0.5,
        shift_hu: float = 20.0,
        contrast_range: tuple[float, float] = (0.85, 1.15),
        hu_per_unit: float = DEFAULT_HU_WINDOW[1] - DEFAULT_HU_WINDOW[0],
    ) -> None:
        super().__init__(prob)
        if shift_hu < 0 or hu_per_unit <= 0 or not 0 < contrast_range[0] <= contrast_range[1]:
            raise ValueError(
                f"need shift_hu >= 0, hu_per_unit > 0 and 0 < contrast_range[0] <= contrast_range[1]; got {shift_hu}, "
                f"{hu_per_unit}, {contrast_range}."
            )
        self.shift = float(shift_hu) / float(hu_per_unit)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self._shift, self._contrast = 0.0, 1.0

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._shift = float(self.R.uniform(-self.shift, self.shift))
            self._contrast = float(self.R.uniform(*self.contrast_range))

    def __call__(self, img: NdarrayOrTensor, liver: NdarrayOrTensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        inside = convert_to_tensor(liver, track_meta=False) > 0
        if not self._do_transform or not inside.any():
            return x
        mean = x[inside].mean()
        jittered = (mean + self._contrast * (x - mean) + self._shift).clamp_(0.0, 1.0)
        return torch.where(inside, jittered, x)


class RandLiverIntensityJitterd(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`RandLiverIntensityJitter`: the same draw for every key (each (1, H, W) in [0, 1]),
    with the liver mask read from ``d[liver_key]`` (never changed)."""

    backend = RandLiverIntensityJitter.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        liver_key: str = "liver",
        prob: float = 0.5,
        shift_hu: float = 20.0,
        contrast_range: tuple[float, float] = (0.85, 1.15),
        hu_per_unit: float = DEFAULT_HU_WINDOW[1] - DEFAULT_HU_WINDOW[0],
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.liver_key = liver_key
        self.jitter = RandLiverIntensityJitter(prob, shift_hu, contrast_range, hu_per_unit)
        self.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Set ``self.R`` and share it with the array transform."""
        super().set_random_state(seed, state)
        self.jitter.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.jitter.randomize()
        for key in self.key_iterator(d):
            d[key] = self.jitter(d[key], d[self.liver_key], randomize=False)
        return d
