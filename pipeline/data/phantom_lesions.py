"""Lesions and the scanner model of the CT phantoms (:mod:`pipeline.data.phantom`).

Lesions: a kind-specific diameter and contrast per lesion, a rotated lobulated ellipsoid painted into the liver box
(label 1 -> 2). Scanner: a light in-plane blur plus white noise, rounded and clipped to int16 HU. As in
:mod:`pipeline.data.phantom_anatomy`, every random number comes from the caller's generator and the order of the draws
is part of the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.data.phantom_anatomy import Grid

__all__ = ["HU_MIN", "HU_MAX", "LESION_DIAMETER_MM", "RIM_MIN_DIAMETER_MM", "add_lesions", "simulate_scan"]

HU_MIN, HU_MAX = -1024, 3071  # what a 12-bit CT stores: air at the floor, dense bone and metal clipped at the top
LESION_DIAMETER_MM = (3.0, 40.0)  # diameters are drawn log-uniformly in this range
RIM_MIN_DIAMETER_MM = 12.0  # below this a rim lesion has no room for a near-iso core inside its ring


def _lesion_shape(
    rng: np.random.Generator, offsets: Sequence[np.ndarray], radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inside mask and distance to the surface (mm) of a rotated, lobulated ellipsoid at broadcastable offsets (mm).

    The longest semi-axis is ``radius`` and the lobulation only pulls the surface inwards, so the lesion never
    exceeds its nominal diameter.
    """
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    semi = radius * np.concatenate([[1.0], rng.uniform(0.7, 1.0, 2)])
    d = np.stack(np.broadcast_arrays(*offsets), axis=-1) @ rotation
    norm = np.linalg.norm(d, axis=-1)
    unit = d / np.maximum(norm, 1e-6)[..., None]
    # ellipsoid radius along each voxel's direction (huge at the centre, whose direction is undefined)
    ray = 1.0 / np.sqrt(np.maximum(((unit / semi) ** 2).sum(axis=-1), 1e-12))
    lobe_axes = rng.normal(size=(3, 3))
    lobe_axes /= np.linalg.norm(lobe_axes, axis=1, keepdims=True)
    lobes = sum(
        np.cos(k * np.arccos(np.clip(unit @ axis, -1.0, 1.0)) + phase)
        for axis, k, phase in zip(lobe_axes, rng.integers(2, 5, 3), rng.uniform(0, 2 * np.pi, 3))
    ) / 3.0
    surface = ray * (1.0 - rng.uniform(0.05, 0.3) * (0.5 + 0.5 * lobes))
    return norm < surface, surface - norm


def _draw_lesion(
    rng: np.random.Generator, kind: str, spacing_xy: float, diameter_mm: tuple[float, float] = LESION_DIAMETER_MM
) -> dict:
    """Kind-specific diameter (log-uniform in ``diameter_mm``, rim lesions from 12 mm) and contrast of one lesion."""
    low, high = diameter_mm
    rim_mm, rim_delta = 0.0, 0.0
    if kind == "rim":  # room for a near-iso core inside a ring at least one voxel wide (coarse grids lose it else)
        rim_mm = max(rng.uniform(2.0, 3.0), spacing_xy)
        low = min(max(RIM_MIN_DIAMETER_MM, 5.0 * rim_mm), high)
    diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    if kind == "hypo":
        delta = rng.uniform(-70.0, -25.0)
    elif kind == "hyper":
        delta = rng.uniform(20.0, 60.0)
    elif kind == "subtle":
        delta = rng.uniform(10.0, 20.0) * rng.choice([-1.0, 1.0])
    else:  # rim: near-iso core inside a bright or dark ring
        delta = rng.uniform(-5.0, 5.0)
        rim_delta = rng.uniform(30.0, 50.0) * rng.choice([-1.0, 1.0])
    return {
        "kind": kind,
        "diameter_mm": round(diameter, 2),
        "delta_hu": round(float(delta), 2),
        "rim_mm": round(float(rim_mm), 2),
        "rim_delta_hu": round(float(rim_delta), 2),
    }


def add_lesions(
    rng: np.random.Generator,
    sub: Grid,
    liver_hu: np.ndarray,
    liver_label: np.ndarray,
    parenchyma: np.ndarray,
    n_lesions: int,
    kinds: Sequence[str],
    diameter_mm: tuple[float, float] = LESION_DIAMETER_MM,
) -> list[tuple[dict, np.ndarray]]:
    """Paint lesions into the liver box arrays ``liver_hu`` and ``liver_label`` (1 -> 2), clipped to the liver.

    Centres are liver voxels deep enough for half the lesion, outside earlier lesions and, when possible, far enough
    from them not to touch; a lesion only claims voxels no earlier lesion owns, so each owns at least its centre.

    Returns:
        (lesion record, centre index in the box) per lesion.
    """
    depth = ndimage.distance_transform_edt(liver_label == 1, sampling=sub.spacing)
    placed: list[tuple[dict, np.ndarray]] = []
    for _ in range(n_lesions):
        lesion = _draw_lesion(rng, kinds[rng.integers(len(kinds))], float(sub.spacing[0]), diameter_mm)
        radius = lesion["diameter_mm"] / 2.0
        candidates = np.flatnonzero((depth >= min(0.5 * radius, 0.8 * depth.max())) & (liver_label == 1))
        if candidates.size == 0:
            break
        for _attempt in range(30):
            center = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], liver_label.shape))
            gaps = [np.linalg.norm((center - c) * sub.spacing) - radius - o["diameter_mm"] / 2 for o, c in placed]
            if min(gaps, default=np.inf) > 2.0:
                break
        reach = np.ceil(radius / sub.spacing).astype(int) + 1
        window = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(center, reach, liver_label.shape))
        offsets = [(np.arange(s.start, s.stop) - c) * sp for s, c, sp in zip(window, center, sub.spacing)]
        inside, to_surface = _lesion_shape(
            rng, (offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]), radius
        )
        owned = inside & (liver_label[window] == 1)
        value = parenchyma[window] + lesion["delta_hu"]
        if lesion["kind"] == "rim":
            value = np.where(to_surface < lesion["rim_mm"], parenchyma[window] + lesion["rim_delta_hu"], value)
        liver_hu[window][owned] = value[owned]
        liver_label[window][owned] = 2
        lesion["voxels"] = int(owned.sum())
        placed.append((lesion, center))
    return placed


def _gaussian_kernel_power(sigma: float, truncate: float = 4.0) -> float:
    """Sum of squares of scipy's discrete 1-D Gaussian kernel: the variance it leaves of unit white noise."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    return float((kernel**2).sum())


def simulate_scan(hu: np.ndarray, noise_sigma: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    """Light in-plane blur (partial volume) of ``hu`` plus white noise scaled so the blurred noise has ``noise_sigma``.

    Returns int16 HU clipped to [-1024, 3071].
    """
    # one filter pass for image and noise: the noise std after blurring is its std times the 2-D kernel power
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_sigma / _gaussian_kernel_power(blur))
    hu = ndimage.gaussian_filter(hu, (blur, blur, 0.0), mode="nearest")
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
