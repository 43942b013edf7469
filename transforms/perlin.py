"""2D Perlin noise and the random Perlin mask of DRAEM-style anomaly synthesis.

The noise follows DRAEM's ``rand_perlin_2d_np`` (random unit gradients on a ``res`` lattice, quintic fade, result
times sqrt(2)), with anomalib's fix for image sizes that are not divisible by the lattice resolution (anomalib PR #490):
the noise is defined on a square of the next power of two and cropped to the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from monai.config import NdarrayOrTensor
from monai.transforms import RandomizableTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

__all__ = ["perlin_noise_2d", "RandPerlinMask"]


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0 and 1)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _generation_side(shape: Sequence[int], res: Sequence[int]) -> int:
    """Side of the square the noise is defined on: the next power of two >= every image side and lattice size,
    rounded up to a multiple of both resolutions (only needed for resolutions that are not powers of two)."""
    side = 1 << (max(*shape, *res) - 1).bit_length()
    step = math.lcm(*res)
    return -(-side // step) * step


def perlin_noise_2d(shape: Sequence[int], res: Sequence[int], rng: np.random.RandomState) -> np.ndarray:
    """Gradient (Perlin) noise of any 2D size.

    The lattice has ``res[0] x res[1]`` cells spanning a square of side ``S`` (the next power of two >= max(H, W),
    divisible by ``res``); the returned array is its top-left ``H x W`` crop, exactly what generating the full
    ``S x S`` noise and cropping would give, without computing the unused part.

    Args:
        shape: output size ``(H, W)``.
        res: lattice resolution per axis ``(res_y, res_x)``, positive integers (DRAEM uses powers of two 1..32).
        rng: the random state all gradient angles are drawn from.

    Returns:
        float32 array ``(H, W)``, values in [-1, 1] (finite), zero at every lattice point.
    """
    height, width = (int(s) for s in shape)
    res_y, res_x = (int(r) for r in res)
    if height < 1 or width < 1 or res_y < 1 or res_x < 1:
        raise ValueError(f"shape and res must be positive, got shape={tuple(shape)}, res={tuple(res)}.")
    side = _generation_side((height, width), (res_y, res_x))

    angles = 2.0 * np.pi * rng.random_sample((res_y + 1, res_x + 1))
    grad_y, grad_x = np.cos(angles), np.sin(angles)

    # lattice coordinates of the pixels: integer part = cell index, fractional part = position inside the cell
    pos_y = np.arange(height) * (res_y / side)
    pos_x = np.arange(width) * (res_x / side)
    cell_y = np.floor(pos_y).astype(int)
    cell_x = np.floor(pos_x).astype(int)
    frac_y = (pos_y - cell_y)[:, None]
    frac_x = (pos_x - cell_x)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        """Dot product of each pixel's offset from corner (dy, dx) of its cell with that corner's gradient."""
        # rows first, then columns: two cheap 1D gathers instead of one (H, W) fancy index
        g_y = grad_y[cell_y + dy][:, cell_x + dx]
        g_x = grad_x[cell_y + dy][:, cell_x + dx]
        return (frac_y - dy) * g_y + (frac_x - dx) * g_x

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    fade_y, fade_x = _fade(frac_y), _fade(frac_x)
    top = n00 + fade_x * (n01 - n00)
    bottom = n10 + fade_x * (n11 - n10)
    noise = math.sqrt(2.0) * (top + fade_y * (bottom - top))
    return noise.astype(np.float32)


class RandPerlinMask(RandomizableTransform):
    """Random binary Perlin mask, as DRAEM draws its anomaly regions.

    Per call: a lattice resolution ``2**k`` per axis with ``k`` drawn separately for each axis, uniformly from
    ``min_scale_exp..max_scale_exp`` (inclusive; defaults give 1, 2, 4, 8, 16 or 32), Perlin noise of the image size,
    rotated by an angle ~ U(rotation_range) degrees (bilinear, reflected borders so the corners are not empty),
    thresholded at ``threshold``. All randomness comes from ``self.R``.

    Args:
        min_scale_exp: smallest exponent of the lattice resolution.
        max_scale_exp: largest exponent of the lattice resolution (inclusive).
        rotation_range: (low, high) rotation angle of the noise in degrees.
        threshold: noise values above it are inside the mask (DRAEM: 0.5; noise lies in [-1, 1]).

    Input: an image ``(C, H, W)`` (numpy or torch, any dtype), only its spatial shape is used.
    Output: float32 mask ``(1, H, W)`` with values in {0, 1}, same array type as the input (a MetaTensor input gives a
    MetaTensor carrying its meta data).
    """

    def __init__(
        self,
        min_scale_exp: int = 0,
        max_scale_exp: int = 5,
        rotation_range: tuple[float, float] = (-90.0, 90.0),
        threshold: float = 0.5,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0 <= min_scale_exp <= max_scale_exp:
            raise ValueError(f"need 0 <= min_scale_exp <= max_scale_exp, got {min_scale_exp}, {max_scale_exp}.")
        self.min_scale_exp = min_scale_exp
        self.max_scale_exp = max_scale_exp
        self.rotation_range = (float(rotation_range[0]), float(rotation_range[1]))
        self.threshold = threshold
        self._noise: np.ndarray | None = None

    def randomize(self, spatial_size: Sequence[int]) -> None:
        """Draw the resolution, the noise of ``spatial_size`` (H, W) and its rotation angle from ``self.R``."""
        super().randomize(None)
        res = tuple(2 ** int(self.R.randint(self.min_scale_exp, self.max_scale_exp + 1)) for _ in range(2))
        noise = perlin_noise_2d(spatial_size, res, self.R)
        angle = self.R.uniform(*self.rotation_range)
        self._noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="reflect")

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Return a new random mask of the spatial shape of ``img`` (C, H, W); see the class docstring."""
        spatial_size = tuple(img.shape[-2:])
        if randomize:
            self.randomize(spatial_size)
        if self._noise is None or self._noise.shape != spatial_size:
            raise RuntimeError("call randomize(spatial_size) with the image's (H, W) before randomize=False.")
        mask = (self._noise > self.threshold).astype(np.float32)[None]
        return convert_to_dst_type(mask, dst=img, dtype=np.float32)[0]
