"""Whole-volume inference: geometry back to the input grid, outputs, threshold choice, detector loading, CLI.

Geometry is tested with stand-in detectors (no training): a "darkness inside the liver" map that peaks on a
hypodense phantom lesion, and an identity map that must give back the windowed CT on the input grid.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import IgniteInfo, min_version, optional_import
from scipy import ndimage

from networks.detector import FrequencyAwareDetector
from pipeline.cli import main as cli_main
from pipeline.common.io import load_case, save_nifti
from pipeline.data.phantom import make_phantom_case
from pipeline.data.settings import PrepareSettings, volume_transform
from pipeline.infer.batch import SUMMARY_NAME
from pipeline.infer.paths import default_case_id
from pipeline.infer.settings import load_detector, read_inference_settings, write_inference_settings
from pipeline.infer.threshold import ThresholdSelector, choose_threshold
from pipeline.infer.volume import infer_volume, to_input_grid
from tests.conftest import shared_path
from transforms.errors import InputDataError

Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

# A small field around the small anisotropic liver below: the crop box (100 x 73 voxels) is wider than the image
# (96 voxels) along x, so pasting back must clip.
# geometry tests: HU as scanned, so that the expected map is the windowed CT itself
SETTINGS = PrepareSettings(field_mm=80.0, size=64, liver_reference_hu=None)
SPACING = (0.8, 1.1, 3.0)
THRESHOLD = 0.2
LAYOUTS = ("RAS", "LPS", "SPL")  # SPL: axes stored transposed (superior first), so the slice axis is axis 0


class DarknessDetector(nn.Module):
    """Stand-in detector: how much darker than the slice's mean liver a pixel is, away from the liver edge.

    In: (B, 1, H, W) in [0, 1], 0 outside the liver. Out: (B, 1, H, W) in [0, 1].
    """

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        inside = (image > 0).float()
        core = 1.0 - F.max_pool2d(1.0 - inside, 7, 1, 3)  # erosion: partial-volume edges are dark too
        smooth = F.avg_pool2d(image, 3, 1, 1)
        mean = (image * core).sum((2, 3), keepdim=True) / core.sum((2, 3), keepdim=True).clamp_min(1.0)
        return ((mean - smooth) / 0.15).clamp(0.0, 1.0) * core


class IdentityDetector(nn.Module):
    """Stand-in detector whose map is the input slice itself."""

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        return image.clone()


def stored_layout(ct: np.ndarray, label: np.ndarray, layout: str, spacing=SPACING):
    """Arrays given in canonical RAS order, as stored in ``layout``, with an affine of ``spacing`` mm."""
    affine = np.eye(4)
    affine[:3, 3] = [12.5, -40.0, 300.0]
    if layout == "RAS":
        affine[:3, :3] = np.diag(spacing)
    elif layout == "LPS":  # x and y reversed: the same anatomy at the same world points
        ct, label = ct[::-1, ::-1], label[::-1, ::-1]
        affine[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
        affine[:3, 3] -= affine[:3, :2] @ (np.array(ct.shape[:2]) - 1.0)
    else:  # SPL: axis 0 superior, 1 posterior, 2 left
        ct, label = ct.transpose(2, 1, 0)[:, ::-1, ::-1], label.transpose(2, 1, 0)[:, ::-1, ::-1]
        affine[:3, :3] = 0.0
        affine[2, 0], affine[1, 1], affine[0, 2] = spacing[2], -spacing[1], -spacing[0]
    return np.ascontiguousarray(ct), np.ascontiguousarray(label), affine


def write_case(folder: Path, name: str, ct: np.ndarray, label: np.ndarray, affine: np.ndarray) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image_path = save_nifti(folder / f"{name}_ct.nii.gz", ct.astype(np.int16), affine)
    label_path = save_nifti(folder / f"{name}_label.nii.gz", label.astype(np.uint8), affine)
    return image_path, label_path


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def phantom():
    case = make_phantom_case(2, size=96, n_slices=16, n_lesions=1, lesion_kinds=("hypo",))
    assert (case.label == 2).sum() > 50, "the geometry tests need a lesion of several voxels per slice"
    return case


@pytest.fixture(scope="module", params=LAYOUTS)
def inferred(request, phantom, tmp_path_factory):
    """The phantom stored in one layout with anisotropic spacing, inferred with the darkness detector."""
    folder = tmp_path_factory.mktemp(f"geometry_{request.param}")
    ct, label, affine = stored_layout(phantom.ct, phantom.label, request.param)
    image_path, label_path = write_case(folder, "case", ct, label, affine)
    report = infer_volume(
        image_path, label_path, DarknessDetector(), liver_values=(1,), lesion_values=(2,), settings=SETTINGS,
        threshold=THRESHOLD, min_lesion_mm3=20.0, out_dir=folder / "out", overlay=request.param == "LPS",
    )
    return {"layout": request.param, "ct": ct, "label": label, "image": image_path, "report": report}


def test_heatmap_is_on_the_input_grid_and_peaks_inside_the_lesion(inferred):
    report, label = inferred["report"], inferred["label"]
    source = nib.load(inferred["image"])
    heat_img = nib.load(report["outputs"]["anomaly"])
    assert heat_img.shape == source.shape == label.shape
    assert np.array_equal(heat_img.affine, source.affine)
    assert heat_img.get_data_dtype() == np.float32
    heat = np.asarray(heat_img.dataobj)
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0.3
    assert np.all(heat[label == 0] == 0.0)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert label[peak] == 2, f"heatmap peak at {peak} lies outside the lesion ({inferred['layout']})"
    assert report["volume_score"] == max(s["score"] for s in report["slices"]) > 0.0


def test_lesion_mask_and_report_agree(inferred):
    report, label = inferred["report"], inferred["label"]
    heat = np.asarray(nib.load(report["outputs"]["anomaly"]).dataobj)
    mask_img = nib.load(report["outputs"]["lesions"])
    mask = np.asarray(mask_img.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1}
    assert np.array_equal(mask_img.affine, nib.load(inferred["image"]).affine)
    assert np.all(heat[mask == 1] >= THRESHOLD)
    assert report["n_lesions"] == len(report["lesions"]) >= 1
    assert mask.sum() == sum(c["voxels"] for c in report["lesions"])
    affine = np.asarray(report["affine"])
    best = report["lesions"][0]
    centre = tuple(int(round(c)) for c in best["centroid_voxel"])
    assert label[centre] == 2, "the top candidate's centroid must lie inside the true lesion"
    np.testing.assert_allclose(best["centroid_mm"], nib.affines.apply_affine(affine, best["centroid_voxel"]))
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    assert best["volume_ml"] == pytest.approx(best["voxels"] * voxel_ml)
    assert best["max_score"] == pytest.approx(float(heat[mask == 1].max()))
    # per-slice entries name native slice indices along the axis that holds the superior direction
    axis = report["slice_axis"]
    assert axis == (0 if inferred["layout"] == "SPL" else 2)
    per_slice = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    assert {s["slice_index"]: s["liver_voxels"] for s in report["slices"]} == {
        int(i): int(n) for i, n in enumerate(per_slice) if n > 0
    }
    # the top candidate is the 3D component holding the mask's highest heatmap value
    components, _ = ndimage.label(mask)
    top = components == components[np.unravel_index(np.argmax(heat * mask), heat.shape)]
    assert best["voxels"] == top.sum()
    top_slices = np.flatnonzero(top.any(axis=tuple(a for a in range(3) if a != axis)))
    assert best["slice_range"] == [top_slices.min(), top_slices.max()]
    if inferred["layout"] == "LPS":
        png = Path(report["outputs"]["overlay"]).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_invertd_puts_roi_maps_back_like_the_direct_computation(phantom, tmp_path):
    """MONAI's Invertd over the prepare Compose (LiverROId.inverse, then Orientationd.inverse) equals, bit for bit, the
    direct inverse on an LPS volume: each ROI slice resampled bilinearly to the crop box, pasted at the box (clipped
    where the 80 mm field leaves the image), then x and y reversed back to LPS; an oracle map (the ROI's own lesion
    mask) lands on the label's lesion voxels."""
    ct, label, affine = stored_layout(phantom.ct, phantom.label, "LPS")
    data = load_case(*write_case(tmp_path, "case", ct, label, affine), liver_values=(1,), lesion_values=(2,))
    transform = volume_transform(SETTINGS, (1,), (2,))
    vol = transform(data)
    assert [op["class"] for op in vol["image"].applied_operations] == ["Orientation", "LiverROId"]
    roi_map = torch.rand(vol["image"].shape[1:], generator=torch.Generator().manual_seed(0))
    back = to_input_grid(transform, vol, roi_map)

    x0, x1, y0, y1 = vol["roi"]["box"]
    assert x0 < 0 or x1 > ct.shape[0], "the test needs a crop box reaching outside the image"
    crop = F.interpolate(roi_map.permute(2, 0, 1)[:, None], size=(x1 - x0, y1 - y0), mode="bilinear",
                         align_corners=False)[:, 0].permute(1, 2, 0).numpy()
    xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    in_x, in_y = (xs >= 0) & (xs < ct.shape[0]), (ys >= 0) & (ys < ct.shape[1])
    ras = np.zeros(ct.shape, np.float32)
    ras[np.ix_(xs[in_x], ys[in_y])] = crop[np.ix_(in_x, in_y)]
    assert back.shape == ct.shape and back.dtype == np.float32 and back.flags.f_contiguous
    np.testing.assert_array_equal(back, ras[::-1, ::-1])

    oracle = to_input_grid(transform, vol, vol["lesion"][0]) >= 0.5
    lesion = label == 2
    assert 2 * (oracle & lesion).sum() / (oracle.sum() + lesion.sum()) > 0.9
    assert np.all(label[oracle] > 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_map_gives_back_the_windowed_ct(layout, tmp_path):
    """A linear HU ramp inside a liver box survives crop, resampling and reorientation to within a small error."""
    shape = (60, 52, 6)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ramp = np.repeat((-150.0 + 4.0 * x + 3.0 * y)[:, :, None], shape[2], axis=2)
    label = np.zeros(shape, np.uint8)
    label[14:58, 6:40, 1:5] = 1  # the 80 mm field (100 voxels) is cut by the image on both x borders
    ct = np.where(label > 0, ramp, -1000.0)
    ct, label, affine = stored_layout(ct, label, layout)
    image_path, label_path = write_case(tmp_path, "ramp", ct, label, affine)
    report = infer_volume(image_path, label_path, IdentityDetector(), liver_values=(1,), settings=SETTINGS,
                          threshold=0.5, out_dir=tmp_path / "out")
    heat = np.asarray(nib.load(report["outputs"]["anomaly"]).dataobj)
    expected = (ct + 200.0) / 450.0
    # away from the liver border, where the ROI's zero background is averaged in
    in_plane = [a for a in range(3) if a != report["slice_axis"]]
    structure = np.zeros((3, 3, 3), bool)
    structure[tuple(slice(None) if a in in_plane else slice(1, 2) for a in range(3))] = True
    core = ndimage.binary_erosion(label > 0, structure, iterations=2)
    error = (heat - expected)[core]
    # One voxel is 4 HU (0.009) along x and 3 HU (0.0067) along y: no shift on average, and under a voxel anywhere
    # (the ROI's area downsampling by a non-integer factor moves single samples by up to a third of a voxel).
    assert core.sum() > 500
    assert abs(error.mean()) < 0.001 and np.abs(error).max() < 0.006, f"{error.mean():.4f} {error.max():.4f}"
    assert np.all(heat[label == 0] == 0.0)


def test_existing_outputs_are_refused_without_overwrite_and_inputs_never_change(phantom, tmp_path):
    ct, label, affine = stored_layout(phantom.ct, phantom.label, "LPS")
    image_path, label_path = write_case(tmp_path, "case", ct, label, affine)
    before = digest(image_path, label_path)
    run = dict(liver_values=(1,), lesion_values=(2,), settings=SETTINGS, threshold=THRESHOLD)
    report = infer_volume(image_path, label_path, DarknessDetector(), out_dir=tmp_path, **run)
    assert report["case_id"] == "case"
    outputs = [Path(p) for p in report["outputs"].values()]
    written = digest(*outputs)
    with pytest.raises(InputDataError) as err:
        infer_volume(image_path, label_path, DarknessDetector(), out_dir=tmp_path, **run)
    assert "already exists" in err.value.problem and "--overwrite" in err.value.fix
    assert digest(*outputs) == written
    infer_volume(image_path, label_path, DarknessDetector(), out_dir=tmp_path, overwrite=True, **run)
    # an output name that is an input file is refused even with overwrite
    clash = tmp_path / "case_lesions.nii.gz"
    label_path.rename(clash)
    with pytest.raises(InputDataError, match="replace one of its input files"):
        infer_volume(image_path, clash, DarknessDetector(), out_dir=tmp_path, overwrite=True, **run)
    assert digest(image_path, clash) == before


def test_missing_label_explains_how_to_give_one(phantom, tmp_path):
    ct, label, affine = stored_layout(phantom.ct, phantom.label, "RAS")
    image_path, _ = write_case(tmp_path, "case", ct, label, affine)
    with pytest.raises(InputDataError) as err:
        infer_volume(image_path, None, DarknessDetector(), liver_values=(1,), settings=SETTINGS,
                     threshold=THRESHOLD, out_dir=tmp_path / "out")
    assert err.value.path == str(image_path)
    assert "--label" in err.value.fix and "--liver-values" in err.value.fix and "--label-preset" in err.value.fix
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_default_case_id():
    assert default_case_id("/data/ircadb_p17_ct.nii.gz") == "ircadb_p17"
    assert default_case_id("volume-3.nii") == "volume-3"
    assert default_case_id("scan_CT.NII.GZ") == "scan"


def test_choose_threshold_uses_liver_pixels_only():
    maps = np.full((2, 1, 8, 8), 0.1, np.float32)
    lesions = np.zeros_like(maps)
    livers = np.zeros_like(maps)
    livers[:, :, 1:7, 1:7] = 1
    lesions[0, 0, 2:4, 2:4] = 1
    maps[0, 0, 2:4, 2:4] = 0.8
    maps[1, 0, 2:4, 3:5] = 0.5  # a weaker false alarm inside the liver
    maps[:, :, 0, :] = 0.95  # outside the liver: never predicted at inference, must not move the threshold
    threshold = choose_threshold(maps, lesions, livers)
    assert 0.5 <= threshold < 0.8
    assert choose_threshold(torch.from_numpy(maps), torch.from_numpy(lesions), torch.from_numpy(livers)) == threshold
    with pytest.raises(ValueError, match="no lesion pixel"):
        choose_threshold(maps, np.zeros_like(maps), livers)


def _run_selector(tmp_path: Path, with_lesion: bool) -> dict:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        liver = torch.zeros(4, 1, 16, 16)
        liver[:, :, 2:14, 2:14] = 1
        lesion = torch.zeros_like(liver)
        if with_lesion:
            lesion[0, :, 5:8, 5:8] = 1
        amap = torch.from_numpy(rng.uniform(0.0, 0.3, liver.shape).astype(np.float32)) + 0.6 * lesion
        batches.append({"map": amap * liver, "liver": liver, "lesion": lesion})
    engine = Engine(lambda engine, batch: batch)
    selector = ThresholdSelector(
        tmp_path / "models" / "inference.json", prepare_settings=SETTINGS.to_json(), width_preset="paper",
        network_overrides={"highpass_order": 1}, sf=15,
    )
    selector.attach(engine)
    engine.run(batches, max_epochs=1)
    return read_inference_settings(tmp_path)


def test_threshold_selector_writes_inference_json(tmp_path):
    (tmp_path / "models").mkdir()
    torch.save({}, tmp_path / "models" / "model.pt")  # read_inference_settings looks next to the weights
    settings = _run_selector(tmp_path, with_lesion=True)
    assert 0.3 <= settings["threshold"] < 0.6
    assert settings["metrics"]["val_dice"] == pytest.approx(1.0)
    assert settings["prepare_settings"] == SETTINGS.to_json()
    assert settings["width_preset"] == "paper" and settings["network"] == {"highpass_order": 1}
    assert settings["metrics"]["n_slices"] == 12 and settings["sf"] == 15
    settings = _run_selector(tmp_path, with_lesion=False)
    assert settings["threshold"] is None and "--threshold" in settings["metrics"]["note"]


def _bundle_with_random_weights(root: Path, wrap: bool, **network) -> FrequencyAwareDetector:
    net = FrequencyAwareDetector.from_preset("default", **network)
    net.set_alpha(0.0)
    (root / "models").mkdir(parents=True)
    torch.save({"model": net.state_dict()} if wrap else net.state_dict(), root / "models" / "model.pt")
    return net


@pytest.mark.parametrize("wrap", [True, False])
def test_load_detector_reads_weights_and_settings(tmp_path, wrap):
    net = _bundle_with_random_weights(tmp_path, wrap, highpass_order=1)
    write_inference_settings(tmp_path, 0.4, SETTINGS, "default", {"highpass_order": 1}, {"val_dice": 0.5})
    detector = load_detector(tmp_path)
    assert detector.output == "anomaly_map" and not detector.training
    assert detector.alpha == 0.0 and detector.highpass.order == 1
    for name, value in net.state_dict().items():
        assert torch.equal(detector.state_dict()[name], value), name
    # the checkpoint file itself works too; weights of another architecture are a clear input error
    assert load_detector(tmp_path / "models" / "model.pt").alpha == 0.0
    with pytest.raises(InputDataError, match="do not fit"):
        load_detector(tmp_path, restoration_features=(8, 16))


def test_real_detector_class_gives_input_shaped_outputs(phantom, tmp_path):
    _bundle_with_random_weights(tmp_path / "bundle", wrap=True)
    detector = load_detector(tmp_path / "bundle")
    case = make_phantom_case(4, size=64, n_slices=6, n_lesions=1, lesion_kinds=("hypo",), orientation="LPS")
    image_path, label_path = write_case(tmp_path, "real", case.ct, case.label, case.affine)
    report = infer_volume(image_path, label_path, detector, liver_values=(1,), lesion_values=(2,),
                          settings=PrepareSettings(size=64), threshold=0.5, out_dir=tmp_path / "out")
    heat = nib.load(report["outputs"]["anomaly"])
    assert heat.shape == case.ct.shape and np.array_equal(heat.affine, nib.load(image_path).affine)
    values = np.asarray(heat.dataobj)
    assert 0.0 <= values.min() and values.max() <= 1.0 and np.all(values[case.label == 0] == 0.0)
    assert nib.load(report["outputs"]["lesions"]).shape == case.ct.shape
    assert len(report["slices"]) == int(np.sum((case.label > 0).any(axis=(0, 1))))


def test_cli_batch_continues_past_a_corrupt_case(phantom, tmp_path, capsys):
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8]}
    _bundle_with_random_weights(tmp_path / "bundle", wrap=False, **tiny)
    write_inference_settings(tmp_path / "bundle", 0.5, PrepareSettings(field_mm=300.0, size=32), "default", tiny)
    case = make_phantom_case(5, size=48, n_slices=4, n_lesions=1, lesion_kinds=("hypo",))
    good_image, good_label = write_case(tmp_path / "data", "good", case.ct, case.label, case.affine)
    bad_image = tmp_path / "data" / "bad_ct.nii.gz"
    bad_image.write_bytes(b"\x1f\x8b this is not gzip data")
    args = ["infer", "--image", str(bad_image), "--label", str(good_label), "--image", str(good_image),
            "--label", str(good_label), "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "out")]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "1 of 2 cases done" in err and "bad" in err
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["n_failed"] == 1 and summary["failed"] == ["bad"]
    rows = {row["case_id"]: row for row in summary["cases"]}
    assert "gzip" in rows["bad"]["error"] and rows["good"]["status"] == "ok"
    assert (tmp_path / "out" / "good_anomaly.nii.gz").is_file() and summary["threshold"] == 0.5
    # --strict stops at the first bad case: the good one is not reached
    assert cli_main([*args[:-1], str(tmp_path / "strict"), "--strict"]) == 2
    assert not (tmp_path / "strict" / "good_report.json").exists()
    # no label at all: the message says how to give one
    assert cli_main(["infer", "--image", str(good_image), "--bundle", str(tmp_path / "bundle"), "--out",
                     str(tmp_path / "nolabel")]) == 2
    assert "--label FILE" in capsys.readouterr().err


def test_cli_seed_ensemble_and_flips(phantom, tmp_path, capsys):
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8]}
    torch.manual_seed(0)  # fixed random weights: their maps must vary enough for a flip to show
    for name in ("a", "b"):
        _bundle_with_random_weights(tmp_path / name, wrap=False, **tiny)
        write_inference_settings(tmp_path / name, 0.5, PrepareSettings(field_mm=300.0, size=32), "default", tiny)
    case = make_phantom_case(5, size=48, n_slices=4, n_lesions=1, lesion_kinds=("hypo",))
    image, label = write_case(tmp_path / "data", "case", case.ct, case.label, case.affine)
    base = ["infer", "--image", str(image), "--label", str(label)]

    def heatmap(out: str, *model: str) -> np.ndarray:
        assert cli_main([*base, *model, "--out", str(tmp_path / out)]) == 0
        return np.asarray(nib.load(tmp_path / out / "case_anomaly.nii.gz").dataobj)

    single = {name: heatmap(name, "--bundle", str(tmp_path / name)) for name in ("a", "b")}
    both = heatmap("ab", "--bundle", str(tmp_path / "a"), "--bundle", str(tmp_path / "b"), "--threshold", "0.5")
    # the ensemble's map is the mean of the two models' maps (one cast to the stored float32 apart)
    assert np.allclose(both, (single["a"] + single["b"]) / 2, atol=1e-5)
    flipped = heatmap("flip", "--bundle", str(tmp_path / "a"), "--tta-flips", "lr", "--threshold", "0.5")
    assert flipped.shape == single["a"].shape and np.abs(flipped - single["a"]).max() > 1e-6
    # the bundles' thresholds were chosen on one model's maps: an ensemble must be given one
    with pytest.raises(SystemExit):
        cli_main([*base, "--bundle", str(tmp_path / "a"), "--bundle", str(tmp_path / "b"),
                  "--out", str(tmp_path / "x")])
    assert "needs --threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*base, "--bundle", str(tmp_path / "a"), "--tta-flips", "diagonal", "--out", str(tmp_path / "y")])
    assert "--tta-flips" in capsys.readouterr().err
    # bundles prepared differently cannot share the slices
    write_inference_settings(tmp_path / "b", 0.5, PrepareSettings(field_mm=300.0, size=64), "default", tiny)
    assert cli_main([*base, "--bundle", str(tmp_path / "a"), "--bundle", str(tmp_path / "b"), "--threshold", "0.5",
                     "--out", str(tmp_path / "z")]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.shared_data
def test_ircadb_patient_17_with_random_weights(tmp_path):
    image = shared_path("ircadb", "ircadb_p17_ct.nii.gz")
    label = shared_path("ircadb", "ircadb_p17_label_liver1_tumor2.nii.gz")
    torch.manual_seed(0)
    detector = FrequencyAwareDetector.from_preset("default", output="anomaly_map").eval()
    start = time.perf_counter()
    report = infer_volume(image, label, detector, liver_values=(1,), lesion_values=(2,),
                          settings=PrepareSettings(size=128), threshold=0.5, out_dir=tmp_path, overlay=True)
    seconds = time.perf_counter() - start
    print(f"\nIRCADb patient 17, random-weight default detector at 128 px: {seconds:.1f} s wall, {report['timings_s']}")
    source = nib.load(image)
    heat = nib.load(report["outputs"]["anomaly"])
    assert heat.shape == source.shape and np.array_equal(heat.affine, source.affine)
    assert nib.load(report["outputs"]["lesions"]).shape == source.shape
    assert len(report["slices"]) == 113  # the liver slices of patient 17 (data README)
    assert report["case_id"] == "ircadb_p17"


def test_inference_scores_slices_with_the_bundles_sf(phantom, tmp_path):
    """The slice scores use the mean-filter size training recorded in inference.json, not a constant."""
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8]}
    torch.manual_seed(0)
    case = make_phantom_case(5, size=48, n_slices=4, n_lesions=1, lesion_kinds=("hypo",))
    image, label = write_case(tmp_path / "data", "case", case.ct, case.label, case.affine)
    scores = {}
    for sf in (3, 21):
        bundle = tmp_path / f"bundle{sf}"
        _bundle_with_random_weights(bundle, wrap=False, **tiny)
        write_inference_settings(bundle, 0.5, PrepareSettings(field_mm=300.0, size=32), "default", tiny, sf=sf)
        if sf == 21:  # the same weights for both
            torch.save(torch.load(tmp_path / "bundle3" / "models" / "model.pt"), bundle / "models" / "model.pt")
        assert cli_main(["infer", "-i", str(image), "-l", str(label), "-b", str(bundle), "-o",
                         str(tmp_path / f"out{sf}"), "--device", "cpu"]) == 0
        report = json.loads((tmp_path / f"out{sf}" / "case_report.json").read_text())
        assert report["slice_score_sf"] == sf
        scores[sf] = [s["score"] for s in report["slices"]]
    # a wider mean filter averages the peak with more of its surroundings: lower maxima
    assert all(wide <= narrow + 1e-6 for narrow, wide in zip(scores[3], scores[21])) and scores[3] != scores[21]
    bad = tmp_path / "bundle3" / "models" / "inference.json"
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "sf": 4}))
    with pytest.raises(InputDataError, match="sf must be a positive odd integer"):
        read_inference_settings(tmp_path / "bundle3")


def test_an_older_inference_json_names_the_width_preset_preset():
    from pipeline.infer.settings import recorded_width_preset

    assert recorded_width_preset({"preset": "paper"}) == "paper"  # written before the rename to width_preset
    assert recorded_width_preset({"width_preset": "default"}) == "default"
    assert recorded_width_preset({}) is None
