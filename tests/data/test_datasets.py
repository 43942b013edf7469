"""Tests of dataset discovery (pipeline.data.datasets) on tiny folders laid out like the public datasets, and of
``prepare`` on each of them."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.common.io import save_nifti
from pipeline.data.datasets import PRESETS, discover, resolve_preset
from pipeline.data.phantom import make_phantom_case
from transforms.errors import InputDataError

SIZE, SLICES = 48, 8
# BTCV's 13 organs: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta,
# 9 IVC, 10 portal/splenic vein, 11 pancreas, 12 right adrenal, 13 left adrenal
BTCV_OTHER_ORGANS = (1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13)


def write_case(image: Path, label: Path, seed: int, n_lesions: int | None = None, btcv: bool = False) -> np.ndarray:
    """Write a tiny phantom CT and its label map (LiTS values, or BTCV's when ``btcv``); return the label written."""
    case = make_phantom_case(seed, size=SIZE, n_slices=SLICES, n_lesions=0 if btcv else n_lesions)
    lab = case.label
    if btcv:
        lab = np.where(lab > 0, 6, 0).astype(np.uint8)
        # other organs in the background, on every slice, so that a LiTS reading (1 liver, 2 tumour) would see them
        background = np.argwhere(lab == 0)
        for i, value in enumerate(BTCV_OTHER_ORGANS):
            for z in range(SLICES):
                x, y, _ = background[(i * 997 + z * 31) % len(background)]
                lab[x, y, z] = value
    image.parent.mkdir(parents=True, exist_ok=True)
    label.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(image, case.ct, case.affine)
    save_nifti(label, lab, case.affine)
    return lab


def make_lits(root: Path) -> Path:
    """LiTS: ``volume-N.nii`` + ``segmentation-N.nii`` in "Training Batch" sub-folders (and one split apart)."""
    write_case(root / "Training Batch 1" / "volume-0.nii", root / "Training Batch 1" / "segmentation-0.nii", 0)
    write_case(root / "Training Batch 1" / "volume-1.nii", root / "Training Batch 1" / "segmentation-1.nii", 1, 0)
    write_case(root / "Training Batch 2" / "volume-27.nii", root / "Training Batch 2" / "segmentation-27.nii", 2)
    write_case(root / "volumes" / "volume-3.nii.gz", root / "segmentations" / "segmentation-3.nii.gz", 3)
    return root


def make_msd(root: Path) -> Path:
    """MSD Task03_Liver: ``dataset.json`` + ``imagesTr/liver_N.nii.gz`` + ``labelsTr/liver_N.nii.gz``."""
    for n, seed in ((0, 4), (3, 5), (11, 6)):
        write_case(root / "imagesTr" / f"liver_{n}.nii.gz", root / "labelsTr" / f"liver_{n}.nii.gz", seed)
    # the test images have no labels; the real archive also carries macOS "._" junk next to the images
    (root / "imagesTs").mkdir()
    (root / "imagesTs" / "liver_132.nii.gz").write_bytes(b"not read")
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    spec = {
        "name": "Liver",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": 3,
        "training": [
            {"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"} for n in (0, 3, 11)
        ],
        "test": ["./imagesTs/liver_132.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(spec, indent=4))
    return root


def make_btcv(root: Path, images: str = "img", labels: str = "label") -> Path:
    """BTCV: ``img/img0001.nii.gz`` + ``label/label0001.nii.gz`` with the 13 organ labels (liver 6, no tumour)."""
    for n, seed in ((1, 7), (2, 8), (40, 9)):
        write_case(root / images / f"img{n:04d}.nii.gz", root / labels / f"label{n:04d}.nii.gz", seed, btcv=True)
    return root


def make_ircadb(root: Path) -> Path:
    """3D-IRCADb as format-shifted in shared/data: ``<case>_ct.nii.gz`` + ``<case>_label_liver1_tumor2.nii.gz``."""
    for n, seed in ((7, 10), (17, 11)):
        write_case(root / f"ircadb_p{n}_ct.nii.gz", root / f"ircadb_p{n}_label_liver1_tumor2.nii.gz", seed)
    return root


def prepare_cli(tmp_path: Path, *args: str) -> tuple[int, dict | None]:
    """Run ``python -m pipeline prepare`` in-process on small slices; return the exit code and the manifest."""
    out = tmp_path / "prepared"
    code = main(["prepare", *args, "--out", str(out), "--size", "32"])
    manifest = out / "manifest.json"
    return code, json.loads(manifest.read_text()) if manifest.exists() else None


def case_table(manifest: dict) -> dict[str, dict]:
    """The manifest's case table by case id."""
    return {c["case_id"]: c for c in manifest["cases"]}


# --------------------------------------------------------------------------------------------------------- discovery


def test_lits_layout(tmp_path):
    root = make_lits(tmp_path / "lits")
    records = discover(root)
    assert [r.case_id for r in records] == ["volume-0", "volume-1", "volume-27", "volume-3"]
    by_id = {r.case_id: r for r in records}
    assert by_id["volume-27"].image == root / "Training Batch 2" / "volume-27.nii"
    assert by_id["volume-27"].label == root / "Training Batch 2" / "segmentation-27.nii"
    assert by_id["volume-3"].label == root / "segmentations" / "segmentation-3.nii.gz"
    assert all(r.dataset == "lits" and r.liver_values == (1,) and r.lesion_values == (2,) for r in records)


def test_msd_layout(tmp_path):
    root = make_msd(tmp_path / "Task03_Liver")
    for path in (root, root / "dataset.json"):
        records = discover(path)
        assert [r.case_id for r in records] == ["liver_0", "liver_11", "liver_3"]
        assert records[2].image == root / "imagesTr" / "liver_3.nii.gz"
        assert records[2].label == root / "labelsTr" / "liver_3.nii.gz"
        assert all(r.dataset == "msd" and r.liver_values == (1,) and r.lesion_values == (2,) for r in records)


@pytest.mark.parametrize("images, labels", [("img", "label"), ("imagesTr", "labelsTr")])
def test_btcv_layouts(tmp_path, images, labels):
    root = make_btcv(tmp_path / "btcv", images, labels)
    records = discover(root)
    assert [r.case_id for r in records] == ["img0001", "img0002", "img0040"]
    assert records[0].image == root / images / "img0001.nii.gz"
    assert records[0].label == root / labels / "label0001.nii.gz"
    assert all(r.dataset == "btcv" and r.liver_values == (6,) and r.lesion_values == () for r in records)


def test_ircadb_layout(tmp_path):
    root = make_ircadb(tmp_path / "ircadb")
    records = discover(root)
    assert [r.case_id for r in records] == ["ircadb_p17", "ircadb_p7"]
    assert records[1].label == root / "ircadb_p7_label_liver1_tumor2.nii.gz"
    assert all(r.dataset == "ircadb" and r.liver_values == (1,) and r.lesion_values == (2,) for r in records)


def make_datalist(tmp_path: Path) -> Path:
    """A datalist in its own folder with paths relative to it, one entry of each label convention."""
    raw = tmp_path / "raw"
    write_case(raw / "a_ct.nii.gz", raw / "a_seg.nii.gz", 12)
    write_case(raw / "b.nii.gz", raw / "b_seg.nii.gz", 13, btcv=True)
    write_case(raw / "c.nii.gz", raw / "c_seg.nii.gz", 14, n_lesions=0)
    spec = {
        "training": [
            {"image": "../raw/a_ct.nii.gz", "label": "../raw/a_seg.nii.gz", "case_id": "alpha"},
            {"image": "../raw/b.nii.gz", "label": "../raw/b_seg.nii.gz", "label_preset": "btcv"},
        ],
        "validation": [{"image": "../raw/c.nii.gz", "label": "../raw/c_seg.nii.gz", "liver_values": [1, 3]}],
    }
    path = tmp_path / "lists" / "cases.json"
    path.parent.mkdir()
    path.write_text(json.dumps(spec))
    return path


def test_datalist(tmp_path):
    path = make_datalist(tmp_path)
    records = {r.case_id: r for r in discover(path)}
    assert sorted(records) == ["alpha", "b", "c"]
    assert records["alpha"].image == (tmp_path / "raw" / "a_ct.nii.gz").resolve()
    assert (records["alpha"].liver_values, records["alpha"].lesion_values) == ((1,), (2,))
    assert (records["b"].liver_values, records["b"].lesion_values) == ((6,), ())
    assert (records["c"].liver_values, records["c"].lesion_values) == ((1, 3), (2,))
    assert all(r.dataset == "datalist" for r in records.values())
    # a preset given for the whole run applies to the entries that name none
    records = {r.case_id: r for r in discover(path, label_preset="totalsegmentator")}
    assert records["alpha"].liver_values == (5,) and records["b"].liver_values == (6,)


def test_datalist_as_a_plain_list_and_without_labels(tmp_path):
    write_case(tmp_path / "x.nii.gz", tmp_path / "x_seg.nii.gz", 15)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"image": "x.nii.gz", "label": "x_seg.nii.gz"}]))
    assert [r.case_id for r in discover(plain)] == ["x"]
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(json.dumps({"training": [{"image": "x.nii.gz"}]}))
    with pytest.raises(InputDataError, match="'image' and 'label'") as info:
        discover(unlabelled)
    assert info.value.path == str(unlabelled)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputDataError, match="cannot read the datalist"):
        discover(broken)


def test_unknown_layout_lists_the_expected_layouts(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "patient1.nii.gz").write_bytes(b"")
    (tmp_path / "scans" / "notes.txt").write_text("hello")
    with pytest.raises(InputDataError) as info:
        discover(tmp_path / "scans")
    message = str(info.value)
    assert info.value.path == str(tmp_path / "scans")
    for layout in ("datalist", "MSD", "LiTS", "BTCV", "IRCADb", "volume-N", "imagesTr", "img/imgNNNN"):
        assert layout in message
    # a layout that is forced but absent fails the same way
    make_btcv(tmp_path / "btcv")
    with pytest.raises(InputDataError, match="layout 'lits'"):
        discover(tmp_path / "btcv", layout="lits")
    with pytest.raises(InputDataError, match="no such file"):
        discover(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown layout"):
        discover(tmp_path / "btcv", layout="nnunet")
    with pytest.raises(InputDataError, match="not a datalist"):
        discover(tmp_path / "scans" / "notes.txt")


def test_duplicate_case_ids(tmp_path):
    root = tmp_path / "lits"
    for batch in ("Training Batch 1", "Training Batch 2"):
        write_case(root / batch / "volume-5.nii", root / batch / "segmentation-5.nii", 16)
    with pytest.raises(InputDataError, match="'volume-5' is used by both") as info:
        discover(root)
    assert "Training Batch 1" in str(info.value) and "Training Batch 2" in str(info.value)


def test_presets_and_overrides(tmp_path):
    root = make_lits(tmp_path / "lits")
    assert discover(root, label_preset="btcv")[0].liver_values == (6,)
    assert discover(root, label_preset="BTCV")[0].lesion_values == ()
    r = discover(root, liver_values=[1, 7], lesion_values=[])[0]
    assert (r.liver_values, r.lesion_values) == ((1, 7), ())
    r = discover(root, label_preset="totalsegmentator", lesion_values=[9])[0]
    assert (r.liver_values, r.lesion_values) == ((5,), (9,))
    assert resolve_preset(None, default="btcv") == PRESETS["btcv"]
    with pytest.raises(ValueError, match="unknown label preset 'lidc'"):
        resolve_preset("lidc")


# ------------------------------------------------------------------------------------------------ prepare per layout


@pytest.mark.parametrize(
    "make, ids, dataset",
    [
        (make_lits, ["volume-0", "volume-1", "volume-27", "volume-3"], "lits"),
        (make_msd, ["liver_0", "liver_11", "liver_3"], "msd"),
        (make_ircadb, ["ircadb_p17", "ircadb_p7"], "ircadb"),
    ],
)
def test_prepare_each_lesion_layout(tmp_path, make, ids, dataset):
    root = make(tmp_path / "data")
    code, manifest = prepare_cli(tmp_path, "--data", str(root))
    assert code == 0 and manifest["failures"] == []
    cases = case_table(manifest)
    assert sorted(cases) == ids
    assert all(c["dataset"] == dataset for c in cases.values())
    for c in cases.values():  # cases with lesions are evaluated, normal ones train
        assert c["split"] in (("validation", "test") if c["has_lesion"] else ("training",))
    assert manifest["validation"] and any(e["has_lesion"] for e in manifest["validation"] + manifest["test"])


def test_prepare_btcv_sends_every_case_to_training(tmp_path):
    root = make_btcv(tmp_path / "btcv")
    code, manifest = prepare_cli(tmp_path, "--data", str(root))
    assert code == 0
    assert manifest["splits"] == {"training": ["img0001", "img0002", "img0040"], "validation": [], "test": []}
    assert all(not c["has_lesion"] and c["liver_slices"] == SLICES for c in manifest["cases"])
    assert manifest["training"] and not any(e["has_lesion"] for e in manifest["training"])
    info = json.loads((tmp_path / "prepared" / "cases" / "img0001" / "case.json").read_text())
    label = np.asarray(nib.load(root / "label" / "label0001.nii.gz").dataobj)
    # only value 6 is liver: the other organs (including 1 and 2) are not counted
    assert info["liver_voxels"] == (label == 6).sum(axis=(0, 1)).tolist()
    assert info["lesion_voxels"] == [0] * SLICES
    assert info["source"]["liver_values"] == [6] and info["source"]["lesion_values"] == []


def test_prepare_datalist_and_two_sources(tmp_path):
    path = make_datalist(tmp_path)
    btcv = make_btcv(tmp_path / "btcv")
    code, manifest = prepare_cli(tmp_path, "--data", str(path), "--data", str(btcv))
    assert code == 0
    cases = case_table(manifest)
    assert sorted(cases) == ["alpha", "b", "c", "img0001", "img0002", "img0040"]
    assert cases["alpha"]["has_lesion"] and cases["alpha"]["split"] in ("validation", "test")
    assert cases["b"]["split"] == "training" and cases["img0002"]["dataset"] == "btcv"


def test_prepare_cli_overrides_reach_the_cases(tmp_path):
    root = make_btcv(tmp_path / "btcv")
    code, _ = prepare_cli(tmp_path, "--data", str(root), "--liver-values", "6,11", "--lesion-values", "4")
    assert code == 0
    info = json.loads((tmp_path / "prepared" / "cases" / "img0002" / "case.json").read_text())
    assert info["source"]["liver_values"] == [6, 11] and info["source"]["lesion_values"] == [4]
    assert sum(info["lesion_voxels"]) == SLICES  # one gallbladder (4) voxel per slice now counts as lesion


def test_prepare_cli_reports_bad_layouts_and_duplicates(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, manifest = prepare_cli(tmp_path, "--data", str(tmp_path / "empty"))
    err = capsys.readouterr().err
    assert code == 2 and manifest is None
    assert err.startswith("error: ") and "expected one of" in err and "MSD" in err
    # the same LiTS folder given twice: every case id appears twice
    root = make_lits(tmp_path / "lits")
    code, manifest = prepare_cli(tmp_path, "--data", str(root), "--data", str(root))
    assert code == 2 and manifest is None
    assert "case id 'volume-0' is used by both" in capsys.readouterr().err


def test_renamed_flags_keep_a_deprecated_alias(capsys):
    """``--preset`` (label values) became ``--label-preset``; the old spelling still works for one release, with a
    warning, and is hidden from --help."""
    import argparse

    from pipeline.cli import add_prepare_arguments

    parser = argparse.ArgumentParser(prog="prepare")
    add_prepare_arguments(parser)
    assert parser.parse_args(["--label-preset", "btcv"]).label_preset == "btcv"
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["--preset", "btcv"]).label_preset == "btcv"
    assert "--preset is deprecated" in capsys.readouterr().err and "--label-preset" in parser.format_help()
    assert "--preset " not in parser.format_help().replace("--label-preset", "")
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "nosuch"])


def test_a_datalist_entry_may_use_the_old_preset_key(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for name in ("a.nii.gz", "a_seg.nii.gz"):
        (root / name).write_bytes(b"")
    path = tmp_path / "list.json"
    entry = {"image": "raw/a.nii.gz", "label": "raw/a_seg.nii.gz", "preset": "btcv"}
    path.write_text(json.dumps({"training": [entry]}))
    assert discover(path)[0].liver_values == (6,)
