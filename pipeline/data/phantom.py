"""Procedural abdominal CT phantoms with liver and lesion labels.

This is synthetic data for exercising the pipeline (the demo, the tests, the benchmarks) on a machine without real
scans. It is NOT a substitute for real CT: the anatomy is a handful of deformed ellipsoids and tubes, the noise is
Gaussian, and no conclusion about detection performance on patients can be drawn from it.

A case is built in a canonical RAS array (axis 0 towards the patient's Right, 1 Anterior, 2 Superior; world millimetres
centred on the volume) and then, for LPS cases, the first two array axes and the affine are flipped together, so both
orientations hold the same anatomy at the same world coordinates. Every random number comes from
``np.random.default_rng(seed)``, so a seed fixes a case exactly.

Labels follow LiTS: 0 background, 1 liver (vessels included), 2 lesion (always inside the liver).

This module assembles a case and writes cohorts; the anatomy is drawn by :mod:`pipeline.data.phantom_anatomy`, the
lesions and the scanner (blur, noise) by :mod:`pipeline.data.phantom_lesions`.
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

from pipeline.common.files import atomic_write_bytes
from pipeline.data.phantom_anatomy import (
    Grid,
    liver_mask,
    liver_vessels,
    paint_organs,
    paint_spine_and_great_vessels,
    paint_torso,
    smooth_noise,
)
from pipeline.data.phantom_lesions import LESION_DIAMETER_MM, add_lesions, simulate_scan
from transforms.errors import InputDataError

__all__ = ["LESION_KINDS", "PhantomCase", "case_seed", "make_phantom_case", "write_phantom_cohort", "main"]

LESION_KINDS = ("hypo", "hyper", "subtle", "rim")
ORIENTATIONS = ("RAS", "LPS")


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


def _checked_arguments(
    size: int, n_slices: int, n_lesions: int | None, lesion_kinds: Sequence[str], orientation: str,
    lesion_diameter_mm: tuple[float, float], perfusion_hu: float,
) -> tuple[str, ...]:
    """The lesion kinds as a tuple, after checking :func:`make_phantom_case`'s arguments (``ValueError`` if wrong)."""
    if size < 32 or n_slices < 4:
        raise ValueError(f"phantom needs size >= 32 and n_slices >= 4, got size={size}, n_slices={n_slices}.")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}.")
    if n_lesions is not None and n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0 or None, got {n_lesions}.")
    kinds = tuple(lesion_kinds)
    if not kinds or any(k not in LESION_KINDS for k in kinds):
        raise ValueError(f"lesion_kinds must be a non-empty subset of {LESION_KINDS}, got {kinds}.")
    low, high = (float(d) for d in lesion_diameter_mm)
    if not 0.0 < low <= high:
        raise ValueError(f"lesion_diameter_mm must be (min, max) with 0 < min <= max, got {tuple(lesion_diameter_mm)}.")
    if not 0.0 <= perfusion_hu <= 100.0:
        raise ValueError(f"perfusion_hu must be in [0, 100] HU, got {perfusion_hu}.")
    return kinds


def _paint_liver(
    rng: np.random.Generator, grid: Grid, hu: np.ndarray, center: np.ndarray, size: np.ndarray, allowed: np.ndarray,
    n_lesions: int | None, kinds: Sequence[str], lesion_diameter_mm: tuple[float, float], perfusion_hu: float,
) -> tuple[np.ndarray, np.ndarray, list[tuple[dict, np.ndarray]], dict]:
    """Paint the liver into ``hu``: textured parenchyma, brighter vessels and ``n_lesions`` lesions (``None``: 1-4).

    ``perfusion_hu`` > 0 adds a smooth enhancement variation of that standard deviation (correlation 40-70 mm) to the
    whole liver, lesions and vessels included, as uneven perfusion or beam hardening gives on real CT: lesions keep
    their contrast to the parenchyma around them. Its draws come after the lesions', so liver, vessels and lesions
    are those of the same seed without it (the scanner noise drawn afterwards differs).

    The liver only exists inside its index box, so everything is drawn there and pasted into the volume at the end.

    Returns:
        the volume's label map (0/1/2) and liver vessel mask, (lesion record, centre index in the volume) per lesion,
        and the drawn liver parameters ``liver_mean_hu``, ``liver_texture_hu``, ``vessel_delta_hu`` (rounded).
    """
    box, liver = liver_mask(rng, grid, center, size, allowed)
    sub = grid.crop(box)
    liver_mean, texture_hu = rng.uniform(60.0, 110.0), rng.uniform(2.0, 5.0)
    parenchyma = liver_mean + texture_hu * smooth_noise(rng, liver.shape, grid.spacing, rng.uniform(5.0, 9.0))
    vessels = liver_vessels(rng, sub, liver, center, size)
    vessel_delta = rng.uniform(40.0, 80.0)
    liver_hu = parenchyma + np.float32(vessel_delta) * vessels
    liver_label = liver.astype(np.uint8)
    n_lesions = int(rng.integers(1, 5)) if n_lesions is None else n_lesions
    placed = (
        add_lesions(rng, sub, liver_hu, liver_label, parenchyma, n_lesions, kinds, lesion_diameter_mm)
        if n_lesions else []
    )
    if perfusion_hu > 0:
        liver_hu += np.float32(perfusion_hu) * smooth_noise(rng, liver.shape, grid.spacing, rng.uniform(40.0, 70.0))
    hu[box][liver] = liver_hu[liver]
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[box] = liver_label
    vessel_mask = np.zeros(hu.shape, dtype=bool)
    vessel_mask[box] = vessels & (liver_label == 1)
    starts = np.array([s.start for s in box])
    params = {
        "liver_mean_hu": round(float(liver_mean), 2),
        "liver_texture_hu": round(float(texture_hu), 2),
        "vessel_delta_hu": round(float(vessel_delta), 2),
    }
    return label, vessel_mask, [(lesion, index + starts) for lesion, index in placed], params


def make_phantom_case(
    seed: int,
    case_id: str = "phantom_000",
    size: int = 192,
    n_slices: int = 48,
    n_lesions: int | None = None,
    lesion_kinds: Sequence[str] = LESION_KINDS,
    orientation: str = "RAS",
    lesion_diameter_mm: tuple[float, float] = LESION_DIAMETER_MM,
    perfusion_hu: float = 0.0,
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
        lesion_diameter_mm: (min, max) lesion diameter, drawn log-uniformly (rim lesions from 12 mm).
        perfusion_hu: standard deviation (HU) of a smooth enhancement variation across the liver (0: none, the
            phantom of earlier releases); anatomy and lesions are those of the same seed without it.

    Returns:
        a :class:`PhantomCase`: ``ct`` int16 (size, size, n_slices) in [-1024, 3071] HU, ``label`` uint8 in {0, 1, 2},
        ``affine`` float64 4x4, liver parenchyma mean drawn in 60-110 HU, noise std drawn in 8-15 HU.
    """
    kinds = _checked_arguments(size, n_slices, n_lesions, lesion_kinds, orientation, lesion_diameter_mm, perfusion_hu)
    rng = np.random.default_rng(seed)
    shape = (size, size, n_slices)
    spacing_xy = rng.uniform(0.7, 1.0) * 512.0 / size
    grid = Grid.centred(shape, np.array([spacing_xy, spacing_xy, rng.uniform(2.0, 5.0)]))
    hu = np.full(shape, -1000.0, dtype=np.float32)

    body, cavity, spine_y, cavity_half_width = paint_torso(rng, grid, hu)
    # the liver spans from the right abdominal wall across the midline; its size is capped by the cavity
    liver_size = np.array([rng.uniform(150.0, 200.0), rng.uniform(120.0, 170.0), rng.uniform(130.0, 170.0)])
    liver_size[0] = min(liver_size[0], 1.7 * cavity_half_width)
    liver_center = np.array([
        0.97 * cavity_half_width - liver_size[0] / 2.0,
        spine_y + 0.5 * liver_size[1] - 15.0 + rng.uniform(-5.0, 10.0),
        rng.uniform(-15.0, 15.0),
    ])
    paint_organs(rng, grid, hu, body, cavity, spine_y, liver_center[2])
    keep_out = paint_spine_and_great_vessels(rng, grid, hu, body, cavity, spine_y)
    label, vessel_mask, placed, liver_params = _paint_liver(
        rng, grid, hu, liver_center, liver_size, cavity & ~keep_out, n_lesions, kinds, lesion_diameter_mm, perfusion_hu
    )

    noise_sigma, blur = rng.uniform(8.0, 15.0), rng.uniform(0.5, 0.8)
    ct = simulate_scan(hu, noise_sigma, blur, rng)
    affine = np.diag([*grid.spacing, 1.0])
    affine[:3, 3] = grid.origin + rng.uniform(-30.0, 30.0, 3)  # scanners rarely centre the volume on world 0

    centers = [center for _, center in placed]
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
        **liver_params,
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
    lesion_diameter_mm: tuple[float, float] = LESION_DIAMETER_MM,
    perfusion_hu: float = 0.0,
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
            lesion_diameter_mm=lesion_diameter_mm,
            perfusion_hu=perfusion_hu,
        )
        image_name, label_name = f"volume-{i}.nii.gz", f"segmentation-{i}.nii.gz"
        atomic_write_bytes(out / image_name, _nifti_gz_bytes(case.ct, case.affine))
        atomic_write_bytes(out / label_name, _nifti_gz_bytes(case.label, case.affine))
        record = case.to_json()
        record.update(image=image_name, label=label_name, has_lesion=bool((case.label == 2).any()))
        records.append(record)

    manifest = {"generator": "hepafair phantom", "seed": int(seed), "size": int(size), "n_slices": int(n_slices),
                "normal_fraction": float(normal_fraction), "lesion_kinds": list(lesion_kinds),
                "lesion_diameter_mm": [float(d) for d in lesion_diameter_mm], "perfusion_hu": float(perfusion_hu),
                "cases": records}
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
    parser.add_argument("--lesion-diameter-mm", nargs=2, type=float, metavar=("MIN", "MAX"), default=LESION_DIAMETER_MM,
                        help="lesion diameters, drawn log-uniformly in [MIN, MAX] mm (default: %(default)s)")
    parser.add_argument(
        "--perfusion-hu", type=float, default=0.0,
        help="standard deviation (HU) of a smooth enhancement variation across the liver, as uneven perfusion or beam "
        "hardening gives (default 0: a flat parenchyma with fine texture and vessels)",
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.lesion_kinds.replace(" ", "").split(",") if k]
    if not kinds or any(k not in LESION_KINDS for k in kinds):
        parser.error(f"--lesion-kinds must name some of {', '.join(LESION_KINDS)}, got {args.lesion_kinds!r}.")
    if args.cases < 1 or args.size < 32 or args.slices < 4 or not 0.0 <= args.normal_fraction <= 1.0:
        parser.error("need --cases >= 1, --size >= 32, --slices >= 4 and --normal-fraction in [0, 1].")
    try:
        records = write_phantom_cohort(
            args.out, args.cases, args.seed, args.size, args.slices, args.normal_fraction, lesion_kinds=kinds,
            lesion_diameter_mm=tuple(args.lesion_diameter_mm), perfusion_hu=args.perfusion_hu,
        )
    except InputDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # the generator's own argument checks (diameters, perfusion)
        parser.error(str(error))
    for record in records:
        kinds = ",".join(lesion["kind"] for lesion in record["lesions"]) or "-"
        print(f"{record['case_id']}  {record['orientation']}  lesions={len(record['lesions'])}  kinds={kinds}")
    n_lesion = sum(record["has_lesion"] for record in records)
    print(f"wrote {len(records)} cases ({len(records) - n_lesion} normal, {n_lesion} with lesions) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
