"""Tests of the synthetic phantom cohort (pipeline.data.phantom): anatomy, contrasts, orientation, files and CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.data.phantom import LESION_KINDS, main, make_phantom_case, write_phantom_cohort
from pipeline.data.phantom_lesions import simulate_scan as _scan

SIZE, SLICES = 96, 24


@pytest.fixture(scope="module")
def case():
    return make_phantom_case(7, size=SIZE, n_slices=SLICES, n_lesions=3)


def inner_parenchyma(case) -> np.ndarray:
    """Liver voxels away from the liver border, vessels and lesions (where blur does not mix in other tissue)."""
    others = ndimage.binary_dilation(case.vessels | (case.label == 2) | (case.label == 0))
    return (case.label == 1) & ~others


def lesion_regions(case):
    """(lesion record, voxel mask) for lesions whose connected component holds no other lesion's centre."""
    components, _ = ndimage.label(case.label == 2)
    ids = [components[tuple(lesion["center_voxel"])] for lesion in case.lesions]
    return [(lesion, components == i) for lesion, i in zip(case.lesions, ids) if ids.count(i) == 1]


def test_arrays_and_labels(case):
    assert case.ct.shape == case.label.shape == case.vessels.shape == (SIZE, SIZE, SLICES)
    assert case.ct.dtype == np.int16 and case.label.dtype == np.uint8 and case.affine.dtype == np.float64
    assert set(np.unique(case.label)) == {0, 1, 2}
    assert case.ct.min() >= -1024 and case.ct.max() <= 3071
    assert np.median(case.ct[0]) < -900  # air at the field-of-view edge
    bone = np.argwhere(case.ct > 250)  # the spine, in the posterior midline
    assert len(bone) > 20
    assert abs(bone[:, 0].mean() - (SIZE - 1) / 2) < 5 and bone[:, 1].mean() < SIZE / 2
    json.dumps(case.to_json())


def test_determinism():
    a = make_phantom_case(3, size=64, n_slices=12)
    b = make_phantom_case(3, size=64, n_slices=12)
    c = make_phantom_case(4, size=64, n_slices=12)
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.to_json() == b.to_json()
    assert not np.array_equal(a.ct, c.ct)


def test_lesions_stay_inside_the_liver_of_the_normal_twin():
    # an explicit lesion count leaves the anatomy untouched, so the lesion-free twin shows the liver lesions replace
    normal = make_phantom_case(11, size=SIZE, n_slices=SLICES, n_lesions=0)
    sick = make_phantom_case(11, size=SIZE, n_slices=SLICES, n_lesions=4)
    assert normal.lesions == [] and not (normal.label == 2).any()
    np.testing.assert_array_equal(sick.label > 0, normal.label > 0)
    assert (sick.label == 2).any()
    assert np.all(normal.label[sick.label == 2] == 1)
    assert sum(lesion["voxels"] for lesion in sick.lesions) == (sick.label == 2).sum()
    for lesion in sick.lesions:
        assert lesion["voxels"] >= 1 and sick.label[tuple(lesion["center_voxel"])] == 2


def test_liver_anatomy(case):
    spacing = nib.affines.voxel_sizes(case.affine)
    liver = case.label > 0
    centroid = nib.affines.apply_affine(case.affine, np.argwhere(liver).mean(axis=0))
    volume_centre = nib.affines.apply_affine(case.affine, (np.array(liver.shape) - 1) / 2.0)
    assert centroid[0] - volume_centre[0] > 15.0  # patient's right is +x in RAS world
    index = np.argwhere(liver)
    extent = (index.max(axis=0) - index.min(axis=0) + 1) * spacing
    assert 130.0 < extent[0] < 220.0 and 80.0 < extent[1] < 180.0
    assert ndimage.label(liver)[1] == 1


def test_liver_shrinks_towards_its_ends():
    """A volume long enough to hold the whole liver: its cross-section at the first and last liver slices is well
    below the one in the middle of the liver."""
    long_case = make_phantom_case(7, size=48, n_slices=96, n_lesions=0)
    areas = (long_case.label > 0).sum(axis=(0, 1))
    on = np.flatnonzero(areas)
    assert 0 < on[0] and on[-1] < len(areas) - 1, "both ends of the liver must lie inside the volume"
    middle = areas[(on[0] + on[-1]) // 2 - 2 : (on[0] + on[-1]) // 2 + 3].mean()
    assert middle > 1.5 * max(areas[on[0]], areas[on[-1]]), (middle, areas[on[0]], areas[on[-1]])


def test_liver_and_vessel_intensity():
    for seed in range(3):
        case = make_phantom_case(seed, size=SIZE, n_slices=SLICES, n_lesions=0)
        mean_hu = case.params["liver_mean_hu"]
        assert 60.0 <= mean_hu <= 110.0
        parenchyma = case.ct[inner_parenchyma(case)]
        assert abs(parenchyma.mean() - mean_hu) < 3.0
        assert case.vessels.sum() > 20 and np.all(case.label[case.vessels] == 1)
        assert case.ct[case.vessels].mean() > parenchyma.mean() + 20.0


def away_from_edges(case) -> np.ndarray:
    """Voxels not touching background or vessels, whose blur would mix other tissue into a lesion's mean."""
    return ~ndimage.binary_dilation((case.label == 0) | case.vessels)


@pytest.mark.parametrize("kind, delta_range", [("hypo", (-70, -25)), ("hyper", (20, 60)), ("subtle", (10, 20))])
def test_lesion_contrast_per_kind(kind, delta_range):
    measured = 0
    for seed in range(6):
        case = make_phantom_case(seed, size=SIZE, n_slices=SLICES, n_lesions=4, lesion_kinds=(kind,))
        background = case.ct[inner_parenchyma(case)].mean()
        for lesion, region in lesion_regions(case):
            delta = lesion["delta_hu"]
            assert lesion["kind"] == kind
            assert delta_range[0] <= (abs(delta) if kind == "subtle" else delta) <= delta_range[1]
            core = region & away_from_edges(case)
            if core.sum() < 10:  # a few voxels are dominated by noise
                continue
            # blur and noise shrink small lesions' contrast, but never flip or inflate it
            ratio = (case.ct[core].mean() - background) / delta
            assert 0.25 < ratio < 1.6, (seed, lesion, ratio)
            measured += 1
    assert measured >= 5


def test_rim_lesions_have_an_iso_core_and_a_contrasting_ring():
    measured = 0
    for seed in range(3):  # full in-plane resolution: a 2-3 mm ring needs small voxels
        case = make_phantom_case(seed, size=192, n_slices=SLICES, n_lesions=3, lesion_kinds=("rim",))
        spacing = nib.affines.voxel_sizes(case.affine)
        background = case.ct[inner_parenchyma(case)].mean()
        for lesion, region in lesion_regions(case):
            assert abs(lesion["delta_hu"]) <= 5.0 and 30.0 <= abs(lesion["rim_delta_hu"]) <= 50.0
            assert 2.0 <= lesion["rim_mm"] <= max(3.0, spacing[0])
            depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
            core = region & (depth > lesion["rim_mm"] + spacing[0])
            ring = region & (depth <= lesion["rim_mm"]) & away_from_edges(case)
            if core.sum() < 10 or ring.sum() < 10:
                continue
            sign = np.sign(lesion["rim_delta_hu"])
            core_contrast = case.ct[core].mean() - background
            ring_contrast = (case.ct[ring].mean() - background) * sign
            assert abs(core_contrast) < 15.0, (seed, lesion, core_contrast)
            assert ring_contrast > 12.0 and ring_contrast - core_contrast * sign > 10.0, (seed, lesion, ring_contrast)
            measured += 1
    assert measured >= 4


def test_lesion_sizes_and_records():
    for seed in range(4):
        case = make_phantom_case(seed, size=SIZE, n_slices=SLICES, n_lesions=4)
        spacing = nib.affines.voxel_sizes(case.affine)
        assert len(case.lesions) == 4
        for lesion in case.lesions:
            assert lesion["kind"] in LESION_KINDS
            assert 3.0 <= lesion["diameter_mm"] <= 40.0
            center_mm = nib.affines.apply_affine(case.affine, lesion["center_voxel"])
            np.testing.assert_allclose(center_mm, lesion["center_mm"], atol=0.01)
        for lesion, region in lesion_regions(case):
            index = np.argwhere(region)
            extent = (index.max(axis=0) - index.min(axis=0)) * spacing
            assert np.all(extent <= lesion["diameter_mm"] + 1e-6), (lesion, extent)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_spacing_and_orientation(orientation):
    case = make_phantom_case(5, size=SIZE, n_slices=SLICES, orientation=orientation)
    assert nib.aff2axcodes(case.affine) == tuple(orientation)
    zooms = nib.affines.voxel_sizes(case.affine)
    assert np.all(zooms > 0)
    assert 0.7 * 512 / SIZE <= zooms[0] == zooms[1] <= 1.0 * 512 / SIZE
    assert 2.0 <= zooms[2] <= 5.0
    assert np.allclose(zooms, case.to_json()["spacing_mm"], atol=1e-3)


def test_ras_and_lps_hold_the_same_anatomy_in_world_coordinates():
    ras = make_phantom_case(2, size=SIZE, n_slices=SLICES, n_lesions=2, orientation="RAS")
    lps = make_phantom_case(2, size=SIZE, n_slices=SLICES, n_lesions=2, orientation="LPS")
    np.testing.assert_array_equal(lps.ct, ras.ct[::-1, ::-1])
    np.testing.assert_array_equal(lps.label, ras.label[::-1, ::-1])

    def liver_centroid_mm(case):
        return nib.affines.apply_affine(case.affine, np.argwhere(case.label > 0).mean(axis=0))

    np.testing.assert_allclose(liver_centroid_mm(lps), liver_centroid_mm(ras), atol=1e-6)
    for a, b in zip(ras.lesions, lps.lesions):
        np.testing.assert_allclose(a["center_mm"], b["center_mm"])
        assert lps.label[tuple(b["center_voxel"])] == 2
    # one arbitrary voxel: the other case's voxel at the same world point holds the same HU
    voxel = np.array([30, 60, 10])
    other = np.rint(nib.affines.apply_affine(np.linalg.inv(lps.affine), nib.affines.apply_affine(ras.affine, voxel)))
    assert lps.ct[tuple(other.astype(int))] == ras.ct[tuple(voxel)]


def test_ct_noise_level():
    flat = np.zeros((96, 96, 16), dtype=np.float32)
    for sigma, blur in [(8.0, 0.5), (15.0, 0.8)]:
        noise = _scan(flat.copy(), sigma, blur, np.random.default_rng(0)).astype(float)
        assert abs(noise.std() - sigma) < 0.05 * sigma
        # smoothing correlates neighbours in-plane only
        assert np.corrcoef(noise[:-1].ravel(), noise[1:].ravel())[0, 1] > 0.1
        assert abs(np.corrcoef(noise[..., :-1].ravel(), noise[..., 1:].ravel())[0, 1]) < 0.05


def test_invalid_arguments():
    with pytest.raises(ValueError, match="orientation"):
        make_phantom_case(0, size=64, n_slices=8, orientation="LAS")
    with pytest.raises(ValueError, match="lesion_kinds"):
        make_phantom_case(0, size=64, n_slices=8, lesion_kinds=("cyst",))
    with pytest.raises(ValueError, match="size"):
        make_phantom_case(0, size=16, n_slices=8)


def test_write_phantom_cohort(tmp_path):
    records = write_phantom_cohort(tmp_path / "a", n_cases=3, seed=1, size=64, n_slices=12)
    assert [r["has_lesion"] for r in records] == [False, False, True]
    manifest = json.loads((tmp_path / "a" / "phantom.json").read_text())
    assert manifest["generator"] == "hepafair phantom"
    assert (manifest["seed"], manifest["size"], manifest["n_slices"]) == (1, 64, 12)
    assert manifest["cases"] == records
    for i, record in enumerate(records):
        assert (record["image"], record["label"]) == (f"volume-{i}.nii.gz", f"segmentation-{i}.nii.gz")
        image, label = nib.load(tmp_path / "a" / record["image"]), nib.load(tmp_path / "a" / record["label"])
        assert nib.aff2axcodes(image.affine) == tuple(("RAS", "LPS")[i % 2]) == tuple(record["orientation"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, record["affine"])
        labels = np.asarray(label.dataobj)
        assert labels.shape == (64, 64, 12) and (labels == 2).any() == record["has_lesion"]
        assert (labels == 1).any()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["phantom.json"] + [f"{kind}-{i}.nii.gz" for kind in ("volume", "segmentation") for i in range(3)]
    )

    write_phantom_cohort(tmp_path / "b", n_cases=3, seed=1, size=64, n_slices=12)
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name

    # a smaller cohort over a larger one drops the old extra cases, and keeps files it did not write
    (tmp_path / "b" / "notes.txt").write_text("mine")
    write_phantom_cohort(tmp_path / "b", n_cases=2, seed=1, size=64, n_slices=12)
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert "volume-2.nii.gz" not in names and "segmentation-2.nii.gz" not in names
    assert {"notes.txt", "volume-1.nii.gz", "phantom.json"} <= names


def test_monai_reorients_an_lps_file_onto_the_ras_twin(tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    records = write_phantom_cohort(tmp_path, n_cases=2, seed=5, size=48, n_slices=8, normal_fraction=0.0)
    assert records[1]["orientation"] == "LPS"
    keys = ["image", "label"]
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS")])
    data = load({"image": str(tmp_path / records[1]["image"]), "label": str(tmp_path / records[1]["label"])})
    twin = make_phantom_case(records[1]["seed"], size=48, n_slices=8, orientation="RAS")
    np.testing.assert_array_equal(data["image"][0].numpy(), twin.ct)
    np.testing.assert_array_equal(data["label"][0].numpy(), twin.label)
    np.testing.assert_allclose(data["image"].affine.numpy(), twin.affine, atol=1e-5)


@pytest.mark.parametrize("n_cases, fraction, normals", [(2, 0.0, 1), (1, 0.0, 0), (3, 1.0, 3), (5, 0.5, 3)])
def test_cohort_split(tmp_path, n_cases, fraction, normals):
    records = write_phantom_cohort(tmp_path, n_cases=n_cases, normal_fraction=fraction, size=32, n_slices=4)
    assert [r["has_lesion"] for r in records] == [False] * normals + [True] * (n_cases - normals)
    assert all(len(r["lesions"]) == 0 for r in records[:normals])


def test_main(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--cases", "2", "--size", "48", "--slices", "8", "--seed", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("phantom_000  RAS  lesions=0") and out[1].startswith("phantom_001  LPS")
    assert "1 normal, 1 with lesions" in out[-1]
    assert (tmp_path / "volume-1.nii.gz").exists() and (tmp_path / "phantom.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--cases", "0"])
    assert exit_info.value.code == 2
    (tmp_path / "file").write_text("")
    assert main(["--out", str(tmp_path / "file"), "--cases", "1", "--size", "32", "--slices", "4"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_main_lesion_kinds(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--cases", "3", "--size", "48", "--slices", "8", "--normal-fraction", "0"]
    assert main([*args, "--lesion-kinds", "hyper,rim"]) == 0
    cases = json.loads((tmp_path / "phantom.json").read_text())["cases"]
    kinds = {lesion["kind"] for case in cases for lesion in case["lesions"]}
    assert kinds and kinds <= {"hyper", "rim"}
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--lesion-kinds", "hyper,bright"])
    assert exit_info.value.code == 2 and "--lesion-kinds" in capsys.readouterr().err


def test_lesion_diameter_range():
    diameters = [
        lesion["diameter_mm"]
        for seed in range(3)
        for lesion in make_phantom_case(
            seed, size=SIZE, n_slices=SLICES, n_lesions=4, lesion_diameter_mm=(14.0, 20.0)
        ).lesions
    ]
    assert len(diameters) == 12 and all(14.0 <= d <= 20.0 for d in diameters)
    with pytest.raises(ValueError, match="lesion_diameter_mm"):
        make_phantom_case(0, size=64, n_slices=8, lesion_diameter_mm=(20.0, 10.0))


def test_perfusion_varies_the_liver_smoothly_and_keeps_anatomy_and_lesions():
    flat = make_phantom_case(3, size=SIZE, n_slices=SLICES, n_lesions=2)
    perfused = make_phantom_case(3, size=SIZE, n_slices=SLICES, n_lesions=2, perfusion_hu=15.0)
    np.testing.assert_array_equal(flat.label, perfused.label)
    assert [lesion["diameter_mm"] for lesion in flat.lesions] == [lesion["diameter_mm"] for lesion in perfused.lesions]
    liver = flat.label >= 1
    outside = ~ndimage.binary_dilation(liver, iterations=2)
    # outside the liver only the scanner noise differs; inside, a smooth field of ~15 HU comes on top
    difference = perfused.ct.astype(np.float32) - flat.ct.astype(np.float32)
    smooth = ndimage.uniform_filter(difference, (9, 9, 1))
    noise_only = np.std(smooth[outside & (flat.ct > -200)])
    assert noise_only < 8.0
    assert 2.0 * noise_only < np.std(smooth[ndimage.binary_erosion(liver, iterations=5)]) < 25.0
    with pytest.raises(ValueError, match="perfusion_hu"):
        make_phantom_case(0, size=64, n_slices=8, perfusion_hu=-1.0)


def test_main_cohort_style_options(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--cases", "2", "--size", "48", "--slices", "8", "--normal-fraction", "0"]
    assert main([*args, "--lesion-diameter-mm", "12", "16", "--perfusion-hu", "10"]) == 0
    cohort = json.loads((tmp_path / "phantom.json").read_text())
    assert cohort["lesion_diameter_mm"] == [12.0, 16.0] and cohort["perfusion_hu"] == 10.0
    assert all(12.0 <= lesion["diameter_mm"] <= 16.0 for case in cohort["cases"] for lesion in case["lesions"])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--lesion-diameter-mm", "16", "12"])
    assert exit_info.value.code == 2 and "lesion_diameter_mm" in capsys.readouterr().err
