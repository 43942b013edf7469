"""Raw CT volumes -> cached liver slices + a manifest with case-level splits (nnU-Net style: resumable, atomic).

Output folder::

    OUT/manifest.json                 MONAI-datalist-compatible: "training" / "validation" / "test" slice lists
    OUT/cases/<case_id>/case.json     written last: a case folder exists only when complete
    OUT/cases/<case_id>/sNNNN_image.npy   (1, S, S) float32 in [0, 1], 0 outside the liver
    OUT/cases/<case_id>/sNNNN_label.npy   (1, S, S) uint8: 0 background, 1 liver, 2 lesion

Each case is built in a hidden temporary folder and renamed into place, so a killed run leaves no half-written case;
re-running skips finished cases whose settings match and rebuilds the rest. Slice indices count along the
superior axis after orientation to RAS.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Compose, Orientationd

from pipeline.common.case_ids import check_case_id
from pipeline.common.files import atomic_write_json, ensure_output_dir, inside_folder
from pipeline.common.io import load_case
from pipeline.common.parallel import map_cases
from pipeline.data.datasets import CaseRecord
from transforms.errors import InputDataError
from transforms.intensity import DEFAULT_HU_WINDOW, HUWindowd, ShiftLiverMedianHUd
from transforms.roi import LiverROId
from transforms.slicing import AxialSlicesd, eligible_slices

MANIFEST_FORMAT = "hepafair-manifest/1"
SHARD_FORMAT, SHARD_NAME = "hepafair-prepare-shard/1", "shard.json"
SPLITS = ("training", "validation", "test")


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that changes the cached slices; a case is rebuilt when any of it changes."""

    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    field_mm: float = 300.0
    size: int = 256
    min_liver_area: int = 1
    mask_outside: bool = True
    orientation: str = "RAS"
    # None: HU as scanned; a number: each volume shifted so that its liver median HU is this (ShiftLiverMedianHU)
    liver_reference_hu: float | None = None

    def __post_init__(self) -> None:
        """Refuse settings that cannot describe a preparation (they come from flags and from inference.json)."""
        problems = []
        window = self.hu_window
        if (not isinstance(window, (tuple, list)) or len(window) != 2 or not all(is_finite_number(v) for v in window)
                or not float(window[0]) < float(window[1])):
            problems.append(f"hu_window must be two finite numbers MIN < MAX, got {window!r}")
        if not is_finite_number(self.field_mm) or not self.field_mm > 0:
            problems.append(f"field_mm must be a positive number of mm, got {self.field_mm!r}")
        if not _is_integer(self.size) or not MIN_SIZE <= self.size <= MAX_SIZE:
            problems.append(f"size must be an integer number of pixels in [{MIN_SIZE}, {MAX_SIZE}], got {self.size!r}")
        if not _is_integer(self.min_liver_area) or self.min_liver_area < 0:
            problems.append(f"min_liver_area must be a non-negative integer, got {self.min_liver_area!r}")
        if not isinstance(self.mask_outside, (bool, np.bool_)):
            problems.append(f"mask_outside must be true or false, got {self.mask_outside!r}")
        if not isinstance(self.orientation, str) or not _is_axcodes(self.orientation):
            problems.append(f"orientation must be three axis codes such as RAS or LPS, got {self.orientation!r}")
        if self.liver_reference_hu is not None and (not is_finite_number(self.liver_reference_hu)
                                                    or not -1000 <= self.liver_reference_hu <= 3000):
            problems.append(f"liver_reference_hu must be null or a number of HU, got {self.liver_reference_hu!r}")
        if problems:
            raise ValueError("; ".join(problems) + ".")
        object.__setattr__(self, "hu_window", (float(window[0]), float(window[1])))  # frozen: as a tuple of floats

    def to_json(self) -> dict:
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        if self.liver_reference_hu is None:
            del d["liver_reference_hu"]  # folders prepared before the option existed stay current
        return d


MIN_SIZE, MAX_SIZE = 1, 2048


def prepare_settings_from_json(settings: Mapping[str, Any] | None) -> PrepareSettings:
    """:class:`PrepareSettings` from its JSON form (``None`` or ``{}``: the defaults).

    Raises:
        ValueError: not an object, or values :class:`PrepareSettings` refuses.
    """
    if not settings:
        return PrepareSettings()
    if not isinstance(settings, Mapping):
        raise ValueError(f"expected an object, got {settings!r}")
    known = {k: v for k, v in settings.items() if k in PrepareSettings.__dataclass_fields__}
    if isinstance(known.get("hu_window"), list):
        known["hu_window"] = tuple(known["hu_window"])
    return PrepareSettings(**known)


def is_finite_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool, not NaN or infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_axcodes(text: str) -> bool:
    """Three letters, one of each pair L/R, A/P, S/I (nibabel's axis codes)."""
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    return len(text) == 3 and all(sum(c in pair for c in text.upper()) == 1 for pair in pairs)


@dataclass
class SplitSettings:
    """How cases are split; always by case, never by slice."""

    val_fraction: float = 0.5
    seed: int = 0
    val_cases: Sequence[str] = ()
    test_cases: Sequence[str] = ()
    train_cases: Sequence[str] = ()
    normal_from_abnormal: int = 0
    lesion_margin: int = 2
    extra: dict = field(default_factory=dict)


def volume_transform(settings: PrepareSettings, liver_values: Sequence[int], lesion_values: Sequence[int]) -> Compose:
    """The volume-level preprocessing shared by ``prepare`` and inference.

    In: ``{"image": (1, X, Y, Z) HU, "label": (1, X, Y, Z) dataset label values}`` as
    :func:`pipeline.common.io.load_case`
    returns. Out: the :class:`~transforms.roi.LiverROId` keys on the (1, S, S, Z) ROI grid.
    """
    normalise = []
    if settings.liver_reference_hu is not None:
        normalise = [ShiftLiverMedianHUd("image", "label", settings.liver_reference_hu, liver_values, lesion_values)]
    return Compose(
        [
            Orientationd(keys=["image", "label"], axcodes=settings.orientation, labels=None),
            *normalise,
            HUWindowd("image", *settings.hu_window),
            LiverROId(
                "image",
                label_key="label",
                liver_values=liver_values,
                lesion_values=lesion_values,
                field_mm=settings.field_mm,
                size=settings.size,
                mask_outside=settings.mask_outside,
            ),
        ]
    )


def _case_is_current(case_dir: Path, record: CaseRecord, settings: PrepareSettings) -> dict | None:
    try:
        info = json.loads((case_dir / "case.json").read_bytes())
    except (OSError, json.JSONDecodeError):
        return None
    same_source = info.get("source") == record.to_json()
    return info if same_source and info.get("settings") == settings.to_json() else None


def prepare_case(record: CaseRecord, settings: PrepareSettings, cases_dir: Path) -> dict:
    """Preprocess one volume into ``cases_dir/<case_id>/`` atomically; return its ``case.json`` content."""
    final = cases_dir / record.case_id
    current = _case_is_current(final, record, settings)
    if current is not None:
        return current
    data = load_case(record.image, record.label, record.liver_values, record.lesion_values, record.series_uid)
    series_uid = data["image"].meta.get("series_uid")
    data["case_id"] = record.case_id
    vol = volume_transform(settings, record.liver_values, record.lesion_values)(data)
    items = AxialSlicesd(keys=("image", "label"), min_liver_area=settings.min_liver_area)(vol)

    info = {
        "case_id": record.case_id,
        "source": record.to_json(),
        "settings": settings.to_json(),
        "roi": vol["roi"],
        "n_volume_slices": int(vol["image"].shape[-1]),
        "liver_voxels": [int(v) for v in vol["liver_voxels"]],
        "lesion_voxels": [int(v) for v in vol["lesion_voxels"]],
        "has_lesion": bool(np.asarray(vol["lesion_voxels"]).sum() > 0),
    }
    if series_uid is not None:
        info["series_uid"] = series_uid
    if "liver_median_shift_hu" in vol:
        info["liver_median_shift_hu"] = round(float(vol["liver_median_shift_hu"]), 2)
    fields = ("slice_index", "liver_area", "lesion_area", "has_lesion")
    slices = (({k: it[k] for k in fields}, it["image"].numpy(), it["label"].numpy()) for it in items)
    return write_case(cases_dir, record.case_id, slices, info)


def write_case(
    cases_dir: Path, case_id: str, slices: Iterable[tuple[dict, np.ndarray, np.ndarray]], info: dict
) -> dict:
    """Write one case folder atomically and return its ``case.json`` content (``info`` + the ``slices`` table).

    ``slices`` yields ``(fields, image, label)``: ``fields`` holds at least ``slice_index``; image (1, S, S) is saved
    as float32, label (1, S, S) as uint8. Everything goes into a hidden temporary folder, ``case.json`` last; the
    folder is then renamed into place (a stale one moved aside first), so a case folder exists only when complete.
    """
    check_case_id(case_id)
    # a case id is one safe name (datasets.CaseRecord checks it); these keep every rename/removal below inside
    final = inside_folder(cases_dir, cases_dir / case_id)
    tmp = inside_folder(cases_dir, cases_dir / f".{case_id}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = []
    try:
        for fields, image, label in slices:
            z = fields["slice_index"]
            np.save(tmp / f"s{z:04d}_image.npy", np.asarray(image, dtype=np.float32))
            np.save(tmp / f"s{z:04d}_label.npy", np.asarray(label, dtype=np.uint8))
            table.append(dict(fields))
        info = {**info, "slices": table}
        atomic_write_json(tmp / "case.json", info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_case_folder(cases_dir, tmp, final)
    return info


def replace_case_folder(cases_dir: Path, tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final`` (both in ``cases_dir``), a stale ``final`` moved aside first
    and removed after, so that ``final`` is never half-written."""
    old = inside_folder(cases_dir, cases_dir / f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


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
    """Manifest entries of one case; training keeps only normal slices away from lesions."""
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
        keep = None
    entries = []
    for s in info["slices"]:
        z = s["slice_index"]
        if keep is not None and z not in keep:
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


def prepare(
    records: Sequence[CaseRecord],
    out_dir: str | Path,
    settings: PrepareSettings = PrepareSettings(),
    split: SplitSettings = SplitSettings(),
    strict: bool = False,
    progress: bool = True,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Preprocess ``records`` into ``out_dir`` and write ``out_dir/manifest.json``; return the manifest.

    A case that fails (bad input) is recorded under ``"failures"`` and the others go on, unless ``strict``,
    which re-raises the first error. Callers decide the exit status from ``manifest["failures"]``.

    Args:
        workers: cases prepared at once, in a process pool (:func:`pipeline.common.parallel.map_cases`); the case
            folders and the manifest are byte-identical for any number.
        shard: ``(I, N)``: ``records`` is shard I of N of a cohort (:func:`pipeline.data.shards.select_shard`); the
            folder then gets ``shard.json`` instead of a manifest (splits need every case:
            :func:`merge_shards` builds the manifest).
    """
    out = ensure_output_dir(out_dir)
    cases_dir = ensure_output_dir(out / "cases")
    # Left by a killed run: a case being built or swapped out, a manifest being written.
    for stale in (*cases_dir.glob(".*.tmp-*"), *cases_dir.glob(".*.old-*"), *out.glob(".tmp-*-manifest.json")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="prepare", unit="volume", file=sys.stderr)

    def done(k: int, info: dict | None, error: BaseException | None) -> None:
        if bar is not None:
            bar.set_postfix_str(records[k].case_id)
            bar.update()

    try:
        results = map_cases(partial(prepare_case, settings=settings, cases_dir=cases_dir), records, workers,
                            strict=strict, on_done=done)
    finally:
        if bar is not None:
            bar.close()
    infos = [info for info, error in results if error is None]
    failures = [{"case_id": r.case_id, "image": str(r.image), "label": str(r.label), "error": str(error)}
                for r, (_, error) in zip(records, results) if error is not None]
    if shard is not None:
        document = {"format": SHARD_FORMAT, "shard": list(shard), "settings": settings.to_json(),
                    "cases": sorted(i["case_id"] for i in infos), "failures": failures}
        atomic_write_json(out / SHARD_NAME, document)
        return document
    return write_manifest(out, infos, failures, settings, split)


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
