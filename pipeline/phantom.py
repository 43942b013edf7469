"""Procedural abdominal CT phantoms with liver and lesion labels.

This is synthetic data for exercising the pipeline (the demo, the tests, the benchmarks) on a machine without real
scans. It is NOT a substitute for real CT: the anatomy is a handful of deformed ellipsoids and tubes, the noise is
Gaussian, and no conclusion about detection performance on patients can be drawn from it.

A case is built in a canonical RAS array (axis 0 towards the patient's Right, 1 Anterior, 2 Superior; world millimetres
centred on the volume) and then, for LPS cases, the first two array axes and the affine are flipped together, so both
orientations hold the same anatomy at the same world coordinates. Every random number comes from
``np.random.default_rng(seed)``, so a seed fixes a case exactly.

Labels follow LiTS: 0 background, 1 liver (vessels included), 2 lesion (always inside the liver).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.io import atomic_write_bytes
from transforms.errors import InputDataError

__all__ = ["LESION_KINDS", "PhantomCase", "case_seed", "make_phantom_case", "write_phantom_cohort", "main"]

LESION_KINDS = ("hypo", "hyper", "subtle", "rim")
ORIENTATIONS = ("RAS", "LPS")
HU_MIN, HU_MAX = -1024, 3071
LESION_DIAMETER_MM = (3.0, 40.0)
RIM_MIN_DIAMETER_MM = 12.0


@dataclass(eq=False)
class PhantomCase:
    """One generated case, arrays in the stored orientation.

    Attributes:
        case_id: name of the case, e.g. ``"phantom_003"``.
        ct: int16 array (X, Y, Z) of HU in [-1024, 3071].
        label: uint8 array (X, Y, Z): 0 background, 1 liver, 2 lesion.
        affine: 4x4 float64 voxel-to-world (RAS mm) matrix.
        lesions: one dict per lesion: ``kind``, ``diameter_mm``, ``delta_hu`` (core vs parenchyma), ``rim_mm`` and
            ``rim_delta_hu`` (0 unless kind is ``"rim"``), ``center_voxel`` (stored array indices), ``center_mm``
            (world), ``voxels`` (number of label-2 voxels this lesion owns).
        seed: the seed the case was generated from.
        orientation: axis codes of the stored arrays, ``"RAS"`` or ``"LPS"``.
        params: the per-case drawn parameters (spacing, liver mean HU, noise level, ...), json-serialisable.
        vessels: bool array (X, Y, Z), the liver vessel voxels (label 1); kept for tests and figures, not written.
    """

    case_id: str
    ct: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    lesions: list[dict] = field(default_factory=list)
    seed: int = 0
    orientation: str = "RAS"
    params: dict = field(default_factory=dict)
    vessels: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """Everything but the voxel arrays, as plain json-serialisable Python values."""
        return {
            "case_id": self.case_id,
            "seed": int(self.seed),
            "orientation": self.orientation,
            "shape": [int(n) for n in self.ct.shape],
            "spacing_mm": [round(float(s), 4) for s in nib.affines.voxel_sizes(self.affine)],
            "affine": [[float(v) for v in row] for row in self.affine],
            "params": dict(self.params),
            "lesions": [dict(lesion) for lesion in self.lesions],
        }


@dataclass(frozen=True)
class _Grid:
    """World coordinates (mm, canonical RAS, origin at the volume centre) of a voxel grid, as broadcastable axes."""

    x: np.ndarray  # (X, 1, 1)
    y: np.ndarray  # (1, Y, 1)
    z: np.ndarray  # (1, 1, Z)
    spacing: np.ndarray  # (3,)

    @classmethod
    def centred(cls, shape: Sequence[int], spacing: np.ndarray) -> _Grid:
        """Grid of ``shape`` voxels of ``spacing`` mm whose centre is world 0."""
        x, y, z = ((np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing))
        return cls(x[:, None, None], y[None, :, None], z[None, None, :], spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Number of voxels along x, y, z."""
        return self.x.shape[0], self.y.shape[1], self.z.shape[2]

    @property
    def origin(self) -> np.ndarray:
        """World position (mm) of the first voxel."""
        return np.array([self.x.flat[0], self.y.flat[0], self.z.flat[0]])

    def box(self, center: np.ndarray, half_size: np.ndarray) -> tuple[slice, slice, slice]:
        """Index box of the voxels within ``center +- half_size`` (mm), clipped to the grid."""
        axes = (self.x.ravel(), self.y.ravel(), self.z.ravel())
        bounds = [(np.searchsorted(a, c - h), np.searchsorted(a, c + h)) for a, c, h in zip(axes, center, half_size)]
        return tuple(slice(int(lo), int(hi)) for lo, hi in bounds)

    def crop(self, box: tuple[slice, slice, slice]) -> _Grid:
        """The grid of the voxels inside ``box``."""
        return _Grid(self.x[box[0]], self.y[:, box[1]], self.z[:, :, box[2]], self.spacing)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, cell_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance float32 random field of ``shape`` with a correlation length of about ``cell_mm``.

    Drawn on a coarse grid (one node per ``cell_mm``) and interpolated up: far cheaper than filtering a full grid.
    """
    coarse = [max(3, int(np.ceil(n * s / cell_mm)) + 1) for n, s in zip(shape, spacing)]
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.7, mode="wrap")
    noise = ndimage.zoom(noise, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="grid-wrap")
    noise -= noise.mean()
    return noise / max(float(noise.std()), 1e-6)


def _ellipsoid_radius(points: Sequence[np.ndarray], center: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoid radius (< 1 inside) of broadcastable world coordinates ``points``."""
    return np.sqrt(sum(((p - c) / s) ** 2 for p, c, s in zip(points, center, semi)))


def _paint(hu: np.ndarray, mask: np.ndarray, value: float) -> None:
    """Set ``hu`` to ``value`` where the (broadcastable) ``mask`` is true."""
    hu[np.broadcast_to(mask, hu.shape)] = value


def _torso(rng: np.random.Generator, grid: _Grid, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Paint subcutaneous fat, the muscle wall and bowel/fat abdominal content into ``hu`` (air elsewhere).

    Returns:
        body and abdominal cavity masks, the AP position (mm) of the vertebral body centre, the cavity half width (mm).
    """
    half_width = min(rng.uniform(145.0, 170.0), 0.46 * grid.shape[0] * grid.spacing[0])
    half_depth = half_width * rng.uniform(0.72, 0.82)
    fat_mm, muscle_mm = rng.uniform(8.0, 25.0), rng.uniform(8.0, 14.0)
    theta = np.arctan2(grid.y / half_depth, grid.x / half_width)
    wobble = 1.0 + sum(rng.uniform(-0.03, 0.03) * np.cos(m * theta + rng.uniform(0, 2 * np.pi)) for m in (2, 3, 4))
    z_scale = 1.0 + 0.05 * np.sin(2 * np.pi * grid.z / rng.uniform(250.0, 400.0) + rng.uniform(0, 2 * np.pi))

    def inside_outline(inset_mm: float) -> np.ndarray:
        # the back is flat where the patient lies on the table
        radius = np.sqrt((grid.x / (half_width - inset_mm)) ** 2 + (grid.y / (half_depth - inset_mm)) ** 2) / wobble
        return (radius <= z_scale) & (grid.y >= -0.93 * half_depth * z_scale + inset_mm)

    body, wall, cavity = inside_outline(0.0), inside_outline(fat_mm), inside_outline(fat_mm + muscle_mm)
    _paint(hu, body, rng.uniform(-110.0, -90.0))
    _paint(hu, wall, rng.uniform(40.0, 55.0))
    bowel = _smooth_noise(rng, grid.shape, grid.spacing, rng.uniform(18.0, 28.0))
    _paint(hu, cavity, rng.uniform(-110.0, -80.0))
    _paint(hu, cavity & (bowel > 0.2), rng.uniform(20.0, 40.0))
    _paint(hu, cavity & (bowel > 1.8), rng.uniform(-900.0, -700.0))
    spine_y = -0.93 * half_depth + fat_mm + muscle_mm + rng.uniform(38.0, 48.0)
    return body, cavity, spine_y, half_width - fat_mm - muscle_mm


def _organs(
    rng: np.random.Generator, grid: _Grid, hu: np.ndarray, body: np.ndarray, cavity: np.ndarray, spine_y: float,
    liver_z: float,
) -> None:
    """Paint paraspinal muscles, kidneys (the right one lower), spleen and stomach (gas cap anterior, supine)."""
    xyz = (grid.x, grid.y, grid.z)
    for side in (1.0, -1.0):
        center = (side * rng.uniform(32.0, 40.0), spine_y - rng.uniform(30.0, 38.0))
        semi = (rng.uniform(24.0, 30.0), rng.uniform(18.0, 24.0))
        _paint(hu, (_ellipsoid_radius(xyz[:2], center, semi) < 1.0) & body, rng.uniform(45.0, 55.0))
    for side in (1.0, -1.0):
        kidney_z = liver_z - rng.uniform(45.0, 65.0) - (12.0 if side > 0 else 0.0)
        center = (side * rng.uniform(60.0, 75.0), spine_y + rng.uniform(-5.0, 10.0), kidney_z)
        semi = (rng.uniform(22.0, 28.0), rng.uniform(20.0, 26.0), rng.uniform(45.0, 58.0))
        _paint(hu, (_ellipsoid_radius(xyz, center, semi) < 1.0) & cavity, rng.uniform(30.0, 60.0))
    center = (-rng.uniform(80.0, 100.0), spine_y + rng.uniform(10.0, 30.0), liver_z + rng.uniform(0.0, 30.0))
    semi = (rng.uniform(20.0, 30.0), rng.uniform(40.0, 55.0), rng.uniform(45.0, 60.0))
    _paint(hu, (_ellipsoid_radius(xyz, center, semi) < 1.0) & cavity, rng.uniform(40.0, 60.0))
    center = (-rng.uniform(35.0, 60.0), spine_y + rng.uniform(70.0, 90.0), liver_z + rng.uniform(10.0, 40.0))
    semi = (rng.uniform(35.0, 50.0), rng.uniform(25.0, 40.0), rng.uniform(35.0, 50.0))
    stomach = (_ellipsoid_radius(xyz, center, semi) < 1.0) & cavity
    _paint(hu, stomach, rng.uniform(30.0, 45.0))
    _paint(hu, stomach & (grid.y > center[1] + rng.uniform(0.4, 0.7) * semi[1]), -950.0)


def _spine_and_great_vessels(
    rng: np.random.Generator, grid: _Grid, hu: np.ndarray, body: np.ndarray, cavity: np.ndarray, spine_y: float
) -> np.ndarray:
    """Paint vertebrae (cortical shell, cancellous core, discs, canal, posterior arch), aorta and IVC.

    Returns:
        the in-plane (X, Y, 1) mask the liver must stay out of.
    """
    aorta_center = (-rng.uniform(10.0, 20.0), spine_y + rng.uniform(28.0, 34.0))
    aorta = _ellipsoid_radius((grid.x, grid.y), aorta_center, (rng.uniform(10.0, 13.0),) * 2) < 1.0
    ivc_center = (rng.uniform(18.0, 28.0), spine_y + rng.uniform(24.0, 32.0))
    ivc = _ellipsoid_radius((grid.x, grid.y), ivc_center, (rng.uniform(10.0, 14.0), rng.uniform(7.0, 10.0))) < 1.0
    vertebra_semi = (rng.uniform(18.0, 24.0), rng.uniform(14.0, 18.0))
    vertebra_r = _ellipsoid_radius((grid.x, grid.y), (0.0, spine_y), vertebra_semi)
    disc = (grid.z - rng.uniform(0.0, 36.0)) % 36.0 < 8.0  # 28 mm vertebrae between 8 mm discs
    canal_y = spine_y - vertebra_semi[1] - 9.0
    canal_r = np.hypot(grid.x, grid.y - canal_y)
    spinous = (np.abs(grid.x) < 3.5) & (grid.y < canal_y - 8.0) & (grid.y > canal_y - 35.0)
    _paint(hu, (vertebra_r < 1.0) & ~disc, rng.uniform(600.0, 750.0))
    _paint(hu, (vertebra_r < 1.0 - 2.5 / vertebra_semi[1]) & ~disc, rng.uniform(250.0, 350.0))
    _paint(hu, (vertebra_r < 1.05) & disc, rng.uniform(80.0, 100.0))
    _paint(hu, ((canal_r < 14.0) | spinous) & body & ~disc, rng.uniform(450.0, 600.0))
    _paint(hu, canal_r < 8.0, rng.uniform(5.0, 20.0))
    _paint(hu, aorta & cavity, rng.uniform(150.0, 200.0))
    _paint(hu, ivc & cavity, rng.uniform(100.0, 130.0))
    return aorta | ivc | (vertebra_r < 1.4) | (canal_r < 16.0)


# (centre, semi-axes) of the liver's lobes as fractions of its (lateral, AP, craniocaudal) size:
# right lobe, left lobe (anterior, crossing the midline), inferior tip of the right lobe
_LIVER_LOBES = (
    ((0.15, -0.05, 0.0), (0.35, 0.5, 0.5)),
    ((-0.25, 0.12, 0.12), (0.25, 0.28, 0.28)),
    ((0.2, -0.05, -0.28), (0.22, 0.3, 0.22)),
)


def _liver_mask(
    rng: np.random.Generator, grid: _Grid, center: np.ndarray, size: np.ndarray, allowed: np.ndarray
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """A deformed union of the lobe ellipsoids, rotated a little in-plane, restricted to ``allowed``, one component.

    Returns:
        the index box holding the liver and the bool liver mask inside that box.
    """
    box = grid.box(center, 0.6 * size)
    sub = grid.crop(box)
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    u = np.cos(angle) * (sub.x - center[0]) - np.sin(angle) * (sub.y - center[1])
    v = np.sin(angle) * (sub.x - center[0]) + np.cos(angle) * (sub.y - center[1])
    w = sub.z - center[2]
    rho = np.minimum.reduce([
        _ellipsoid_radius(
            (u, v, w), np.array(c) * size * rng.uniform(0.95, 1.05, 3), np.array(s) * size * rng.uniform(0.92, 1.0, 3)
        )
        for c, s in _LIVER_LOBES
    ])
    deform = _smooth_noise(rng, rho.shape, grid.spacing, 35.0)
    liver = (rho * (1.0 + 0.08 * np.clip(deform, -1.5, 1.5)) < 1.0) & allowed[box]
    components, n_components = ndimage.label(liver)
    if n_components > 1:  # clipping by the cavity and the spine can leave islands
        liver = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    return box, liver


def _vessel_centerlines(
    rng: np.random.Generator, roots: np.ndarray, directions: np.ndarray, step_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 3) in world mm and their tube radii (N,) of curved trees, one per (root, direction) row.

    Each segment forks in two thinner ones (radius x 0.65-0.8) until the radius would drop below 2 mm.
    """
    points, radii = [], []
    stack = [(root, d / np.linalg.norm(d), rng.uniform(4.5, 6.0), 0) for root, d in zip(roots, directions)]
    while stack:
        start, direction, radius, depth = stack.pop()
        n_steps = max(2, int(rng.uniform(25.0, 45.0) * (0.6 + radius / 10.0) / step_mm))
        # a random walk of the heading gives smoothly curved tubes
        headings = direction + np.cumsum(rng.normal(0.0, 0.04, (n_steps, 3)), axis=0)
        headings /= np.linalg.norm(headings, axis=1, keepdims=True)
        segment = start + np.cumsum(headings * step_mm, axis=0)
        points.append(segment)
        radii.append(np.full(n_steps, radius))
        child_radius = radius * rng.uniform(0.65, 0.8)
        if depth < 3 and child_radius >= 2.0:
            side = np.cross(headings[-1], rng.normal(size=3))
            side /= np.linalg.norm(side)
            for sign in (1.0, -1.0):
                angle = np.deg2rad(rng.uniform(25.0, 50.0))
                child = np.cos(angle) * headings[-1] + sign * np.sin(angle) * side
                stack.append((segment[-1], child, child_radius, depth + 1))
    return np.concatenate(points), np.concatenate(radii)


# (root, initial direction) of the vessel trees in liver-size fractions: portal branches from the hilum (right,
# left, inferior), hepatic veins from the confluence near the IVC (lateral, anterior, left)
_VESSEL_TREES = (
    ((-0.05, -0.1, -0.1), (1.0, -0.2, 0.2)),
    ((-0.05, -0.1, -0.1), (-1.0, 0.4, 0.2)),
    ((-0.05, -0.1, -0.1), (0.5, 0.3, -0.6)),
    ((-0.1, -0.3, 0.3), (1.0, 0.5, -0.3)),
    ((-0.1, -0.3, 0.3), (0.0, 1.0, -0.3)),
    ((-0.1, -0.3, 0.3), (-0.8, 0.6, -0.3)),
)


def _liver_vessels(
    rng: np.random.Generator, sub: _Grid, liver: np.ndarray, center: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """Bool mask (liver box) of branching vessel trees, 2-6 mm radius, clipped to the liver.

    Centre lines are rasterised with their radius, then a distance map grows each voxel of a line to its tube.
    """
    roots = center + np.array([root for root, _ in _VESSEL_TREES]) * size
    directions = np.array([d for _, d in _VESSEL_TREES]) + rng.normal(0.0, 0.2, (len(_VESSEL_TREES), 3))
    points, radii = _vessel_centerlines(rng, roots, directions, 0.5 * float(sub.spacing.min()))
    index = np.rint((points - sub.origin) / sub.spacing).astype(int)
    keep = np.all((index >= 0) & (index < np.array(sub.shape)), axis=1)
    if not keep.any():
        return np.zeros(liver.shape, dtype=bool)
    radius_map = np.zeros(liver.shape, dtype=np.float32)
    np.maximum.at(radius_map, tuple(index[keep].T), radii[keep].astype(np.float32))
    distance, nearest = ndimage.distance_transform_edt(radius_map == 0, sampling=sub.spacing, return_indices=True)
    return liver & (distance <= radius_map[tuple(nearest)])


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


def _draw_lesion(rng: np.random.Generator, kind: str, spacing_xy: float) -> dict:
    """Kind-specific diameter (log-uniform in 3-40 mm, rim lesions from 12 mm) and contrast of one lesion."""
    low, high = LESION_DIAMETER_MM
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


def _add_lesions(
    rng: np.random.Generator,
    sub: _Grid,
    liver_hu: np.ndarray,
    liver_label: np.ndarray,
    parenchyma: np.ndarray,
    n_lesions: int,
    kinds: Sequence[str],
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
        lesion = _draw_lesion(rng, kinds[rng.integers(len(kinds))], float(sub.spacing[0]))
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


def _scan(hu: np.ndarray, noise_sigma: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    """Light in-plane blur (partial volume) of ``hu`` plus white noise scaled so the blurred noise has ``noise_sigma``.

    Returns int16 HU clipped to [-1024, 3071].
    """
    # one filter pass for image and noise: the noise std after blurring is its std times the 2-D kernel power
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_sigma / _gaussian_kernel_power(blur))
    hu = ndimage.gaussian_filter(hu, (blur, blur, 0.0), mode="nearest")
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def make_phantom_case(
    seed: int,
    case_id: str = "phantom_000",
    size: int = 192,
    n_slices: int = 48,
    n_lesions: int | None = None,
    lesion_kinds: Sequence[str] = LESION_KINDS,
    orientation: str = "RAS",
) -> PhantomCase:
    """Generate one abdominal CT phantom with its liver/lesion label map.

    Args:
        seed: seed of ``np.random.default_rng``; the same arguments give the same case, whatever the orientation.
        case_id: name stored in the case.
        size: in-plane voxels (square); spacing is drawn in 0.7-1.0 x (512 / size) mm, a 358-512 mm field of view.
        n_slices: axial slices; their spacing is drawn in 2.0-5.0 mm.
        n_lesions: number of lesions; ``None`` draws 1-4, ``0`` makes a normal case. Given explicitly, it leaves the
            anatomy unchanged: the same seed with ``n_lesions=0`` is the lesion-free twin (same liver, other noise).
        lesion_kinds: kinds to draw lesions from: ``"hypo"`` (-25..-70 HU vs parenchyma), ``"hyper"`` (+20..+60),
            ``"subtle"`` (10-20 HU, either sign), ``"rim"`` (core within 5 HU, 2-3 mm ring of 30-50 HU, either sign).
        orientation: ``"RAS"`` or ``"LPS"``: axis codes of the stored arrays and affine (same anatomy in world mm).

    Returns:
        a :class:`PhantomCase`: ``ct`` int16 (size, size, n_slices) in [-1024, 3071] HU, ``label`` uint8 in {0, 1, 2},
        ``affine`` float64 4x4, liver parenchyma mean drawn in 60-110 HU, noise std drawn in 8-15 HU.
    """
    if size < 32 or n_slices < 4:
        raise ValueError(f"phantom needs size >= 32 and n_slices >= 4, got size={size}, n_slices={n_slices}.")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}.")
    if n_lesions is not None and n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0 or None, got {n_lesions}.")
    kinds = tuple(lesion_kinds)
    if not kinds or any(k not in LESION_KINDS for k in kinds):
        raise ValueError(f"lesion_kinds must be a non-empty subset of {LESION_KINDS}, got {kinds}.")

    rng = np.random.default_rng(seed)
    shape = (size, size, n_slices)
    spacing_xy = rng.uniform(0.7, 1.0) * 512.0 / size
    grid = _Grid.centred(shape, np.array([spacing_xy, spacing_xy, rng.uniform(2.0, 5.0)]))
    hu = np.full(shape, -1000.0, dtype=np.float32)

    body, cavity, spine_y, cavity_half_width = _torso(rng, grid, hu)
    # the liver spans from the right abdominal wall across the midline; its size is capped by the cavity
    liver_size = np.array([rng.uniform(150.0, 200.0), rng.uniform(120.0, 170.0), rng.uniform(130.0, 170.0)])
    liver_size[0] = min(liver_size[0], 1.7 * cavity_half_width)
    liver_center = np.array([
        0.97 * cavity_half_width - liver_size[0] / 2.0,
        spine_y + 0.5 * liver_size[1] - 15.0 + rng.uniform(-5.0, 10.0),
        rng.uniform(-15.0, 15.0),
    ])
    _organs(rng, grid, hu, body, cavity, spine_y, liver_center[2])
    keep_out = _spine_and_great_vessels(rng, grid, hu, body, cavity, spine_y)

    box, liver = _liver_mask(rng, grid, liver_center, liver_size, cavity & ~keep_out)
    sub = grid.crop(box)
    liver_mean, texture_hu = rng.uniform(60.0, 110.0), rng.uniform(2.0, 5.0)
    parenchyma = liver_mean + texture_hu * _smooth_noise(rng, liver.shape, grid.spacing, rng.uniform(5.0, 9.0))
    vessels = _liver_vessels(rng, sub, liver, liver_center, liver_size)
    vessel_delta = rng.uniform(40.0, 80.0)
    liver_hu = parenchyma + np.float32(vessel_delta) * vessels
    liver_label = liver.astype(np.uint8)
    n_lesions = int(rng.integers(1, 5)) if n_lesions is None else n_lesions
    placed = _add_lesions(rng, sub, liver_hu, liver_label, parenchyma, n_lesions, kinds) if n_lesions else []
    hu[box][liver] = liver_hu[liver]
    label = np.zeros(shape, dtype=np.uint8)
    label[box] = liver_label
    vessel_mask = np.zeros(shape, dtype=bool)
    vessel_mask[box] = vessels & (liver_label == 1)

    noise_sigma, blur = rng.uniform(8.0, 15.0), rng.uniform(0.5, 0.8)
    ct = _scan(hu, noise_sigma, blur, rng)
    affine = np.diag([*grid.spacing, 1.0])
    affine[:3, 3] = grid.origin + rng.uniform(-30.0, 30.0, 3)  # scanners rarely centre the volume on world 0

    starts = np.array([s.start for s in box])
    centers = [center + starts for _, center in placed]
    if orientation == "LPS":
        # same world points: reverse array axes x and y, negate their affine columns, move the origin to the far end
        ct, label, vessel_mask = (np.ascontiguousarray(a[::-1, ::-1]) for a in (ct, label, vessel_mask))
        affine[:3, 3] += affine[:3, :2] @ (np.array(shape[:2]) - 1.0)
        affine[:3, :2] *= -1.0
        centers = [np.array([size - 1 - c[0], size - 1 - c[1], c[2]]) for c in centers]
    lesions = []
    for (lesion, _), center in zip(placed, centers):
        lesion["center_voxel"] = [int(c) for c in center]
        lesion["center_mm"] = [round(float(c), 2) for c in nib.affines.apply_affine(affine, center)]
        lesions.append(lesion)

    params = {
        "liver_mean_hu": round(float(liver_mean), 2),
        "liver_texture_hu": round(float(texture_hu), 2),
        "vessel_delta_hu": round(float(vessel_delta), 2),
        "noise_sigma_hu": round(float(noise_sigma), 2),
        "blur_sigma_voxels": round(float(blur), 3),
        "liver_size_mm": [round(float(s), 1) for s in liver_size],
    }
    return PhantomCase(case_id, ct, label, affine, lesions, int(seed), orientation, params, vessel_mask)


def _nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes with a fixed gzip header (mtime 0), so equal arrays give byte-identical files."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a cohort: independent of the cohort size, so cohorts of one seed share a prefix."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])


def _previous_cohort_files(out: Path) -> set[str]:
    """File names of the cases listed by an earlier phantom cohort's ``phantom.json`` in ``out`` (empty if none)."""
    manifest_path = out / "phantom.json"
    if not manifest_path.is_file():
        return set()
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as error:
        fix = "delete it or choose another --out."
        raise InputDataError(manifest_path, f"unreadable phantom manifest ({error}).", fix) from error
    if not isinstance(manifest, dict) or manifest.get("generator") != "hepafair phantom":
        return set()
    return {
        Path(case[key]).name  # names only: never delete outside ``out``
        for case in manifest.get("cases", [])
        for key in ("image", "label")
        if isinstance(case, dict) and isinstance(case.get(key), str)
    }


def write_phantom_cohort(
    out_dir: str | Path,
    n_cases: int,
    seed: int = 0,
    size: int = 192,
    n_slices: int = 48,
    normal_fraction: float = 0.5,
    lesion_kinds: Sequence[str] = LESION_KINDS,
) -> list[dict]:
    """Write a phantom cohort in the LiTS layout and return the per-case records.

    Files: ``out_dir/volume-<i>.nii.gz`` (int16 HU), ``out_dir/segmentation-<i>.nii.gz`` (uint8, 0/1/2) for
    i = 0..n_cases-1, and ``out_dir/phantom.json`` (generator, seed, sizes and the case records). The first
    ``round(n_cases * normal_fraction)`` cases (half rounded up; at least one when ``n_cases >= 2``) have no lesion,
    the others 1-4. Orientation alternates RAS (even i) / LPS (odd i). Every file is written atomically and the same
    arguments give byte-identical files; case files of an earlier phantom cohort in ``out_dir`` that this one does not
    rewrite are deleted (only those its ``phantom.json`` lists).

    Returns:
        one dict per case: :meth:`PhantomCase.to_json` plus ``image``, ``label`` (file names) and ``has_lesion``.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}.")
    if not 0.0 <= normal_fraction <= 1.0:
        raise ValueError(f"normal_fraction must be in [0, 1], got {normal_fraction}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputDataError(out, "the phantom output path exists and is not a folder.", "choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_cohort_files(out)
    n_normal = min(int(np.floor(n_cases * normal_fraction + 0.5)), n_cases)
    if n_cases >= 2:
        n_normal = max(n_normal, 1)

    records = []
    for i in range(n_cases):
        case = make_phantom_case(
            case_seed(seed, i),
            case_id=f"phantom_{i:03d}",
            size=size,
            n_slices=n_slices,
            n_lesions=0 if i < n_normal else None,
            lesion_kinds=lesion_kinds,
            orientation=ORIENTATIONS[i % 2],
        )
        image_name, label_name = f"volume-{i}.nii.gz", f"segmentation-{i}.nii.gz"
        atomic_write_bytes(out / image_name, _nifti_gz_bytes(case.ct, case.affine))
        atomic_write_bytes(out / label_name, _nifti_gz_bytes(case.label, case.affine))
        record = case.to_json()
        record.update(image=image_name, label=label_name, has_lesion=bool((case.label == 2).any()))
        records.append(record)

    manifest = {"generator": "hepafair phantom", "seed": int(seed), "size": int(size), "n_slices": int(n_slices),
                "normal_fraction": float(normal_fraction), "lesion_kinds": list(lesion_kinds), "cases": records}
    atomic_write_bytes(out / "phantom.json", (json.dumps(manifest, indent=1) + "\n").encode())
    # a smaller cohort written over a larger one must not leave old cases for a LiTS-layout reader to find
    written = {name for record in records for name in (record["image"], record["label"])}
    for name in previous - written:
        (out / name).unlink(missing_ok=True)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a phantom cohort and print one line per case. Returns the exit status (0 on success)."""
    parser = argparse.ArgumentParser(
        prog="hepafair phantom",
        description="Write a synthetic abdominal CT cohort (LiTS layout) for exercising the pipeline. "
        "Synthetic data only: not a substitute for real CT.",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--size", type=int, default=192, help="in-plane voxels (default 192)")
    parser.add_argument("--slices", type=int, default=48, help="axial slices (default 48)")
    parser.add_argument("--normal-fraction", type=float, default=0.5, help="share of lesion-free cases (default 0.5)")
    parser.add_argument(
        "--lesion-kinds",
        default=",".join(LESION_KINDS),
        help="comma-separated lesion kinds to draw from: hypo (-25..-70 HU), hyper (+20..+60 HU), subtle (10-20 HU), "
        f"rim (near-iso core, 30-50 HU ring); e.g. hyper,rim for lesions darkness cannot find (default: "
        f"{','.join(LESION_KINDS)})",
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.lesion_kinds.replace(" ", "").split(",") if k]
    if not kinds or any(k not in LESION_KINDS for k in kinds):
        parser.error(f"--lesion-kinds must name some of {', '.join(LESION_KINDS)}, got {args.lesion_kinds!r}.")
    if args.cases < 1 or args.size < 32 or args.slices < 4 or not 0.0 <= args.normal_fraction <= 1.0:
        parser.error("need --cases >= 1, --size >= 32, --slices >= 4 and --normal-fraction in [0, 1].")
    try:
        records = write_phantom_cohort(
            args.out, args.cases, args.seed, args.size, args.slices, args.normal_fraction, lesion_kinds=kinds
        )
    except InputDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for record in records:
        kinds = ",".join(lesion["kind"] for lesion in record["lesions"]) or "-"
        print(f"{record['case_id']}  {record['orientation']}  lesions={len(record['lesions'])}  kinds={kinds}")
    n_lesion = sum(record["has_lesion"] for record in records)
    print(f"wrote {len(records)} cases ({len(records) - n_lesion} normal, {n_lesion} with lesions) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
