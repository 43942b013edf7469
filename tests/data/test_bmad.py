"""Tests of the BMAD liver folder export/import (pipeline.data.bmad): layout, pixels, orientation, round
trip, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.common.display import display_to_ras, ras_to_display
from pipeline.data.bmad import export_bmad, main_export, read_png
from pipeline.data.bmad_import import import_bmad, main_import
from pipeline.data.datasets import discover
from pipeline.data.manifest import SPLITS, load_manifest
from pipeline.data.phantom import write_phantom_cohort
from pipeline.data.prepare import prepare, prepare_case
from pipeline.data.settings import PrepareSettings, SplitSettings
from transforms.errors import InputDataError

SIZE = 64
BMAD = {"training": "train", "validation": "valid", "test": "test"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Phantom volumes, their prepared folder, its BMAD export and the re-import of that export."""
    root = tmp_path_factory.mktemp("bmad")
    write_phantom_cohort(root / "raw", n_cases=4, size=SIZE, n_slices=10)
    records = discover(root / "raw", label_preset="phantom")
    prepare(records, root / "prepared", PrepareSettings(size=SIZE), SplitSettings(val_fraction=0.5), progress=False)
    counts = export_bmad(root / "prepared", root / "bmad")
    imported = import_bmad(root / "bmad", root / "imported", size=SIZE)
    return {"root": root, "records": records, "manifest": load_manifest(root / "prepared"), "counts": counts,
            "imported": load_manifest(root / "imported"), "import_return": imported}


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(path))  # 3D = (rows, cols, RGB)


def by_slice(manifest: dict, split: str) -> dict:
    return {(e["case_id"], e["slice_index"]): e for e in manifest[split]}


def test_display_mapping_puts_anterior_up_and_patient_right_on_the_left():
    ras = np.zeros((5, 3), dtype=np.uint8)  # X = 5 (toward the patient's right), Y = 3 (toward anterior)
    ras[4, 2] = 1  # right-anterior corner
    ras[0, 0] = 2  # left-posterior corner
    shown = ras_to_display(ras)
    assert shown.shape == (3, 5) and shown.dtype == np.uint8
    assert shown[0, 0] == 1 and shown[-1, -1] == 2
    np.testing.assert_array_equal(display_to_ras(shown), ras)
    stack = np.arange(2 * 4 * 6).reshape(2, 4, 6)
    np.testing.assert_array_equal(display_to_ras(ras_to_display(stack)), stack)


def test_phantom_looks_like_a_radiological_axial_slice(cohort, tmp_path):
    # without masking and with a wide field the spine is visible: posterior (bottom), medial to the liver
    settings = PrepareSettings(size=SIZE, field_mm=600.0, mask_outside=False)
    for record in cohort["records"][:2]:  # one RAS and one LPS volume
        info = prepare_case(record, settings, tmp_path)
        z = info["slices"][len(info["slices"]) // 2]["slice_index"]
        image = ras_to_display(np.load(tmp_path / record.case_id / f"s{z:04d}_image.npy")[0])
        label = ras_to_display(np.load(tmp_path / record.case_id / f"s{z:04d}_label.npy")[0])
        bone_row, bone_col = np.argwhere(image > 0.99).mean(axis=0)
        liver_row, liver_col = np.argwhere(label > 0).mean(axis=0)
        assert bone_row > liver_row + 3 and liver_col < bone_col - 2


def test_export_layout_counts_and_pixels(cohort):
    root, manifest, counts = cohort["root"], cohort["manifest"], cohort["counts"]
    bmad = root / "bmad"
    expected = {"train/good/img": len(manifest["training"])}
    for split in ("validation", "test"):
        n_bad = sum(e["has_lesion"] for e in manifest[split])
        name = BMAD[split]
        expected.update({f"{name}/good/img": len(manifest[split]) - n_bad, f"{name}/Ungood/img": n_bad,
                         f"{name}/Ungood/anomaly_mask": n_bad})
    assert counts == expected
    assert counts["valid/Ungood/img"] > 0 and counts["test/Ungood/img"] > 0 and counts["valid/good/img"] > 0
    for folder, n in counts.items():
        assert len(list((bmad / folder).glob("*.png"))) == n
    assert not list(bmad.rglob(".tmp-*"))

    for split in SPLITS:
        for entry in manifest[split]:
            cls = "Ungood" if entry["has_lesion"] else "good"
            name = f"{entry['case_id']}_{entry['slice_index']}.png"
            png = read_png(bmad / BMAD[split] / cls / "img" / name)
            image = np.load(entry["image"])[0]
            label = np.load(entry["label"])[0]
            shown_label = ras_to_display(label)
            assert png.dtype == np.uint8 and png.shape == (SIZE, SIZE)
            assert np.all((png > 0) == (shown_label > 0))  # BMAD's liver on black
            expected_png = np.rint(ras_to_display(image) * 255)
            inside = shown_label > 0
            assert np.abs(png[inside].astype(float) - expected_png[inside]).max() <= 1
            if cls == "Ungood":
                mask = read_png(bmad / BMAD[split] / cls / "anomaly_mask" / name)
                assert set(np.unique(mask)) <= {0, 255}
                np.testing.assert_array_equal(mask == 255, shown_label == 2)


def test_round_trip_keeps_splits_slices_images_and_masks(cohort):
    manifest, imported = cohort["manifest"], cohort["imported"]
    assert imported["format"] == manifest["format"]
    assert imported["settings"] == {"source": "bmad", "size": SIZE}
    assert imported["warnings"] == [] and imported["failures"] == []
    assert imported["splits"] == manifest["splits"]
    for split in SPLITS:
        original, back = by_slice(manifest, split), by_slice(imported, split)
        assert back.keys() == original.keys() and len(back) > 0
        for key, entry in original.items():
            new = back[key]
            assert new["has_lesion"] == entry["has_lesion"]
            image, label = np.load(new["image"]), np.load(new["label"])
            assert image.shape == (1, SIZE, SIZE) and image.dtype == np.float32
            assert label.shape == (1, SIZE, SIZE) and label.dtype == np.uint8
            assert np.abs(image - np.load(entry["image"])).max() <= 1 / 255 + 1e-6
            np.testing.assert_array_equal(label, np.load(entry["label"]))
            assert new["lesion_area"] == int((label == 2).sum()) and new["liver_area"] == int((label > 0).sum())
            assert Path(new["image"]).parent.name == key[0]
    case_splits = {c["case_id"]: c["split"] for c in imported["cases"]}
    assert case_splits == {c: s for s in SPLITS for c in manifest["splits"][s]}


def rearrange(bmad: Path, dest: Path, variant: str) -> Path:
    """A copy of a class-first export in one of the other accepted layouts."""
    shutil.copytree(bmad, dest)
    for split in ("valid", "test"):
        if variant == "label":
            (dest / split / "Ungood" / "anomaly_mask").rename(dest / split / "Ungood" / "label")
        elif variant == "kind_first":
            for cls in ("good", "Ungood"):
                (dest / split / "img").mkdir(exist_ok=True)
                (dest / split / cls / "img").rename(dest / split / "img" / cls)
            (dest / split / "label").mkdir()
            (dest / split / "Ungood" / "anomaly_mask").rename(dest / split / "label" / "Ungood")
    if variant == "kind_first":
        (dest / "train" / "img").mkdir()
        (dest / "train" / "good" / "img").rename(dest / "train" / "img" / "good")
    return dest


@pytest.mark.parametrize("variant", ["anomaly_mask", "label", "kind_first"])
def test_layout_variants_import_the_same(cohort, tmp_path, variant):
    source = rearrange(cohort["root"] / "bmad", tmp_path / "bmad", variant)
    import_bmad(source, tmp_path / "out", size=SIZE)
    manifest = load_manifest(tmp_path / "out")
    reference = cohort["imported"]
    for split in SPLITS:
        ours, ref = by_slice(manifest, split), by_slice(reference, split)
        assert ours.keys() == ref.keys()
        for key, entry in ref.items():
            assert ours[key]["has_lesion"] == entry["has_lesion"]
            np.testing.assert_array_equal(np.load(ours[key]["label"]), np.load(entry["label"]))


def test_import_resizes_and_keeps_the_image_black_outside_the_liver(cohort, tmp_path):
    import_bmad(cohort["root"] / "bmad", tmp_path, size=32)
    manifest = load_manifest(tmp_path)
    assert manifest["settings"]["size"] == 32
    n_lesion_pixels = 0
    for entry in manifest["validation"] + manifest["test"]:
        image, label = np.load(entry["image"]), np.load(entry["label"])
        assert image.shape == label.shape == (1, 32, 32)
        assert image.min() >= 0 and image.max() <= 1 and set(np.unique(label)) <= {0, 1, 2}
        assert np.all(image[label == 0] == 0) and np.all(image[label > 0] > 0)
        n_lesion_pixels += int((label == 2).sum())
    assert n_lesion_pixels > 0


def test_volumes_in_two_splits_become_one_case_per_split_with_a_warning(tmp_path):
    liver = np.zeros((8, 8), dtype=np.uint8)
    liver[2:6, 2:6] = 120
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[3:5, 3:5] = 255
    write_png(tmp_path / "b/train/good/img/4_10.png", liver)
    write_png(tmp_path / "b/train/good/img/4_11.png", liver)
    write_png(tmp_path / "b/valid/Ungood/img/4_12.png", liver)
    write_png(tmp_path / "b/valid/Ungood/anomaly_mask/4_12.png", mask)
    write_png(tmp_path / "b/test/good/img/7_3.png", liver)
    write_png(tmp_path / "b/test/good/img/scan.png", np.dstack([liver] * 3))  # no "_<slice>", stored as RGB
    manifest = import_bmad(tmp_path / "b", tmp_path / "out", size=8)
    assert manifest["splits"] == {"training": ["4-train"], "validation": ["4-valid"], "test": ["7", "scan"]}
    assert [(e["case_id"], e["slice_index"]) for e in manifest["training"]] == [("4-train", 10), ("4-train", 11)]
    assert [(e["case_id"], e["slice_index"], e["has_lesion"]) for e in manifest["test"]] == [("7", 3, 0),
                                                                                             ("scan", 0, 0)]
    assert len(manifest["warnings"]) == 1
    warning = manifest["warnings"][0]
    assert warning["volume"] == "4" and warning["splits"] == ["training", "validation"]
    assert "4" in warning["message"] and "train" in warning["message"] and "valid" in warning["message"]
    entry = manifest["validation"][0]
    assert entry["lesion_area"] == 4 and entry["liver_area"] == 16 and entry["has_lesion"] == 1
    label = np.load(tmp_path / "out" / entry["label"])[0]
    np.testing.assert_array_equal(ras_to_display(label), np.where(mask > 0, 2, liver > 0))
    image = np.load(tmp_path / "out" / manifest["test"][1]["image"])[0]
    np.testing.assert_allclose(ras_to_display(image), liver / 255.0, atol=1e-7)


def test_missing_subfolders_name_the_folder_and_the_expected_layout(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(InputDataError) as info:
        import_bmad(tmp_path / "empty", tmp_path / "out")
    assert info.value.path == str(tmp_path / "empty") and "train/good/img" in str(info.value)
    (tmp_path / "b" / "valid" / "stuff").mkdir(parents=True)
    with pytest.raises(InputDataError) as info:
        import_bmad(tmp_path / "b", tmp_path / "out")
    assert info.value.path == str(tmp_path / "b" / "valid") and "valid/Ungood/img" in str(info.value)
    write_png(tmp_path / "c/test/Ungood/img/1_1.png", np.ones((4, 4), dtype=np.uint8))
    with pytest.raises(InputDataError, match="anomaly_mask") as info:
        import_bmad(tmp_path / "c", tmp_path / "out")
    assert info.value.path == str(tmp_path / "c" / "test")
    write_png(tmp_path / "c/test/Ungood/anomaly_mask/other.png", np.ones((4, 4), dtype=np.uint8))
    with pytest.raises(InputDataError, match="no lesion mask") as info:
        import_bmad(tmp_path / "c", tmp_path / "out")
    assert info.value.path == str(tmp_path / "c/test/Ungood/img/1_1.png")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("content", ["garbage", "uint16", "wrong_mask_shape"])
def test_bad_png_names_the_file(tmp_path, content):
    image = tmp_path / "b/test/Ungood/img/3_5.png"
    mask = tmp_path / "b/test/Ungood/anomaly_mask/3_5.png"
    write_png(image, np.full((6, 6), 50, dtype=np.uint8))
    write_png(mask, np.zeros((6, 6), dtype=np.uint8))
    bad = image
    if content == "garbage":
        image.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    elif content == "uint16":
        write_png(image, np.full((6, 6), 1000, dtype=np.uint16))
    else:
        write_png(mask, np.zeros((5, 6), dtype=np.uint8))
        bad = mask
    with pytest.raises(InputDataError) as info:
        import_bmad(tmp_path / "b", tmp_path / "out")
    assert info.value.path == str(bad)
    assert not list((tmp_path / "out" / "cases").iterdir())  # the half-built case folder is removed


def test_duplicate_slice_is_refused(tmp_path):
    write_png(tmp_path / "b/valid/good/img/2_7.png", np.ones((4, 4), dtype=np.uint8))
    write_png(tmp_path / "b/valid/Ungood/img/2_7.png", np.ones((4, 4), dtype=np.uint8))
    write_png(tmp_path / "b/valid/Ungood/anomaly_mask/2_7.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(InputDataError, match="one PNG per slice"):
        import_bmad(tmp_path / "b", tmp_path / "out")


def test_export_refuses_to_mix_with_an_earlier_export_unless_overwrite(cohort, tmp_path):
    out = tmp_path / "bmad"
    shutil.copytree(cohort["root"] / "bmad", out)
    stale = out / "test" / "good" / "img" / "old_1.png"
    write_png(stale, np.ones((4, 4), dtype=np.uint8))
    keep = out / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(InputDataError, match="--overwrite") as info:
        export_bmad(cohort["root"] / "prepared", out)
    assert info.value.path == str(out) and stale.exists()
    counts = export_bmad(cohort["root"] / "prepared", out, overwrite=True)
    assert counts == cohort["counts"] and not stale.exists() and keep.read_text() == "mine"
    with pytest.raises(InputDataError, match="manifest"):
        export_bmad(tmp_path / "nowhere", tmp_path / "other")


def test_cli(cohort, tmp_path, capsys):
    assert main_export([str(cohort["root"] / "prepared"), "--out", str(tmp_path / "bmad")]) == 0
    out = capsys.readouterr().out
    assert f"{cohort['counts']['train/good/img']:6d}  train/good/img" in out
    assert main_export([str(cohort["root"] / "prepared"), "--out", str(tmp_path / "bmad")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main_import([str(tmp_path / "bmad"), "--out", str(tmp_path / "prep"), "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "training" in out and "manifest.json" in out
    assert load_manifest(tmp_path / "prep")["settings"] == {"source": "bmad", "size": 32}
    assert main_import([str(tmp_path / "missing"), "--out", str(tmp_path / "prep2")]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err
