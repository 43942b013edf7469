"""Procedural anatomy of the CT phantoms (:mod:`pipeline.data.phantom`): the voxel grid, smooth random fields, and the
painters of torso, organs, spine and great vessels, the liver and its vessel trees.

Everything works in canonical RAS world millimetres centred on the volume and draws its random numbers from the
caller's generator. The order of the draws is part of the output: a case is fixed by its seed only as long as these
functions draw the same numbers in the same order, so reordering a draw changes every phantom ever generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Grid", "smooth_noise", "paint_torso", "paint_organs", "paint_spine_and_great_vessels", "liver_mask",
           "liver_vessels"]


@dataclass(frozen=True)
class Grid:
    """World coordinates (mm, canonical RAS, origin at the volume centre) of a voxel grid, as broadcastable axes."""

    x: np.ndarray  # (X, 1, 1)
    y: np.ndarray  # (1, Y, 1)
    z: np.ndarray  # (1, 1, Z)
    spacing: np.ndarray  # (3,)

    @classmethod
    def centred(cls, shape: Sequence[int], spacing: np.ndarray) -> Grid:
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

    def crop(self, box: tuple[slice, slice, slice]) -> Grid:
        """The grid of the voxels inside ``box``."""
        return Grid(self.x[box[0]], self.y[:, box[1]], self.z[:, :, box[2]], self.spacing)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, cell_mm: float) -> np.ndarray:
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


def paint_torso(rng: np.random.Generator, grid: Grid, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
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
    bowel = smooth_noise(rng, grid.shape, grid.spacing, rng.uniform(18.0, 28.0))
    _paint(hu, cavity, rng.uniform(-110.0, -80.0))
    _paint(hu, cavity & (bowel > 0.2), rng.uniform(20.0, 40.0))
    _paint(hu, cavity & (bowel > 1.8), rng.uniform(-900.0, -700.0))
    spine_y = -0.93 * half_depth + fat_mm + muscle_mm + rng.uniform(38.0, 48.0)
    return body, cavity, spine_y, half_width - fat_mm - muscle_mm


def paint_organs(
    rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: np.ndarray, cavity: np.ndarray, spine_y: float,
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


def paint_spine_and_great_vessels(
    rng: np.random.Generator, grid: Grid, hu: np.ndarray, body: np.ndarray, cavity: np.ndarray, spine_y: float
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


def liver_mask(
    rng: np.random.Generator, grid: Grid, center: np.ndarray, size: np.ndarray, allowed: np.ndarray
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
    deform = smooth_noise(rng, rho.shape, grid.spacing, 35.0)
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


def liver_vessels(
    rng: np.random.Generator, sub: Grid, liver: np.ndarray, center: np.ndarray, size: np.ndarray
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
