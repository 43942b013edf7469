"""The manifest of a prepared folder: case-level splits, the slice entries of each split (a MONAI datalist), and
reading / writing / summarising ``manifest.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.common.files import atomic_write_json
from pipeline.data.settings import PrepareSettings, SplitSettings
from transforms.errors import InputDataError
from transforms.slicing import eligible_slices

__all__ = ["MANIFEST_FORMAT", "SPLITS", "assign_splits", "build_manifest", "load_manifest", "slice_entries",
           "summarize", "write_manifest"]

MANIFEST_FORMAT = "hepafair-manifest/1"
SPLITS = ("training", "validation", "test")


def assign_splits(cases: Sequence[dict], split: SplitSettings) -> dict[str, str]:
    """Case id -> split. Normal cases train; cases with lesions go to validation/test, shuffled with ``seed``.

    Explicit ``train_cases``/``val_cases``/``test_cases`` win. ``normal_from_abnormal`` abnormal cases contribute their
    lesion-free slices (``lesion_margin`` slices away from any lesion) to training and are then never evaluated on:
    a patient is in exactly one split.
    """
    explicit = {}
    for name, ids in (("training", split.train_cases), ("validation", split.val_cases), ("test", split.test_cases)):
        for case_id in ids:
            if case_id in explicit:
                raise ValueError(f"case {case_id!r} is named for both {explicit[case_id]} and {name}")
            explicit[case_id] = name
    known = {c["case_id"] for c in cases}
    unknown = sorted(set(explicit) - known)
    if unknown:
        raise ValueError(f"split options name unknown cases: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = dict(explicit)
    abnormal = []
    for c in sorted(cases, key=lambda c: c["case_id"]):
        if c["case_id"] in out:
            continue
        if c["has_lesion"]:
            abnormal.append(c["case_id"])
        else:
            out[c["case_id"]] = "training"
    order = np.random.default_rng(split.seed).permutation(len(abnormal))
    abnormal = [abnormal[i] for i in order]
    n_train = min(split.normal_from_abnormal, len(abnormal))
    rest = abnormal[n_train:]
    n_val = min(len(rest), max(1, round(split.val_fraction * len(rest)))) if rest else 0
    for i, case_id in enumerate(abnormal):
        out[case_id] = "training" if i < n_train else ("validation" if i < n_train + n_val else "test")
    return out


def slice_entries(info: dict, split_name: str, min_liver_area: int, lesion_margin: int) -> list[dict]:
    """Manifest entries of one case: its stored slices with at least ``min_liver_area`` liver voxels; training keeps
    only normal ones away from lesions."""
    if split_name == "training":
        keep = set(
            eligible_slices(
                np.asarray(info["liver_voxels"]),
                np.asarray(info["lesion_voxels"]),
                min_liver_area,
                exclude_lesion=True,
                lesion_margin=lesion_margin,
            ).tolist()
        )
    else:
        keep = {s["slice_index"] for s in info["slices"] if s["liver_area"] >= min_liver_area}
    entries = []
    for s in info["slices"]:
        z = s["slice_index"]
        if z not in keep:
            continue
        folder = f"cases/{info['case_id']}"
        entries.append(
            {
                "image": f"{folder}/s{z:04d}_image.npy",
                "label": f"{folder}/s{z:04d}_label.npy",
                "case_id": info["case_id"],
                **s,
            }
        )
    return entries


def build_manifest(
    infos: Sequence[dict], failures: Sequence[dict], settings: PrepareSettings, split: SplitSettings
) -> dict:
    """The manifest: settings, case table, per-split slice lists (MONAI datalist keys) and failures."""
    assignment = assign_splits(infos, split)
    manifest = {
        "format": MANIFEST_FORMAT,
        "settings": settings.to_json(),
        "split_settings": {
            "val_fraction": split.val_fraction,
            "seed": split.seed,
            "normal_from_abnormal": split.normal_from_abnormal,
            "lesion_margin": split.lesion_margin,
        },
        "splits": {name: sorted(c for c, s in assignment.items() if s == name) for name in SPLITS},
        "cases": [],
        "failures": list(failures),
    }
    for name in SPLITS:
        manifest[name] = []
    for info in sorted(infos, key=lambda i: i["case_id"]):
        name = assignment[info["case_id"]]
        entries = slice_entries(info, name, settings.min_liver_area, split.lesion_margin)
        manifest[name].extend(entries)
        manifest["cases"].append(
            {
                "case_id": info["case_id"],
                "split": name,
                "dataset": info["source"]["dataset"],
                "image": info["source"]["image"],
                "label": info["source"]["label"],
                "has_lesion": info["has_lesion"],
                "liver_slices": len(info["slices"]),
                "lesion_slices": sum(s["has_lesion"] for s in info["slices"]),
                "slices_in_split": len(entries),
            }
        )
    return manifest


def write_manifest(out: Path, infos: Sequence[dict], failures: Sequence[dict], settings: PrepareSettings,
                   split: SplitSettings) -> dict:
    """Build the manifest of ``infos`` (the cases' ``case.json``) and write it to ``out/manifest.json``."""
    failed = {f["case_id"] for f in failures}
    if failed:  # a failed case named for a split must not cost the manifest of the good ones
        split = replace(
            split,
            train_cases=[c for c in split.train_cases if c not in failed],
            val_cases=[c for c in split.val_cases if c not in failed],
            test_cases=[c for c in split.test_cases if c not in failed],
        )
    manifest = build_manifest(infos, failures, settings, split)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def load_manifest(path: str | Path) -> dict:
    """Read a manifest (file or the folder holding ``manifest.json``) and make its slice paths absolute."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(
            path, f"cannot read the manifest ({exc}).", "run `python -m pipeline prepare` first."
        ) from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InputDataError(path, f"not a hepafair manifest (format {manifest.get('format')!r}).")
    root = path.parent
    for name in SPLITS:
        for entry in manifest.get(name, []):
            for key in ("image", "label"):
                entry[key] = str(root / entry[key])
    manifest["root"] = str(root)
    return manifest


def summarize(manifest: dict) -> str:
    """A short human-readable summary of a manifest."""
    lines = []
    for name in SPLITS:
        entries = manifest.get(name, [])
        cases = manifest["splits"][name]
        lesion = sum(e["has_lesion"] for e in entries)
        lines.append(f"{name:>10}: {len(cases):3d} cases, {len(entries):5d} slices ({lesion} with lesion)")
    for f in manifest.get("failures", []):
        lines.append(f"    FAILED {f['case_id']}: {f['error']}")
    return "\n".join(lines)
