"""Serving the detector: a real MONAI Label server with the app in pipeline/serve, MONAI Label's own
`BundleInferTask` on the bundle's configs/inference.yaml, and the bundle's own `run`.

MONAI Label lives in its own environment (.venv-label, `make label-env`; its pins clash with the project's), so
the server runs there as a subprocess while this test runs in the project's environment. The test builds that
environment when it is absent (once: the make target is stamped) and skips, saying why, only if the build fails.

The served detector is the darkness baseline (``--conf detector darkness``: anomaly map = 1 - windowed CT inside the
liver), because untrained weights find nothing: it marks a hypodense phantom lesion deterministically, so what is
tested is the serving path (datastore, liver label lookup, upload, errors) and the geometry back to the input grid,
not learned weights. Everything else comes from a bundle root as training leaves it (weights, inference.json).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from networks.detector import FrequencyAwareDetector
from pipeline.common.io import save_nifti
from pipeline.data.phantom import make_phantom_case
from pipeline.data.settings import PrepareSettings
from pipeline.infer.settings import load_detector, write_inference_settings
from pipeline.infer.volume import infer_volume

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "pipeline" / "serve"
BUNDLE = REPO / "bundles" / "liver_ct_anomaly_detection"
LABEL_PYTHON = REPO / ".venv-label" / "bin" / "python"
MODEL = "liver_ct_anomaly_detection"
SETTINGS = PrepareSettings(size=64, liver_reference_hu=None)  # darkness_threshold reads HU as scanned
MIN_LESION_MM3 = 500.0  # drops the few-voxel noise blobs of the darkness map
BUILD_TIMEOUT_S = 1800
START_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def label_environment() -> Path:
    """The label environment's python, built by `make label-env` when absent; skip (saying why) if that fails."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(["make", "label-env"], cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the MONAI Label environment could not be built: `make label-env` did not finish ({exc}).")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        pytest.skip(f"the MONAI Label environment could not be built: `make label-env` exited {proc.returncode} "
                    f"after {time.perf_counter() - start:.0f} s:\n{tail}")
    assert LABEL_PYTHON.is_file(), "`make label-env` succeeded but left no .venv-label/bin/python"
    return LABEL_PYTHON


def darkness_threshold(ct: np.ndarray, label: np.ndarray) -> float:
    """The darkness-map value halfway between the phantom's liver and lesion intensities (median HU)."""
    low, high = SETTINGS.hu_window
    middle_hu = (np.median(ct[label == 1]) + np.median(ct[label == 2])) / 2.0
    return float(1.0 - (middle_hu - low) / (high - low))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, files: dict[str, Path] | None = None, timeout: float = 300.0) -> tuple[int, bytes]:
    """``(status, body)`` of a GET, or of a multipart POST of ``files`` (form field -> file) when given."""
    data, headers = None, {}
    if files is not None:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n'.encode()]
        for field, path in files.items():
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            parts.append(head.encode() + path.read_bytes() + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if files is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (uvicorn and anything it started), then kill what is left."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A phantom CT with one hypodense lesion and its label map (0 background, 1 liver, 2 lesion) as NIfTI."""
    folder = tmp_path_factory.mktemp("case")
    phantom = make_phantom_case(2, size=96, n_slices=16, n_lesions=1, lesion_kinds=("hypo",))
    assert (phantom.label == 2).sum() > 50, "the test needs a lesion of several voxels per slice"
    return {
        "ct": phantom.ct,
        "label": phantom.label,
        "affine": phantom.affine,
        "ct_path": save_nifti(folder / "case_ct.nii.gz", phantom.ct, phantom.affine),
        "label_path": save_nifti(folder / "case_label.nii.gz", phantom.label, phantom.affine),
        "threshold": darkness_threshold(phantom.ct, phantom.label),
    }


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory, case) -> Path:
    """A bundle root as training leaves it: default-preset weights and models/inference.json (64-pixel slices)."""
    root = tmp_path_factory.mktemp("bundle_root")
    (root / "models").mkdir()
    torch.save(FrequencyAwareDetector.from_preset("default", output="anomaly_map").state_dict(),
               root / "models" / "model.pt")
    write_inference_settings(root, case["threshold"], SETTINGS, "default")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, case, bundle_root) -> Iterator[dict]:
    """A MONAI Label server on loopback serving the darkness baseline; its studies hold the case twice: ``case``
    with its label map as the ``liver`` label, ``unlabelled`` without one."""
    python = label_environment()
    root = tmp_path_factory.mktemp("label_server")
    studies = root / "studies"
    (studies / "labels" / "liver").mkdir(parents=True)
    shutil.copy(case["ct_path"], studies / "case.nii.gz")
    shutil.copy(case["label_path"], studies / "labels" / "liver" / "case.nii.gz")
    shutil.copy(case["ct_path"], studies / "unlabelled.nii.gz")
    # MONAI Label writes model/, lib/, logs/ and bin/ into the app folder: serve a copy, keep the source tree clean
    app = shutil.copytree(APP, root / "app", ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    command = [
        str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
        "--conf", "bundle", str(bundle_root), "--conf", "detector", "darkness", "--conf", "device", "cpu",
        "--conf", "min_lesion_mm3", str(MIN_LESION_MM3), "--host", "127.0.0.1", "--port", str(port),
    ]
    log_path = root / "server.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        info = None
        while time.perf_counter() - started < START_TIMEOUT_S and proc.poll() is None:
            try:
                status, body = http(f"{base}/info/", timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
                continue
            if status == 200:
                info = json.loads(body)
                break
            time.sleep(1.0)
        if info is None:
            pytest.fail(f"server not up after {time.perf_counter() - started:.0f} s (exit code {proc.poll()}); "
                        f"log:\n{log_path.read_text()[-4000:]}")
        yield {"url": base, "info": info}
    finally:
        stop(proc)


def infer(server: dict, image_id: str = "", files: dict[str, Path] | None = None, output: str = "image"):
    """``(status, body)`` of ``POST /infer/<model>`` for a datastore ``image_id`` and/or uploaded ``files``."""
    url = f"{server['url']}/infer/{MODEL}?output={output}" + (f"&image={image_id}" if image_id else "")
    return http(url, files or {})


def read_mask(body: bytes, folder: Path, name: str) -> nib.Nifti1Image:
    path = folder / f"{name}.nii.gz"
    path.write_bytes(body)
    return nib.load(path)


def test_info_lists_the_lesion_model(server):
    model = server["info"]["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["labels"] == {"lesion": 1}
    assert model["dimension"] == 3
    assert model["config"]["label_preset"] == "lits"


def test_datastore_image_gives_the_lesion_mask_on_the_input_grid(server, case, tmp_path):
    status, body = infer(server, "case")
    assert status == 200, body[-2000:]
    image = read_mask(body, tmp_path, "datastore")
    mask = np.asarray(image.dataobj)
    assert mask.shape == case["ct"].shape
    assert mask.dtype == np.uint8
    np.testing.assert_allclose(image.affine, case["affine"], atol=1e-4)
    assert set(np.unique(mask)) <= {0, 1}
    lesion, liver = case["label"] == 2, case["label"] > 0
    marked = mask > 0
    assert (marked & lesion).sum() > 0, "the lesion is not marked"
    assert (marked & ~liver).sum() == 0, "voxels outside the liver are marked"
    # the mask is enriched in the lesion, not spread over the liver: most of the lesion, a small share of the rest
    lesion_share = (marked & lesion).sum() / lesion.sum()
    liver_share = (marked & liver & ~lesion).sum() / (liver & ~lesion).sum()
    assert lesion_share > 0.5 and lesion_share > 5 * liver_share, (lesion_share, liver_share)


def test_uploaded_image_and_label_give_the_same_mask(server, case, tmp_path):
    status, body = infer(server, files={"file": case["ct_path"], "label": case["label_path"]})
    assert status == 200, body[-2000:]
    uploaded = np.asarray(read_mask(body, tmp_path, "uploaded").dataobj)
    status, body = infer(server, "case")
    assert status == 200, body[-2000:]
    np.testing.assert_array_equal(uploaded, np.asarray(read_mask(body, tmp_path, "datastore").dataobj))


def test_json_output_is_the_inference_report(server, case):
    status, body = infer(server, "case", output="json")
    assert status == 200, body[-2000:]
    report = json.loads(body)
    assert report["label_names"] == {"lesion": 1}
    assert report["shape"] == list(case["ct"].shape)
    assert report["n_lesions"] >= 1 and report["detector"] == "DarknessBaseline"
    assert "outputs" not in report, "the server's temporary paths must not leak into the result"


def test_missing_liver_label_is_a_clear_client_error(server):
    status, body = infer(server, "unlabelled")
    assert status == 422, body[-2000:]
    detail = json.loads(body)["detail"]
    assert "no liver label" in detail
    assert "labels/liver/<id>.nii.gz" in detail and "label=@" in detail, detail


def test_bundle_run_infers_a_volume(case, bundle_root, tmp_path):
    """`python -m monai.bundle run` with configs/inference.yaml writes the lesion mask and report on the input's
    grid, with the bundle's threshold (the project's environment, no MONAI Label)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
               "--bundle_root", str(bundle_root), "--image", str(case["ct_path"]), "--label", str(case["label_path"]),
               "--output_dir", str(out)]
    proc = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mask = nib.load(out / "case_lesions.nii.gz")
    assert mask.shape == case["ct"].shape
    np.testing.assert_allclose(mask.affine, case["affine"], atol=1e-4)
    report = json.loads((out / "case_report.json").read_text())
    assert report["threshold"] == pytest.approx(case["threshold"])
    assert report["detector"] == "FrequencyAwareDetector"


def test_bundle_run_arguments_leave_out_what_is_not_given():
    """A null label is left out (so inference says a liver label is needed, rather than reading a file "None");
    a threshold given overrides the bundle's."""
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    parser.update({"image": "ct.nii.gz", "device": "$torch.device('cpu')"})
    argv = parser.get_parsed_content("infer_argv")
    assert argv[:2] == ["--image", "ct.nii.gz"] and "--label" not in argv and "--threshold" not in argv
    assert "--strict" in argv
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.yaml")
    parser.update({"image": "ct.nii.gz", "label": "liver.nii.gz", "threshold": 0.25, "label_preset": "btcv"})
    argv = parser.get_parsed_content("infer_argv")
    for flag, value in (("--label", "liver.nii.gz"), ("--threshold", "0.25"), ("--label-preset", "btcv")):
        assert argv[argv.index(flag) + 1] == value


# Run in the label environment: MONAI Label's BundleInferTask built as its `monaibundle` sample app builds it (path and
# conf only: type, filters and the appended Restored step are its defaults), called with the liver label as an extra
# request key, as MONAI Label's /infer endpoint passes an uploaded `label` file.
BUNDLE_TASK = """
import json, shutil, sys
from monailabel.tasks.infer.bundle import BundleInferTask
bundle, named_detection, image, label, out = sys.argv[1:6]
task = BundleInferTask(bundle, {})
result, params = task({"image": image, "label": label, "device": "cpu"})
shutil.copy(result, out)
try:
    task({"image": image, "device": "cpu"})
    missing = ""
except Exception as exc:
    missing = str(exc)
kind = lambda t: getattr(t.type, "value", t.type)
print(json.dumps({"type": kind(task), "labels": task.labels, "dimension": task.dimension, "missing_label": missing,
                  "named_detection": kind(BundleInferTask(named_detection, {}))}))
"""


def test_bundle_infer_task_gives_the_cli_heatmap(case, bundle_root, tmp_path):
    """MONAI Label's BundleInferTask loads configs/inference.yaml (preprocessing, inferer, postprocessing without
    SaveImaged, its own Restored and writer, network_def + models/model.pt) and writes exactly the heatmap of
    `python -m pipeline infer` on the input grid. It hands SliceInferer only the image, so the ROI liver is the image's
    nonzero pixels (equal to the ROI liver mask here); the liver label comes in as the request's `label`, and without
    one the project's explanation comes back. A bundle folder named *detection* is taken for a detection model."""
    python = label_environment()
    bundle = tmp_path / "model" / "liver_ct_anomaly"  # where the monaibundle app looks: <app>/model/<name>
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    shutil.copytree(bundle_root / "models", bundle / "models")
    named_detection = tmp_path / "model" / MODEL
    named_detection.symlink_to(bundle, target_is_directory=True)
    served = tmp_path / "bundle_task_anomaly.nii.gz"
    command = [str(python), "-c", BUNDLE_TASK, str(bundle), str(named_detection), str(case["ct_path"]),
               str(case["label_path"]), str(served)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    task = json.loads(proc.stdout.strip().splitlines()[-1])
    assert task["type"] == "segmentation" and task["labels"] == {"anomaly": 0}
    assert task["dimension"] == 2  # metadata.json's network input: one 256 x 256 slice
    assert "no liver label given" in task["missing_label"], task["missing_label"]
    assert task["named_detection"] == "detection"

    report = infer_volume(case["ct_path"], case["label_path"], load_detector(bundle_root), liver_values=(1,),
                          lesion_values=(2,), settings=SETTINGS, threshold=case["threshold"], out_dir=tmp_path / "cli",
                          device="cpu")
    cli, ours = nib.load(report["outputs"]["anomaly"]), nib.load(served)
    expected, got = np.asarray(cli.dataobj), np.asarray(ours.dataobj)
    assert got.dtype == expected.dtype == np.float32 and got.shape == expected.shape == case["ct"].shape
    assert np.array_equal(got, expected) and expected.max() > 0, np.abs(got - expected).max()
    np.testing.assert_allclose(ours.affine, cli.affine, atol=1e-4)
