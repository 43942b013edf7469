"""Safety of `prepare`: nothing a datalist says can write, rename or delete outside the output folder, and malformed
datalists get one clear error naming the entry and the field (issue: safety, items 1 and 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.common.case_ids import case_id_from_name, check_case_id
from pipeline.common.files import inside_folder
from pipeline.common.io import save_nifti
from pipeline.data.datasets import discover
from pipeline.data.phantom import make_phantom_case
from pipeline.data.prepare import write_case
from transforms.errors import InputDataError


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> dict[str, Path]:
    """One small phantom CT with its label map (liver 1, lesion 2)."""
    folder = tmp_path_factory.mktemp("raw")
    phantom = make_phantom_case(0, size=64, n_slices=8)
    return {
        "image": save_nifti(folder / "ct.nii.gz", phantom.ct, phantom.affine),
        "label": save_nifti(folder / "seg.nii.gz", phantom.label, phantom.affine),
    }


def victim(tmp_path: Path) -> Path:
    """A folder outside the output folder that must survive everything below."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


# (case_id as written in the datalist, what the error says); {victim} is replaced by the victim folder's path
ESCAPING_CASE_IDS = [
    ("{victim}", "cannot be used as a file name"),
    ("../../victim", "cannot be used as a file name"),
    ("../victim", "cannot be used as a file name"),
    ("..", "cannot be used as a file name"),
    (".", "cannot be used as a file name"),
    ("", "cannot be used as a file name"),
    ("a/b", "cannot be used as a file name"),
    ("a\\b", "cannot be used as a file name"),
    (".hidden", "cannot be used as a file name"),
    ("case\x00x", "cannot be used as a file name"),
    ("case\nid", "cannot be used as a file name"),
    ("x" * 129, "characters long"),
    (5, "is a int, not a string"),
]


@pytest.mark.parametrize("case_id, message", ESCAPING_CASE_IDS)
def test_datalist_case_id_cannot_escape_the_output_folder(case_id, message, case_files, tmp_path, capsys):
    target = victim(tmp_path)
    out = tmp_path / "deep" / "er" / "prepared"
    entry = {"image": str(case_files["image"]), "label": str(case_files["label"]), "case_id": case_id}
    if isinstance(case_id, str):
        entry["case_id"] = case_id.replace("{victim}", str(target))
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [entry]}))
    code = cli_main(["prepare", "--data", str(datalist), "--out", str(out), "--size", "32"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and str(datalist) in err and "entry 0: case_id" in err, err
    assert (target / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.json", "victim"], "nothing was written anywhere"


# (entry fields over a valid entry, what the error names)
BAD_DATALIST_FIELDS = [
    ({"image": 5}, "entry 0: 'image' must be a non-empty path string"),
    ({"label": None}, "entry 0: 'label' must be a non-empty path string"),
    ({"label": ""}, "entry 0: 'label' must be a non-empty path string"),
    ({"liver_values": 1}, "entry 0: liver_values must be a list of non-negative integers, got 1"),
    ({"liver_values": "15"}, "entry 0: liver_values must be a list of non-negative integers, got '15'"),
    ({"lesion_values": [2.5]}, "entry 0: lesion_values must be a list"),
    ({"lesion_values": [True]}, "entry 0: lesion_values must be a list"),
    ({"liver_values": [-1]}, "entry 0: liver_values must be a list"),
    ({"label_preset": "nosuch"}, "entry 0: unknown label_preset 'nosuch'"),
    ({"preset": "nosuch"}, "entry 0: unknown label_preset 'nosuch'"),  # the deprecated spelling
    ({"label_preset": 3}, "entry 0: unknown label_preset 3"),
    ({"label_preset": "lits", "preset": "btcv"}, "entry 0: 'label_preset' 'lits' and 'preset' 'btcv' disagree"),
]


@pytest.mark.parametrize("fields, message", BAD_DATALIST_FIELDS)
def test_datalist_fields_of_the_wrong_type_are_named(fields, message, case_files, tmp_path):
    entry = {"image": str(case_files["image"]), "label": str(case_files["label"]), **fields}
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [entry]}))
    with pytest.raises(InputDataError) as info:
        discover(datalist)
    assert message in str(info.value) and str(datalist) in str(info.value)


@pytest.mark.parametrize("document", ['{"training": 5}', '"text"', '{"training": [3]}', "[1, 2]"])
def test_datalist_of_the_wrong_shape_is_a_clear_error(document, tmp_path):
    datalist = tmp_path / "list.json"
    datalist.write_text(document)
    with pytest.raises(InputDataError) as info:
        discover(datalist)
    assert str(datalist) in str(info.value)


def test_valid_datalist_values_still_work(case_files, tmp_path):
    entry = {"image": str(case_files["image"]), "label": str(case_files["label"]), "case_id": "patient_01.a+b",
             "label_preset": "btcv", "liver_values": [1], "lesion_values": [2]}
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([entry]))
    (record,) = discover(datalist)
    assert record.case_id == "patient_01.a+b"
    assert record.liver_values == (1,) and record.lesion_values == (2,)


def test_file_stems_are_mapped_to_safe_case_ids(case_files, tmp_path):
    folder = tmp_path / "odd names"
    folder.mkdir()
    name = "..weird name;$(x)"
    (folder / f"{name}_ct.nii.gz").write_bytes(case_files["image"].read_bytes())
    (folder / f"{name}_label.nii.gz").write_bytes(case_files["label"].read_bytes())
    (record,) = discover(folder, layout="ircadb")
    assert record.case_id == "weird_name_x_" and check_case_id(record.case_id) == record.case_id
    assert case_id_from_name("volume-12") == "volume-12" and case_id_from_name("...") == "case"


def test_write_case_never_touches_anything_outside_its_folder(tmp_path):
    target = victim(tmp_path)
    cases = tmp_path / "out" / "cases"
    cases.mkdir(parents=True)
    for case_id in (str(target), "../../victim", ".."):
        with pytest.raises(InputDataError):
            write_case(cases, case_id, [], {})
    assert (target / "precious.txt").read_text() == "keep me"
    info = write_case(cases, "ok", [({"slice_index": 0}, np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))], {})
    assert info["slices"] == [{"slice_index": 0}] and (cases / "ok" / "case.json").is_file()


def test_inside_folder_follows_links(tmp_path):
    target = victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(target)
    with pytest.raises(InputDataError, match="outside the output folder"):
        inside_folder(out, out / "link" / "precious.txt")
    with pytest.raises(InputDataError):
        inside_folder(out, out)
    assert inside_folder(out, out / "a" / "b") == out / "a" / "b"
