"""Where inference writes: case ids from file names, the output files of a case, and the checks that keep them
inside the output folder, off every input and off each other, before anything is written."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.common.case_ids import case_id_from_name, check_case_id
from pipeline.common.files import inside_folder
from pipeline.data.datasets import CaseRecord
from transforms.errors import InputDataError

__all__ = ["default_case_id", "output_paths", "check_outputs", "check_batch_outputs", "missing_label_error"]


def default_case_id(image_path: str | os.PathLike) -> str:
    """The image file name without ``.nii``/``.nii.gz`` and without a trailing ``_ct``, as a safe case id (other
    characters than letters, digits and ``._+-`` become ``_``)."""
    stem = re.sub(r"\.nii(\.gz)?$", "", Path(image_path).name, flags=re.IGNORECASE)
    return case_id_from_name(re.sub(r"_ct$", "", stem, flags=re.IGNORECASE) or stem)


def output_paths(out_dir: str | os.PathLike, case_id: str, overlay: bool = False) -> dict[str, Path]:
    """Paths of the files :func:`pipeline.infer.volume.infer_volume` writes: ``anomaly``, ``lesions``, ``report``
    [and ``overlay``].

    Raises:
        InputDataError: ``case_id`` is not one safe name (:func:`~pipeline.common.case_ids.check_case_id`).
    """
    out = Path(out_dir)
    check_case_id(case_id, out)
    paths = {
        "anomaly": out / f"{case_id}_anomaly.nii.gz",
        "lesions": out / f"{case_id}_lesions.nii.gz",
        "report": out / f"{case_id}_report.json",
    }
    if overlay:
        paths["overlay"] = out / f"{case_id}_overlay.png"
    return paths


def check_outputs(paths: Mapping[str, Path], inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse outputs outside the output folder or that are an input (always), or that already exist (unless
    ``overwrite``), before any work."""
    input_files = {p.resolve() for p in inputs}
    for path in paths.values():
        inside_folder(path.parent, path)
        if path.resolve() in input_files:
            raise InputDataError(path, "an output of this case would replace one of its input files.",
                                 "choose another --out folder or give the case another id.")
        if path.exists() and not overwrite:
            raise InputDataError(path, "output file already exists.", "--overwrite to replace it, or another --out.")


def check_batch_outputs(records: Sequence[CaseRecord], out: Path, overlay: bool) -> None:
    """Refuse a batch, before anything is written, whose planned outputs collide with each other or with any case's
    input (with ``--overwrite``, case x's heatmap must never replace case y's label map)."""
    inputs = {Path(p).resolve(): r.case_id for r in records for p in (r.image, r.label)}
    planned: dict[Path, str] = {}
    for record in records:
        for path in output_paths(out, record.case_id, overlay).values():
            key = path.resolve()
            if key in inputs:
                raise InputDataError(path, f"an output of case {record.case_id!r} would replace an input file of case "
                                     f"{inputs[key]!r}.", "write the outputs to a folder that holds no inputs.")
            if key in planned:
                raise InputDataError(path, f"cases {planned[key]!r} and {record.case_id!r} would write the same "
                                     "output file.", "give the cases distinct ids.")
            planned[key] = record.case_id


def missing_label_error(image_path: str | os.PathLike) -> InputDataError:
    """The error for a CT given without its liver label, saying how to give one."""
    return InputDataError(
        image_path,
        "no liver label given: inference looks for lesions inside the liver, so it needs a liver mask on the CT's "
        "grid (a lesion label is not needed).",
        "pass --label FILE with the mask's values (--liver-values 1 [--lesion-values 2], or --label-preset NAME, "
        "e.g. totalsegmentator for a TotalSegmentator v2 map where the liver is 5).",
    )
