"""Anomaly sources: where the texture blended into a synthetic anomaly comes from.

A source returns one gray image per call, drawn with the random state it is given, so that the synthesis transform
can drive every random choice from its own ``self.R`` (reproducible under ``set_determinism``/``set_random_state``).
Both sources end with DRAEM's augmentation: 3 ops drawn without repeat from a fixed list (``augment_gray``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from transforms.errors import InputDataError
from transforms.perlin import perlin_noise_2d

__all__ = ["AUGMENT_OPS", "augment_gray", "AnomalySource", "ImageFolderSource", "PerlinTextureSource"]

# PIL's ImageFilter.SMOOTH kernel, the "degenerate" image of PIL's ImageEnhance.Sharpness
_SMOOTH_KERNEL = np.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
# ITU-R 601 luma weights, as PIL's convert("L") and OpenCV's BGR2GRAY
_LUMA = np.array([0.299, 0.587, 0.114])


def _gamma(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    return image ** rng.uniform(0.5, 2.0)


def _brightness(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    return image * rng.uniform(0.8, 1.2) + rng.uniform(-30.0, 30.0) / 255.0


def _sharpness(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    # PIL: factor 0 gives the smoothed image, 1 the original, 2 doubles the difference (unsharp masking)
    smooth = ndimage.convolve(image, _SMOOTH_KERNEL, mode="nearest")
    return smooth + rng.uniform(0.0, 2.0) * (image - smooth)


def _solarize(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    threshold = rng.uniform(32.0, 128.0) / 255.0
    return np.where(image < threshold, image, 1.0 - image)


def _posterize(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    bits = int(rng.randint(4, 9))
    levels = np.round(image * 255.0).astype(np.uint8)
    return (levels & np.uint8((0xFF << (8 - bits)) & 0xFF)) / 255.0


def _invert(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    return 1.0 - image


def _autocontrast(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    # imgaug's pillike.Autocontrast default: cut 0-20 % of the histogram at each end before stretching
    cutoff = rng.uniform(0.0, 20.0)
    low, high = np.percentile(image, [cutoff, 100.0 - cutoff])
    if high <= low:
        return image
    return (image - low) / (high - low)


def _equalize(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    levels = np.round(image * 255.0).astype(np.int64)
    cdf = np.cumsum(np.bincount(levels.ravel(), minlength=256)).astype(np.float64)
    cdf_min = cdf[cdf > 0][0]
    if cdf[-1] <= cdf_min:  # a single gray level: nothing to spread
        return image
    return (cdf[levels] - cdf_min) / (cdf[-1] - cdf_min)


def _rotate(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    # zero fill, as imgaug's Affine; the corners become black
    return ndimage.rotate(image, rng.uniform(-45.0, 45.0), reshape=False, order=1, mode="constant", cval=0.0)


#: DRAEM's augmentation list without its colour op (hue/saturation), each ``op(gray, rng) -> gray`` on float [0, 1].
AUGMENT_OPS: dict[str, Callable[[np.ndarray, np.random.RandomState], np.ndarray]] = {
    "gamma": _gamma,
    "brightness": _brightness,
    "sharpness": _sharpness,
    "solarize": _solarize,
    "posterize": _posterize,
    "invert": _invert,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
}


def augment_gray(image: np.ndarray, rng: np.random.RandomState, n_ops: int = 3) -> np.ndarray:
    """DRAEM's anomaly-source augmentation on a gray image: ``n_ops`` ops of ``AUGMENT_OPS``, drawn without repeat,
    applied in the drawn order (gamma 0.5-2, brightness x0.8-1.2 and +-30/255, sharpness factor 0-2 as PIL,
    solarize at 32-128/255, posterize to 4-8 bits, invert, autocontrast, histogram equalisation, rotation +-45 deg).

    Args:
        image: float array ``(H, W)`` with values in [0, 1].
        rng: random state for the choice of ops and their parameters.
        n_ops: how many distinct ops to apply (at most ``len(AUGMENT_OPS)``).

    Returns:
        float32 array ``(H, W)``, values clipped to [0, 1] after every op.
    """
    names = list(AUGMENT_OPS)
    out = np.asarray(image, dtype=np.float64)
    for index in rng.choice(len(names), size=n_ops, replace=False):
        out = np.clip(AUGMENT_OPS[names[index]](out, rng), 0.0, 1.0)
    return out.astype(np.float32)


class AnomalySource(ABC):
    """Base class of anomaly sources: the texture ``A`` of the blend ``I_a = (1-M) I + (1-beta) M I + beta M A``."""

    @abstractmethod
    def sample(self, shape: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
        """Return a new texture: float32 ``(H, W) = shape``, values in [0, 1], drawn only from ``rng``."""


class ImageFolderSource(AnomalySource):
    """Anomaly textures from the image files of a folder (DRAEM: DTD; the paper: BrainTumor MRI slices).

    Files are listed once, recursively and sorted (so ``rng`` picks the same file on every machine). Each file is
    read with SimpleITK, turned into gray (RGB -> ITU-R 601 luma, alpha dropped), scaled to [0, 1] (8-bit: /255,
    other types: min-max), resized bilinearly with antialiasing to the requested shape, and kept in an LRU cache of
    ``cache_size`` resized images. With ``augment``, ``augment_gray`` is applied to every sample.

    Args:
        folder: the folder to take images from (searched recursively).
        extensions: file name endings to accept (case-insensitive).
        augment: apply DRAEM's 3-op augmentation to every sample.
        cache_size: how many resized gray images to keep in memory (0 disables the cache).

    Raises:
        InputDataError: the folder is missing or holds no matching file; on ``sample``, a file cannot be read.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png"),
        augment: bool = True,
        cache_size: int = 256,
    ) -> None:
        self.folder = Path(folder)
        self.extensions = tuple(ext.lower() for ext in extensions)
        self.augment = augment
        self.cache_size = cache_size
        if not self.folder.is_dir():
            raise InputDataError(
                self.folder, "the anomaly source folder does not exist.", fix="give a folder of image files."
            )
        matches = (p for p in self.folder.rglob("*") if p.name.lower().endswith(self.extensions) and p.is_file())
        self.files = sorted(matches)
        if not self.files:
            raise InputDataError(
                self.folder,
                f"the anomaly source folder holds no image file ending in {', '.join(self.extensions)}.",
                fix="put images there or change `extensions`.",
            )
        self._cache: OrderedDict[tuple[Path, tuple[int, int]], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.files)

    def sample(self, shape: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
        """A random file of the folder as gray float32 ``(H, W) = shape`` in [0, 1], augmented if ``augment``."""
        image = self.load(self.files[rng.randint(len(self.files))], shape)
        return augment_gray(image, rng) if self.augment else image.copy()

    def load(self, path: Path, shape: tuple[int, int]) -> np.ndarray:
        """Gray float32 ``(H, W) = shape`` in [0, 1] of one file, through the LRU cache (do not modify the result)."""
        key = (path, (int(shape[0]), int(shape[1])))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = _resize(_read_gray(path), key[1])
        if self.cache_size > 0:
            self._cache[key] = image
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image


def _read_gray(path: Path) -> np.ndarray:
    """Read a 2D image file as float64 gray (H, W) in [0, 1]; InputDataError naming the file if that fails."""
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as error:
        raise InputDataError(path, f"cannot be read as an image ({str(error).strip().splitlines()[-1]}).") from error
    is_8bit = array.dtype == np.uint8
    if array.ndim == 3 and array.shape[-1] in (3, 4):  # SimpleITK puts colour components last
        array = array[..., :3] @ _LUMA
    array = np.squeeze(array).astype(np.float64)
    if array.ndim != 2 or min(array.shape) < 2:
        raise InputDataError(path, f"is not a 2D gray or RGB image (array shape {array.shape}).")
    if not np.isfinite(array).all():
        raise InputDataError(path, "holds non-finite pixel values.")
    if is_8bit:
        return array / 255.0
    low, high = array.min(), array.max()
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of a 2D float image to ``shape``; float32, clipped to [0, 1]."""
    if image.shape == shape:
        return image.astype(np.float32)
    tensor = torch.as_tensor(image, dtype=torch.float32)[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=shape, mode="bilinear", antialias=True, align_corners=False)
    return resized[0, 0].clamp_(0.0, 1.0).numpy()


class PerlinTextureSource(AnomalySource):
    """Procedural anomaly textures when no image folder is given (as anomalib without ``anomaly_source_path``).

    Perlin noise with a lattice resolution ``2**k`` per axis (``k`` uniform in ``min_scale_exp..max_scale_exp``,
    drawn separately per axis), with probability ``octave_prob`` plus half of a second octave at twice the resolution,
    min-max normalised to [0, 1], then ``augment_gray`` if ``augment``.

    Args:
        augment: apply DRAEM's 3-op augmentation to every sample.
        min_scale_exp: smallest exponent of the lattice resolution.
        max_scale_exp: largest exponent of the lattice resolution (inclusive).
        octave_prob: probability of adding the second octave.
    """

    def __init__(
        self, augment: bool = True, min_scale_exp: int = 0, max_scale_exp: int = 5, octave_prob: float = 0.5
    ) -> None:
        self.augment = augment
        self.min_scale_exp = min_scale_exp
        self.max_scale_exp = max_scale_exp
        self.octave_prob = octave_prob

    def sample(self, shape: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
        """A new procedural texture: float32 ``(H, W) = shape`` in [0, 1]."""
        res = tuple(2 ** int(rng.randint(self.min_scale_exp, self.max_scale_exp + 1)) for _ in range(2))
        noise = perlin_noise_2d(shape, res, rng).astype(np.float64)
        if rng.random_sample() < self.octave_prob:
            noise += 0.5 * perlin_noise_2d(shape, tuple(2 * r for r in res), rng)
        low, high = noise.min(), noise.max()
        texture = (noise - low) / (high - low) if high > low else np.full(noise.shape, 0.5)
        return augment_gray(texture, rng) if self.augment else texture.astype(np.float32)
