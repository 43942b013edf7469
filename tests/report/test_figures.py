"""Figures: ROC curves, the synthesis grid and the inference grid as PNG files of the expected size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from networks import FrequencyAwareDetector
from pipeline.cli import main as cli_main
from pipeline.infer.settings import write_inference_settings
from pipeline.report import figures
from tests.conftest import png_size
from transforms.errors import InputDataError

pytestmark = pytest.mark.usefixtures("one_thread")


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    width = columns * figures.PANEL_INCHES * figures.DPI
    height = (rows * figures.PANEL_INCHES + figures.TITLE_INCHES) * figures.DPI
    return round(width), round(height)


@pytest.fixture(scope="module")
def prepared(tiny_phantom_set: Path) -> Path:
    return tiny_phantom_set / "prepared"


def bundle_with(root: Path, **network_overrides) -> Path:
    """A bundle root with untrained weights of the detector built with ``network_overrides`` (and inference.json)."""
    detector = FrequencyAwareDetector.from_preset("default", **network_overrides)
    (root / "models").mkdir(parents=True)
    torch.save(detector.state_dict(), root / "models" / "model.pt")
    write_inference_settings(root, None, None, "default", network_overrides)
    return root


def test_roc_figure(tmp_path: Path):
    curves = {"full": {"fpr": [0, 0.2, 1], "tpr": [0, 0.7, 1], "auroc": 0.81}, "DRAEM": {"fpr": [0, 1], "tpr": [0, 1]}}
    out = figures.roc_figure(curves, tmp_path / "sub" / "roc.png", baselines={"darkness": curves["full"]})
    assert out == tmp_path / "sub" / "roc.png"
    side = round(figures.ROC_INCHES * figures.DPI)
    assert png_size(out) == (side, side)


def test_synthesis_grid_size_and_seed(tmp_path: Path, prepared: Path):
    a = figures.synthesis_grid(prepared, tmp_path / "a.png", n=3, seed=1)
    b = figures.synthesis_grid(prepared, tmp_path / "b.png", n=3, seed=1)
    c = figures.synthesis_grid(prepared, tmp_path / "c.png", n=3, seed=2)
    assert png_size(a) == grid_size(3, 4)
    assert a.read_bytes() == b.read_bytes()  # the slice choice and the synthesis follow the seed
    assert a.read_bytes() != c.read_bytes()


def test_synthesis_grid_shows_lesion_like_anomalies(tmp_path: Path, prepared: Path):
    paper = figures.synthesis_grid(prepared, tmp_path / "paper.png", n=2, seed=1)
    lesion = figures.synthesis_grid(prepared, tmp_path / "lesion.png", n=2, seed=1, lesion_like_fraction=1.0)
    assert png_size(lesion) == grid_size(2, 4) and lesion.read_bytes() != paper.read_bytes()


def test_synthesis_grid_with_an_image_folder_source(tmp_path: Path, prepared: Path):
    import SimpleITK as sitk

    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        image = sitk.GetImageFromArray((rng.random((40, 48)) * 255).astype(np.uint8))
        sitk.WriteImage(image, str(source / f"img{k}.png"))
    out = figures.synthesis_grid(prepared, tmp_path / "grid.png", n=2, source=source)
    assert png_size(out) == grid_size(2, 4)


@pytest.mark.parametrize("overrides", [{}, {"segmentation_features": None}, {"restoration_features": None}])
def test_inference_grid_for_full_and_partial_models(tmp_path: Path, prepared: Path, overrides: dict):
    bundle = bundle_with(tmp_path / "bundle", **overrides)
    out = figures.inference_grid(bundle, prepared, tmp_path / "inference.png", split="validation", n=4)
    width, height = png_size(out)
    rows = (height - round(figures.TITLE_INCHES * figures.DPI)) // round(figures.PANEL_INCHES * figures.DPI)
    assert 1 <= rows <= 4 and (width, height) == grid_size(rows, 5)


def test_lesion_slices_are_largest_first_and_apart():
    entries = [
        {"case_id": "a", "slice_index": z, "has_lesion": area > 0, "lesion_area": area}
        for z, area in enumerate([0, 5, 40, 50, 45, 0, 0, 30])
    ] + [{"case_id": "b", "slice_index": 3, "has_lesion": True, "lesion_area": 35}]
    chosen = figures._lesion_slices(entries, n=3)
    assert [(e["case_id"], e["slice_index"]) for e in chosen] == [("a", 3), ("b", 3), ("a", 7)]


def test_panels_are_radiological():
    """The patient's right-anterior corner of a RAS slice (largest X and Y) is drawn top-left, anterior up."""
    slice_xy = np.zeros((8, 6))
    slice_xy[-1, -1] = 1.0
    _, axes = figures._grid(1, ("x",))
    figures._show(axes[0, 0], slice_xy)
    drawn = np.asarray(axes[0, 0].images[0].get_array())
    assert drawn.shape == (6, 8) and drawn[0, 0] == 1.0 and drawn.sum() == 1.0


def test_figures_cli(tmp_path: Path, prepared: Path):
    out = tmp_path / "figs"
    assert cli_main(["figures", "--data", str(prepared), "--out", str(out), "--n", "2"]) == 0
    assert png_size(out / "synthesis.png") == grid_size(2, 4) and not (out / "inference.png").exists()
    bundle = bundle_with(tmp_path / "bundle")
    args = ["figures", "--data", str(prepared), "--out", str(out), "--n", "2", "--bundle", str(bundle)]
    assert cli_main([*args, "--split", "validation"]) == 0
    assert png_size(out / "inference.png") == grid_size(2, 5)
    # no weights: a clear error, exit status 2
    (tmp_path / "empty").mkdir()
    assert cli_main([*args[:-1], str(tmp_path / "empty")]) == 2


def test_inference_grid_needs_lesion_slices(tmp_path: Path, prepared: Path):
    bundle = bundle_with(tmp_path / "bundle")
    with pytest.raises(InputDataError, match="no lesion slice"):
        figures.inference_grid(bundle, prepared, tmp_path / "x.png", split="training")
