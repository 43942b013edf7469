"""Lesion-like synthetic anomalies: the liver's own texture, shifted in intensity inside a round, irregular blob.

The paper's synthesis blends an out-of-distribution texture (brain MRI) into the liver. Real liver lesions keep a
CT-like texture and differ from the parenchyma mainly by a few tens of HU, darker (hypodense metastases, cysts) or
brighter (hyperdense lesions in the arterial phase), with soft borders or an enhancing rim around a near-iso core.
This transform synthesises exactly that, so that a detector is not taught "anything that looks like brain MRI".
"""

from __future__ import annotations

import numpy as np
from monai.transforms import RandomizableTransform
from scipy import ndimage

from transforms.anomaly import SliceAnomaly
from transforms.intensity import DEFAULT_HU_WINDOW
from transforms.perlin import perlin_noise_2d

__all__ = ["RandLesionLikeAnomaly"]

DEFAULT_HU_PER_UNIT = float(DEFAULT_HU_WINDOW[1] - DEFAULT_HU_WINDOW[0])


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    a, b = float(value[0]), float(value[1])
    if not low <= a <= b <= high:
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value}.")
    return a, b


class RandLesionLikeAnomaly(SliceAnomaly):
    """Shift the intensity of the liver inside a random lesion-shaped blob (hypo- or hyperdense, soft or rimmed).

    With probability ``prob`` a sample is anomalous. Its lesion is an ellipse centred on a random liver pixel, with
    semi-axes ``radius_range`` x the slice side (each drawn separately), rotated at random and with an irregular
    border: a pixel is inside when its normalised elliptic radius is below ``1 + irregularity * n`` with ``n`` a
    low-frequency Perlin noise in [-1, 1]. The lesion mask ``M`` is that blob, intersected with the liver when
    ``constrain_to_liver``. The image is changed by an additive HU shift, so the liver's own texture and noise stay::

        I_a = clip(I + liver * (delta_core * S + delta_rim * R) / hu_per_unit, 0, 1)

    where ``S`` is ``M`` blurred by a Gaussian of sigma ~ U(``softness_range``) pixels (soft border), ``delta_core``
    ~ +-U(``shift_hu_range``) HU (positive with probability ``hyperdense_prob``). With probability ``rim_prob`` the
    lesion is instead iso-dense with a rim: ``delta_core`` ~ U(-5, 5) HU and ``R`` is the ring of ``M`` within
    ``rim_width_range`` pixels of its border (blurred like ``S``), with ``delta_rim`` ~ +-U(``shift_hu_range``) HU;
    otherwise ``R = 0``. ``hu_per_unit`` converts HU to the [0, 1] scale of the windowed slice (the window width:
    450 for the default [-200, 250] HU window). A blob smaller than ``min_anomaly_pixels`` is redrawn, at most
    ``max_tries`` times in all; then the sample is clean. All draws come from ``self.R``.

    Args:
        prob: probability that a sample is anomalous.
        shift_hu_range: (low, high) magnitude of the core (or rim) shift in HU, low >= 0.
        hyperdense_prob: probability that the shift is positive (brighter than the liver).
        rim_prob: probability of an iso-dense lesion with a bright or dark rim.
        rim_width_range: (low, high) rim width in pixels.
        radius_range: (low, high) semi-axis as a fraction of the slice side, in (0, 1].
        irregularity: amplitude of the Perlin perturbation of the border (0: a clean ellipse).
        softness_range: (low, high) Gaussian sigma of the border in pixels (0: a hard edge).
        hu_per_unit: HU per unit of the windowed image (the window width).
        constrain_to_liver: intersect the blob with the liver.
        min_anomaly_pixels: smallest accepted lesion area in pixels.
        max_tries: how many blobs to draw before giving up (clean sample).

    Input: ``image`` (1, H, W) float in [0, 1] and ``liver`` (1, H, W) {0, 1} (nonzero = liver), numpy or torch.
    Output: ``(augmented, mask, has_anomaly)`` as ``RandLiverAnomaly``: augmented (1, H, W) float32 in [0, 1], mask
    (1, H, W) float32 {0, 1} (the lesion, rim included), both the array type of ``image``, has_anomaly 1.0 iff the
    mask is not empty.

    Raises:
        InputDataError: the image is not (1, H, W), holds non-finite values, or the liver mask has another shape.
    """

    def __init__(
        self,
        prob: float = 0.5,
        shift_hu_range: tuple[float, float] = (10.0, 60.0),
        hyperdense_prob: float = 0.5,
        rim_prob: float = 0.25,
        rim_width_range: tuple[float, float] = (1.0, 3.0),
        radius_range: tuple[float, float] = (0.015, 0.1),
        irregularity: float = 0.3,
        softness_range: tuple[float, float] = (0.0, 2.0),
        hu_per_unit: float = DEFAULT_HU_PER_UNIT,
        constrain_to_liver: bool = True,
        min_anomaly_pixels: int = 16,
        max_tries: int = 5,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.shift_hu_range = _check_range("shift_hu_range", shift_hu_range, 0.0, np.inf)
        self.rim_width_range = _check_range("rim_width_range", rim_width_range, 0.0, np.inf)
        self.radius_range = _check_range("radius_range", radius_range, 1e-6, 1.0)
        self.softness_range = _check_range("softness_range", softness_range, 0.0, np.inf)
        for name, p in (("hyperdense_prob", hyperdense_prob), ("rim_prob", rim_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}.")
        if hu_per_unit <= 0:
            raise ValueError(f"hu_per_unit must be positive, got {hu_per_unit}.")
        if max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}.")
        self.hyperdense_prob = float(hyperdense_prob)
        self.rim_prob = float(rim_prob)
        self.irregularity = float(irregularity)
        self.hu_per_unit = float(hu_per_unit)
        self.constrain_to_liver = constrain_to_liver
        self.min_anomaly_pixels = min_anomaly_pixels
        self.max_tries = max_tries
        self._mask: np.ndarray | None = None
        self._delta: np.ndarray | None = None  # the HU change per pixel, (H, W)

    def _blob(self, inside: np.ndarray) -> np.ndarray:
        """One random irregular ellipse (H, W) bool, centred on a liver pixel (anywhere when unconstrained)."""
        h, w = inside.shape
        if self.constrain_to_liver:
            ys, xs = np.nonzero(inside)
            k = self.R.randint(len(ys))
            cy, cx = float(ys[k]), float(xs[k])
        else:
            cy, cx = self.R.uniform(0, h), self.R.uniform(0, w)
        side = max(h, w)
        a, b = (self.R.uniform(*self.radius_range) * side for _ in range(2))
        theta = self.R.uniform(0.0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        radius = np.sqrt((u / max(a, 0.5)) ** 2 + (v / max(b, 0.5)) ** 2)
        border = 1.0 + self.irregularity * perlin_noise_2d((h, w), (4, 4), self.R)
        blob = radius < border
        return blob & inside if self.constrain_to_liver else blob

    def randomize(self, liver: np.ndarray) -> None:
        """Draw the coin, then (if anomalous) the blob for this liver mask (1, H, W) and its intensity profile."""
        super().randomize(None)
        self._mask, self._delta = None, None
        if not self._do_transform:
            return
        inside = liver.reshape(liver.shape[-2:]) > 0
        if self.constrain_to_liver and inside.sum() < self.min_anomaly_pixels:
            return
        for _ in range(self.max_tries):
            blob = self._blob(inside)
            if blob.sum() >= self.min_anomaly_pixels:
                break
        else:
            return
        sigma = self.R.uniform(*self.softness_range)

        def soft(region: np.ndarray) -> np.ndarray:
            region = region.astype(np.float32)
            return ndimage.gaussian_filter(region, sigma) if sigma > 0 else region

        def signed_shift() -> float:
            return self.R.uniform(*self.shift_hu_range) * (1.0 if self.R.uniform() < self.hyperdense_prob else -1.0)

        if self.R.uniform() < self.rim_prob:
            width = self.R.uniform(*self.rim_width_range)
            # distance from the outside, in pixels: the ring is the blob's outer `width` pixels
            depth = ndimage.distance_transform_edt(blob)
            delta = self.R.uniform(-5.0, 5.0) * soft(blob) + signed_shift() * soft(blob & (depth <= width))
        else:
            delta = signed_shift() * soft(blob)
        self._mask = blob.astype(np.float32)
        self._delta = delta.astype(np.float32)

    def blend(self, image: np.ndarray, liver: np.ndarray) -> np.ndarray:
        """The image plus the drawn HU change, converted to the windowed scale."""
        # the image is zero outside the liver after preparation; keep the change inside it either way
        support = (liver > 0) if self.constrain_to_liver else 1.0
        return image + support * self._delta[None] / self.hu_per_unit
