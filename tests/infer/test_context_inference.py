"""2.5D input end to end: inference on a volume shows the network exactly the stacks training loaded from the prepared
slices, and a 2.5D bundle records its context and is used with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.detector import FrequencyAwareDetector
from pipeline.common.io import load_case
from pipeline.data.context import case_slice_mm, with_slice_context
from pipeline.data.loading import slice_loading
from pipeline.data.manifest import load_manifest
from pipeline.data.settings import prepare_settings_from_json, volume_transform
from pipeline.infer.settings import read_inference_settings, write_inference_settings
from pipeline.infer.slices import SliceInferer, slice_spacing_mm
from pipeline.infer.volume import infer_volume
from transforms.context import SliceContext
from transforms.errors import InputDataError


class _Recorder(torch.nn.Module):
    """A stand-in detector that keeps every input batch and answers the middle channel as its map."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x[:, x.shape[1] // 2 :][:, :1]


@pytest.mark.parametrize("context", [SliceContext(1, 3.0), SliceContext(2, 1.0)])
def test_inference_sees_the_stacks_training_loads(tiny_phantom_set: Path, context: SliceContext):
    manifest = load_manifest(tiny_phantom_set / "prepared")
    case = next(c for c in manifest["cases"] if c["split"] == "training")
    info = json.loads((Path(manifest["root"]) / "cases" / case["case_id"] / "case.json").read_text())
    folder = Path(manifest["root"]) / "cases" / case["case_id"]
    entries = [{"image": str(folder / f"s{z:04d}_image.npy"), "label": str(folder / f"s{z:04d}_label.npy"),
                "case_id": case["case_id"], "slice_index": z} for z in (s["slice_index"] for s in info["slices"])]
    loading = slice_loading()
    trained = torch.stack([loading(e)["image"] for e in with_slice_context(entries, manifest["root"], context.slices,
                                                                          context.mm)])

    settings = prepare_settings_from_json(manifest["settings"])
    vol = volume_transform(settings, (1,), (2,))(load_case(case["image"], case["label"], (1,), (2,)))
    recorder = _Recorder()
    liver_slices = np.flatnonzero(np.asarray(vol["liver_voxels"]) > 0)
    assert liver_slices.tolist() == [s["slice_index"] for s in info["slices"]]
    slice_mm = slice_spacing_mm(vol["image"].affine)
    assert slice_mm == pytest.approx(case_slice_mm(info))
    SliceInferer(batch_size=5, context=context).volume(vol["image"].as_tensor()[0], recorder,
                                                       torch.as_tensor(vol["liver"])[0], liver_slices, slice_mm)
    seen = torch.cat(recorder.seen)
    assert seen.shape == trained.shape == (len(liver_slices), context.channels, 64, 64)
    torch.testing.assert_close(seen, trained)
    # and through the MONAI inferer call, which reads the spacing from the MetaTensor's affine
    recorder.seen.clear()
    batch = vol["image"][None]
    SliceInferer(batch_size=5, context=context)(batch, recorder, liver=torch.as_tensor(vol["liver"])[None])
    torch.testing.assert_close(torch.cat(recorder.seen), trained)
    with pytest.raises(ValueError, match="spacing"):
        SliceInferer(context=context).volume(vol["image"].as_tensor()[0], recorder,
                                             torch.as_tensor(vol["liver"])[0], liver_slices)


def test_a_2p5d_bundle_records_its_context_and_infers_with_it(tiny_phantom_set: Path, tmp_path: Path):
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8], "in_channels": 3}
    manifest = load_manifest(tiny_phantom_set / "prepared")
    settings = prepare_settings_from_json(manifest["settings"])
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    detector = FrequencyAwareDetector.from_preset("default", **tiny)
    torch.save(detector.state_dict(), bundle / "models" / "model.pt")
    write_inference_settings(bundle, 0.5, settings, "default", tiny, slice_context={"slices": 1, "mm": 3.0})
    recorded = read_inference_settings(bundle)
    assert recorded["slice_context"] == {"slices": 1, "mm": 3.0}

    case = next(c for c in manifest["cases"] if c["split"] != "training")
    report = infer_volume(case["image"], case["label"], detector.eval(), liver_values=(1,), lesion_values=(2,),
                          settings=settings, threshold=0.5, out_dir=tmp_path / "out",
                          slice_context=recorded["slice_context"])
    assert Path(report["outputs"]["anomaly"]).is_file()
    with pytest.raises(RuntimeError):  # a 3-channel network cannot run on single slices
        infer_volume(case["image"], case["label"], detector.eval(), liver_values=(1,), lesion_values=(2,),
                     settings=settings, threshold=0.5, out_dir=tmp_path / "out2")

    # a context that does not match the network's input channels is refused when inference.json is read
    write_inference_settings(bundle, 0.5, settings, "default", tiny, slice_context={"slices": 2, "mm": 3.0})
    with pytest.raises(InputDataError, match="slice_context"):
        read_inference_settings(bundle)
