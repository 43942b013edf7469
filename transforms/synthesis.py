"""Synthetic liver anomalies for training on normal slices only (paper step a; DRAEM-style).

A Perlin mask, intersected with the liver, selects where a texture from an anomaly source is blended into a normal
slice. The network learns to restore the clean slice and to segment the mask.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_data_type, convert_to_tensor, ensure_tuple_rep

from transforms.anomaly import SliceAnomaly
from transforms.context import centre_channel
from transforms.lesion_like import RandLesionLikeAnomaly
from transforms.perlin import RandPerlinMask
from transforms.sources import AnomalySource, ImageFolderSource, PerlinTextureSource

__all__ = ["RandLiverAnomaly", "RandLiverAnomalyd"]

SourceLike = AnomalySource | str | os.PathLike | None


def _as_source(source: SourceLike) -> AnomalySource:
    """The anomaly source to use: ``None`` -> procedural Perlin textures, a path -> the images of that folder."""
    if source is None:
        return PerlinTextureSource()
    if isinstance(source, (str, os.PathLike)):
        return ImageFolderSource(source)
    if not callable(getattr(source, "sample", None)):
        raise TypeError(f"source must be an AnomalySource, a folder path or None, got {type(source).__name__}.")
    return source


class RandLiverAnomaly(SliceAnomaly):
    """Blend a random texture into a random Perlin-shaped region of the liver (DRAEM-style anomaly synthesis).

    With probability ``prob`` a sample is anomalous: the mask ``M`` is a Perlin mask (``RandPerlinMask``: lattice
    resolution ``2**k`` per axis, ``k`` in ``min_scale_exp..max_scale_exp``, rotated by U(``rotation_range``) degrees,
    thresholded at ``threshold``), intersected with the liver when ``constrain_to_liver`` (the paper; ``False`` is
    DRAEM's original whole-image mode, for ablations). A mask with fewer than ``min_anomaly_pixels`` pixels is redrawn,
    at most ``max_tries`` times in all; if none is large enough (or, when constrained, the liver itself is smaller),
    the sample is clean. The anomalous image is::

        I_a = (1 - M) * I + (1 - beta) * M * I + beta * M * A,    beta ~ U(beta_range)

    with ``A`` a texture from ``source``. ``beta`` is the opacity of the *source*, as in the paper and anomalib
    (DRAEM's code calls the weight of the *original* image beta, ``beta_DRAEM = 1 - beta``, drawn from U[0, 0.8):
    its source opacity lies in (0.2, 1]). A clean sample (probability ``1 - prob``) is the image unchanged, an
    all-zero mask and ``has_anomaly = 0``. Every random draw (coin, mask, beta, texture) comes from ``self.R``,
    which is shared with the inner Perlin transform and passed to the source.

    Args:
        source: the anomaly source: an ``AnomalySource``, a folder of images (an ``ImageFolderSource`` is built), or
            ``None`` for ``PerlinTextureSource()``.
        prob: probability that a sample is anomalous.
        beta_range: (low, high) of the uniform source opacity, within [0, 1].
        constrain_to_liver: intersect the Perlin mask with the liver mask.
        min_scale_exp: smallest exponent of the Perlin lattice resolution.
        max_scale_exp: largest exponent of the Perlin lattice resolution (inclusive).
        rotation_range: (low, high) rotation of the Perlin noise in degrees.
        threshold: Perlin noise (in [-1, 1]) above it is inside the mask.
        min_anomaly_pixels: smallest accepted mask area in pixels.
        max_tries: how many masks to draw before giving up (clean sample).

    Input: ``image`` (1, H, W) float in [0, 1] and ``liver`` (1, H, W) {0, 1} (nonzero = liver), numpy or torch; or
    a 2.5D stack (C, H, W) with a (C, H, W) or (1, H, W) liver (see ``SliceAnomaly``: one mask through all channels).
    Output: ``(augmented, mask, has_anomaly)``: augmented (C, H, W) float32 in [0, 1] (clipped), mask (1, H, W)
    float32 in {0, 1} (inside the liver when constrained), both the array type of ``image`` (MetaTensor meta data
    kept), and ``has_anomaly`` a float, 1.0 iff the mask is not empty.

    Raises:
        InputDataError: the image is not (1, H, W), holds non-finite values, or the liver mask has another shape.
    """

    def __init__(
        self,
        source: SourceLike = None,
        prob: float = 0.5,
        beta_range: tuple[float, float] = (0.1, 1.0),
        constrain_to_liver: bool = True,
        min_scale_exp: int = 0,
        max_scale_exp: int = 5,
        rotation_range: tuple[float, float] = (-90.0, 90.0),
        threshold: float = 0.5,
        min_anomaly_pixels: int = 16,
        max_tries: int = 5,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= beta_range[0] <= beta_range[1] <= 1.0:
            raise ValueError(f"beta_range must satisfy 0 <= low <= high <= 1, got {beta_range}.")
        if max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}.")
        self.source = _as_source(source)
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))
        self.constrain_to_liver = constrain_to_liver
        self.min_anomaly_pixels = min_anomaly_pixels
        self.max_tries = max_tries
        self.perlin = RandPerlinMask(min_scale_exp, max_scale_exp, rotation_range, threshold)
        self.perlin.set_random_state(state=self.R)
        self._mask: np.ndarray | None = None
        self._beta = 0.0
        self._texture: np.ndarray | None = None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandLiverAnomaly:
        """Set ``self.R`` (see ``Randomizable.set_random_state``) and share it with the inner Perlin transform."""
        super().set_random_state(seed, state)
        self.perlin.set_random_state(state=self.R)
        return self

    def randomize(self, liver: np.ndarray) -> None:
        """Draw the coin, then (if anomalous) the mask for this liver mask (1, H, W) (a stack's middle slice's), beta
        and the texture."""
        super().randomize(None)
        self._mask, self._beta, self._texture = None, 0.0, None
        if not self._do_transform:
            return
        inside = liver.reshape(liver.shape[-2:]) > 0
        if self.constrain_to_liver and inside.sum() < self.min_anomaly_pixels:
            return  # no mask inside this liver can be large enough: spare the draws
        for _ in range(self.max_tries):
            mask = self.perlin(liver)[0]
            if self.constrain_to_liver:
                mask = mask * inside
            if mask.sum() >= self.min_anomaly_pixels:
                break
        else:
            return
        self._mask = mask.astype(np.float32)
        self._beta = float(self.R.uniform(*self.beta_range))
        self._texture = np.asarray(self.source.sample(inside.shape, self.R), dtype=np.float32)

    def blend(self, image: np.ndarray, liver: np.ndarray) -> np.ndarray:
        """``I_a = (1 - M) I + (1 - beta) M I + beta M A`` with the drawn mask, beta and texture."""
        mask, beta, texture = self._mask[None] * self.channel_support(liver), self._beta, self._texture[None]
        return (1.0 - mask) * image + (1.0 - beta) * mask * image + beta * mask * texture


class RandLiverAnomalyd(RandomizableTransform, MapTransform):
    """Dictionary twin of ``RandLiverAnomaly``: adds a synthetic anomaly and the training targets to a slice dict.

    For each key: ``d[clean_key]`` = the untouched input (the restoration target), ``d[key]`` = the augmented image,
    ``d[mask_key]`` = the anomaly mask, ``d[has_anomaly_key]`` = float32 array (1,), 1 iff the mask is not empty.
    All keys share one draw (coin, mask, beta, texture); ``clean_key`` may be a sequence with one name per key.

    With ``lesion_like_fraction`` > 0, that fraction of the samples draws its anomaly from ``RandLesionLikeAnomaly``
    instead (the liver's own texture shifted in HU inside a lesion-shaped blob; settings in ``lesion_like``), the
    rest from the source blending above. Both use ``prob``, ``constrain_to_liver``, ``min_anomaly_pixels`` and
    ``max_tries``; with fraction 0 (the paper) no extra random number is drawn.

    Args:
        keys: image key(s), each (1, H, W) float in [0, 1] (or a 2.5D (C, H, W) stack, ``SliceAnomaly``).
        liver_key: the liver mask (1, H, W) {0, 1}, or a stack's per-channel livers (C, H, W); read, never changed.
        mask_key: where to store the anomaly mask (1, H, W) float32 {0, 1}.
        clean_key: where to store the untouched input image(s).
        has_anomaly_key: where to store the (1,) float32 anomaly flag.
        source: an ``AnomalySource``, a folder path (bundle configs can pass a string), or ``None`` for Perlin
            textures.
        prob, beta_range, constrain_to_liver, min_scale_exp, max_scale_exp, rotation_range, threshold,
            min_anomaly_pixels, max_tries: as ``RandLiverAnomaly`` (``beta`` = source opacity,
            ``I_a = (1 - M) I + (1 - beta) M I + beta M A``).
        lesion_like_fraction: share of the samples synthesised by ``RandLesionLikeAnomaly``, in [0, 1].
        lesion_like: further ``RandLesionLikeAnomaly`` arguments (``shift_hu_range``, ``hyperdense_prob``,
            ``rim_prob``, ``hu_per_unit``, ...).
        allow_missing_keys: do not raise for missing image keys.

    Inputs numpy or torch; image, mask and clean are returned as torch tensors (MetaTensor with the input's meta data
    when meta tracking is on), float32 except ``clean``, which keeps the input's dtype.
    """

    backend = RandLiverAnomaly.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        liver_key: str = "liver",
        mask_key: str = "anomaly_mask",
        clean_key: KeysCollection = "clean",
        has_anomaly_key: str = "has_anomaly",
        source: SourceLike = None,
        prob: float = 0.5,
        beta_range: tuple[float, float] = (0.1, 1.0),
        constrain_to_liver: bool = True,
        min_scale_exp: int = 0,
        max_scale_exp: int = 5,
        rotation_range: tuple[float, float] = (-90.0, 90.0),
        threshold: float = 0.5,
        min_anomaly_pixels: int = 16,
        max_tries: int = 5,
        lesion_like_fraction: float = 0.0,
        lesion_like: Mapping[str, Any] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.liver_key = liver_key
        self.mask_key = mask_key
        self.clean_keys = ensure_tuple_rep(clean_key, len(self.keys))
        if len(set(self.clean_keys)) != len(self.clean_keys):
            raise ValueError(f"give one distinct clean_key per key, got keys={self.keys}, clean_key={clean_key}.")
        self.has_anomaly_key = has_anomaly_key
        self.synth = RandLiverAnomaly(
            source=source,
            prob=prob,
            beta_range=beta_range,
            constrain_to_liver=constrain_to_liver,
            min_scale_exp=min_scale_exp,
            max_scale_exp=max_scale_exp,
            rotation_range=rotation_range,
            threshold=threshold,
            min_anomaly_pixels=min_anomaly_pixels,
            max_tries=max_tries,
        )
        if not 0.0 <= lesion_like_fraction <= 1.0:
            raise ValueError(f"lesion_like_fraction must be in [0, 1], got {lesion_like_fraction}.")
        self.lesion_like_fraction = float(lesion_like_fraction)
        self.lesion_synth = RandLesionLikeAnomaly(
            prob=prob,
            constrain_to_liver=constrain_to_liver,
            min_anomaly_pixels=min_anomaly_pixels,
            max_tries=max_tries,
            **dict(lesion_like or {}),
        )
        self._active: SliceAnomaly = self.synth
        self.set_random_state(state=self.R)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandLiverAnomalyd:
        """Set ``self.R`` (see ``Randomizable.set_random_state``) and share it with the inner array transforms."""
        super().set_random_state(seed, state)
        self.synth.set_random_state(state=self.R)
        self.lesion_synth.set_random_state(state=self.R)
        return self

    def randomize(self, data: NdarrayOrTensor) -> None:
        """Draw the anomaly for the liver mask ``data`` (1, H, W).

        The coin with ``prob`` is tossed by the array transform, not here, because a clean draw still writes the
        mask and the flag.
        """
        lesion_like = self.lesion_like_fraction > 0 and self.R.uniform() < self.lesion_like_fraction
        self._active = self.lesion_synth if lesion_like else self.synth
        self._active.randomize(centre_channel(convert_data_type(data, np.ndarray)[0]))
        self._do_transform = self._active._mask is not None

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Return a copy of ``data`` with the augmented image(s) and the targets; see the class docstring."""
        d = dict(data)
        if self.liver_key not in d:
            raise KeyError(f"RandLiverAnomalyd needs the liver mask under key {self.liver_key!r}; keys: {list(d)}.")
        liver = d[self.liver_key]
        self.randomize(liver)
        track_meta = get_track_meta()
        for key, clean_key in self.key_iterator(d, self.clean_keys):
            augmented, mask, has_anomaly = self._active(d[key], liver, randomize=False)
            d[clean_key] = convert_to_tensor(d[key], track_meta=track_meta)
            d[key] = convert_to_tensor(augmented, track_meta=track_meta)
            d[self.mask_key] = convert_to_tensor(mask, track_meta=track_meta)
            d[self.has_anomaly_key] = np.array([has_anomaly], dtype=np.float32)
        return d
