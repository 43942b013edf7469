"""Find CT volumes and their label maps in the common public layouts, with each dataset's label convention.

Recognised (``layout="auto"`` tries them in this order):

=============  ========================================================================  ======  ======
layout         files                                                                     liver   tumour
=============  ========================================================================  ======  ======
datalist       a MONAI datalist JSON: ``{"training": [{"image": ..., "label": ...}]}``   preset  preset
msd            ``dataset.json`` + ``imagesTr/`` + ``labelsTr/`` (MSD Task03_Liver)      1       2
lits           ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` (any sub-folder)      1       2
btcv           ``img/imgNNNN.nii.gz`` + ``label/labelNNNN.nii.gz`` (or imagesTr/labelsTr)  6       --
ircadb         ``<case>_ct.nii.gz`` + ``<case>_label_liver1_tumor2.nii.gz``              1       2
=============  ========================================================================  ======  ======

In a datalist or an MSD ``dataset.json``, an ``image`` may be a folder holding a DICOM CT series (read by
:func:`pipeline.common.io.read_ct`); a datalist entry's ``series_uid`` picks one series when the folder holds several.

Label presets (``PRESETS``) also cover ``totalsegmentator`` (v2 multi-label map, liver 5, no tumour) and
``phantom`` (this project's generated cohort, LiTS layout). Every value can be overridden.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common.case_ids import case_id_from_name, check_case_id
from transforms.errors import InputDataError


@dataclass(frozen=True)
class LabelPreset:
    """Which label values mean liver and liver tumour in a dataset's label maps."""

    liver_values: tuple[int, ...]
    lesion_values: tuple[int, ...] = ()


PRESETS: dict[str, LabelPreset] = {
    "lits": LabelPreset((1,), (2,)),
    "msd": LabelPreset((1,), (2,)),
    "ircadb": LabelPreset((1,), (2,)),
    "phantom": LabelPreset((1,), (2,)),
    "btcv": LabelPreset((6,)),
    "totalsegmentator": LabelPreset((5,)),
}

LAYOUTS = ("datalist", "msd", "lits", "btcv", "ircadb")

_NII = r"\.nii(?:\.gz)?$"


# The liver mask inside a TotalSegmentator output folder (one binary NIfTI per structure).
TOTALSEGMENTATOR_LIVER_FILE = "liver.nii.gz"


@dataclass
class CaseRecord:
    """One CT volume (NIfTI file or DICOM series folder) with its label map and the label values that mean liver /
    tumour in it; ``series_uid`` picks one series of a DICOM folder that holds several."""

    case_id: str
    image: Path
    label: Path
    dataset: str
    liver_values: tuple[int, ...]
    lesion_values: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)
    series_uid: str | None = None

    def __post_init__(self) -> None:
        check_case_id(self.case_id, self.image)  # it becomes a folder / file name: never a path
        if Path(self.label).is_dir():
            self._use_totalsegmentator_folder()

    def _use_totalsegmentator_folder(self) -> None:
        """A label folder is a TotalSegmentator output (``TotalSegmentator -i CT -o FOLDER``): its ``liver.nii.gz`` is
        the binary liver mask (value 1); TotalSegmentator does not segment tumours, so no lesion values."""
        folder = Path(self.label)
        liver = folder / TOTALSEGMENTATOR_LIVER_FILE
        if not liver.is_file():
            raise InputDataError(folder, f"the label is a folder without {TOTALSEGMENTATOR_LIVER_FILE}, so it is "
                                         "neither a label map nor a TotalSegmentator output folder.",
                                 "pass a label NIfTI, or the folder `TotalSegmentator -i CT -o FOLDER` wrote.")
        self.label, self.liver_values, self.lesion_values = liver, (1,), ()
        self.extra = {**self.extra, "label_source": "totalsegmentator_folder"}

    def to_json(self) -> dict:
        source = {
            "case_id": self.case_id,
            "image": str(self.image),
            "label": str(self.label),
            "dataset": self.dataset,
            "liver_values": list(self.liver_values),
            "lesion_values": list(self.lesion_values),
        }
        if self.series_uid is not None:  # only then: manifests of NIfTI cohorts stay as they were
            source["series_uid"] = self.series_uid
        return source


def resolve_preset(
    name: str | None,
    liver_values: Sequence[int] | None = None,
    lesion_values: Sequence[int] | None = None,
    default: str = "lits",
) -> LabelPreset:
    """A preset by name (``None`` -> ``default``) with optional overrides of either value list."""
    key = (name or default).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown label preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[key]
    return LabelPreset(
        tuple(int(v) for v in liver_values) if liver_values is not None else preset.liver_values,
        tuple(int(v) for v in lesion_values) if lesion_values is not None else preset.lesion_values,
    )


def _stem(path: Path) -> str:
    """The file name without ``.nii[.gz]``, as a safe case id (other characters become ``_``)."""
    return case_id_from_name(re.sub(_NII, "", path.name))


def _niftis(folder: Path, pattern: str, recursive: bool = False) -> list[Path]:
    globber = folder.rglob if recursive else folder.glob
    return sorted(p for p in globber(pattern) if re.search(_NII, p.name) and p.is_file())


def _pair_by_number(
    images: list[Path], labels: list[Path], image_re: str, label_re: str
) -> list[tuple[str, Path, Path]]:
    by_number = {}
    for lab in labels:
        m = re.match(label_re, lab.name)
        if m:
            by_number[(lab.parent, m.group(1))] = lab
    pairs = []
    for img in images:
        m = re.match(image_re, img.name)
        if not m:
            continue
        lab = by_number.get((img.parent, m.group(1))) or next(
            (v for (_, n), v in by_number.items() if n == m.group(1)), None
        )
        if lab is not None:
            pairs.append((m.group(1), img, lab))
    return pairs


_DATALIST_KEYS = ("training", "validation", "test", "data")


def _label_values(value: Any, where: str, path: Path) -> tuple[int, ...] | None:
    """A datalist's ``liver_values``/``lesion_values``: a list of non-negative integers (or absent)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise InputDataError(path, f"{where} must be a list of non-negative integers, got {value!r}.",
                             'write e.g. "liver_values": [1] or "lesion_values": [2].')
    return tuple(value)


def _preset_name(e: dict, where: str, path: Path) -> Any:
    """``e["label_preset"]``, or its older spelling ``e["preset"]`` (read for one release); both must agree."""
    name, old = e.get("label_preset"), e.get("preset")
    if name is not None and old is not None and name != old:
        raise InputDataError(path, f"{where}: 'label_preset' {name!r} and 'preset' {old!r} disagree.",
                             "keep 'label_preset' only ('preset' is its deprecated spelling).")
    return name if name is not None else old


def _datalist_entry(e: Any, k: int, spec: dict, path: Path, preset: LabelPreset, preset_name: str) -> CaseRecord:
    """One validated datalist entry (number ``k``) as a record; every error names the entry and the field."""
    where = f"entry {k}"
    if not isinstance(e, dict):
        raise InputDataError(path, f"{where} is a {type(e).__name__}, not an object.",
                             'each entry is {"image": "ct.nii.gz", "label": "seg.nii.gz"}.')
    for key in ("image", "label"):
        if key not in e:
            raise InputDataError(path, f"{where} has no {key!r}: every entry needs both 'image' and 'label'.",
                                 "a CT and its liver label map are required for every entry.")
        if not isinstance(e.get(key), str) or not e[key].strip():
            raise InputDataError(path, f"{where}: {key!r} must be a non-empty path string, got {e.get(key)!r}.",
                                 "a CT and its liver label map are required for every entry.")
    # An entry (or the whole list) may name its own label preset or label values: one datalist can mix datasets.
    name = _preset_name(e, where, path)
    name = _preset_name(spec, "the datalist", path) if name is None else name
    if name is not None and (not isinstance(name, str) or name.lower() not in PRESETS):
        raise InputDataError(path, f"{where}: unknown label_preset {name!r}.",
                             f"known label presets: {', '.join(sorted(PRESETS))}.")
    liver = _label_values(e.get("liver_values", spec.get("liver_values")), f"{where}: liver_values", path)
    lesion = _label_values(e.get("lesion_values", spec.get("lesion_values")), f"{where}: lesion_values", path)
    item = preset if name is None and liver is None and lesion is None else resolve_preset(
        name or preset_name, liver, lesion)
    image, label = (path.parent / e["image"]).resolve(), (path.parent / e["label"]).resolve()
    series_uid = e.get("series_uid")
    if series_uid is not None and (not isinstance(series_uid, str) or not series_uid.strip()):
        raise InputDataError(path, f"{where}: 'series_uid' must be a DICOM SeriesInstanceUID string, got "
                                   f"{series_uid!r}.", 'write e.g. "series_uid": "1.2.840.113619.2.55.3.1234".')
    if "case_id" in e:
        case_id = check_case_id(e["case_id"], f"{path} ({where}: case_id)")
    else:
        case_id = _stem(image)
    return CaseRecord(case_id, image, label, "datalist", item.liver_values, item.lesion_values,
                      series_uid=series_uid and series_uid.strip())


def _discover_datalist(path: Path, preset: LabelPreset, preset_name: str) -> list[CaseRecord]:
    try:
        spec = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputDataError(path, f"cannot read the datalist JSON ({e}).", "give a valid MONAI datalist JSON.") from e
    if isinstance(spec, list):
        spec = {"training": spec}
    if not isinstance(spec, dict) or any(not isinstance(spec.get(k) or [], list) for k in _DATALIST_KEYS):
        raise InputDataError(path, "a datalist is a JSON object whose 'training' / 'validation' / 'test' / 'data' "
                             "keys hold lists of entries.", 'write {"training": [{"image": ..., "label": ...}]}.')
    entries = [e for key in _DATALIST_KEYS for e in spec.get(key) or []]
    if not entries:
        raise InputDataError(
            path,
            "the datalist has no entries with both 'image' and 'label'.",
            'write {"training": [{"image": "ct.nii.gz", "label": "seg.nii.gz"}, ...]}; a liver label map is required.',
        )
    return [_datalist_entry(e, k, spec, path, preset, preset_name) for k, e in enumerate(entries)]


def _discover_msd(root: Path, preset: LabelPreset) -> list[CaseRecord]:
    spec = json.loads((root / "dataset.json").read_bytes())
    records = []
    for e in spec.get("training", []):
        image, label = (root / e["image"]).resolve(), (root / e["label"]).resolve()
        records.append(CaseRecord(_stem(image), image, label, "msd", preset.liver_values, preset.lesion_values))
    return records


def _discover_folder(
    root: Path, want: Callable[[str], bool], pre: Callable[[str], LabelPreset]
) -> list[CaseRecord]:
    """The LiTS, BTCV or IRCADb pairs in folder ``root``, tried in that order (first layout with pairs wins).

    ``want(layout)`` says whether a layout may be tried; ``pre(layout)`` gives the label values for it.
    """
    records: list[CaseRecord] = []
    if not records and want("lits"):
        pairs = _pair_by_number(
            _niftis(root, "volume-*", True),
            _niftis(root, "segmentation-*", True),
            r"volume-(\d+)\.nii",
            r"segmentation-(\d+)\.nii",
        )
        p = pre("lits")
        records = [CaseRecord(f"volume-{n}", i, lab, "lits", p.liver_values, p.lesion_values) for n, i, lab in pairs]
    if not records and want("btcv"):
        for img_dir, lab_dir in (("img", "label"), ("imagesTr", "labelsTr")):
            if (root / img_dir).is_dir() and (root / lab_dir).is_dir():
                pairs = _pair_by_number(
                    _niftis(root / img_dir, "img*"),
                    _niftis(root / lab_dir, "label*"),
                    r"img(\d+)\.nii",
                    r"label(\d+)\.nii",
                )
                p = pre("btcv")
                records = [
                    CaseRecord(f"img{n}", i, lab, "btcv", p.liver_values, p.lesion_values) for n, i, lab in pairs
                ]
                if records:
                    break
    if not records and want("ircadb"):
        p = pre("ircadb")
        for img in _niftis(root, "*_ct.nii*", True):
            name = re.sub(_NII, "", img.name)[: -len("_ct")]
            labs = _niftis(img.parent, f"{glob.escape(name)}_label*")
            if labs:
                records.append(
                    CaseRecord(case_id_from_name(name), img, labs[0], "ircadb", p.liver_values, p.lesion_values)
                )
    return records


def discover(
    root: str | Path,
    layout: str = "auto",
    label_preset: str | None = None,
    liver_values: Sequence[int] | None = None,
    lesion_values: Sequence[int] | None = None,
) -> list[CaseRecord]:
    """Every (CT, label) pair under ``root`` in one of the recognised layouts, sorted by case id.

    Args:
        root: a dataset folder, or a datalist JSON file.
        layout: one of ``LAYOUTS`` or ``"auto"``.
        label_preset: label preset name (defaults to the layout's own); ``liver_values``/``lesion_values``
            override it.

    Raises:
        InputDataError: the folder is missing, matches no layout, or two cases share an id.
    """
    from pipeline.common.case_ids import read_case_ids_unique

    root = Path(root)
    if not root.exists():
        raise InputDataError(root, "no such file or folder.", "check the --data path.")
    layout = layout.lower()
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")

    def want(name: str) -> bool:
        return layout in ("auto", name)

    def pre(default: str) -> LabelPreset:
        return resolve_preset(label_preset, liver_values, lesion_values, default=default)

    records: list[CaseRecord] = []
    if root.is_file():
        if not want("datalist") or root.suffix.lower() != ".json":
            raise InputDataError(
                root,
                "a file was given but it is not a datalist .json.",
                "give a dataset folder or a MONAI datalist JSON.",
            )
        if root.name == "dataset.json" and (root.parent / "imagesTr").is_dir():
            records = _discover_msd(root.parent, pre("msd"))
        else:
            records = _discover_datalist(root, pre("lits"), label_preset or "lits")
    elif want("msd") and (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        records = _discover_msd(root, pre("msd"))
    if not records:
        records = _discover_folder(root, want, pre)
    if not records:
        raise InputDataError(
            root,
            f"no CT/label pairs found (layout {layout!r}).",
            "expected one of: a MONAI datalist .json; MSD (dataset.json, imagesTr/, labelsTr/); "
            "LiTS (volume-N.nii.gz + segmentation-N.nii.gz); "
            "BTCV (img/imgNNNN.nii.gz + label/labelNNNN.nii.gz, or imagesTr/labelsTr); "
            "IRCADb (<case>_ct.nii.gz + <case>_label*.nii.gz).",
        )
    records.sort(key=lambda r: r.case_id)
    read_case_ids_unique([r.case_id for r in records], [r.image for r in records])
    return records
