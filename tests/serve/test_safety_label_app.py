"""Safety of the MONAI Label app against a real loopback server (issue: safety, items 3, 4 and 10): the liver label
is never read from the tag that clients submit results to, a request can name datastore ids only (never a path on
the server's disk), and bad requests are answered 4xx before any inference runs.

The server runs in the label environment (``make label-env``) as in tests/serve/test_monailabel.py, serving the darkness
baseline so that the geometry is deterministic.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.common.io import save_nifti
from tests.serve.test_monailabel import (
    APP,
    MODEL,
    START_TIMEOUT_S,
    free_port,
    http,
    label_environment,
    stop,
)
from tests.serve.test_monailabel import bundle_root as bundle_root  # noqa: F401  (pytest fixtures)
from tests.serve.test_monailabel import case as case  # noqa: F401

pytestmark = pytest.mark.slow

SECRET = "SERVER-SIDE-SECRET-1234"


def start_server(root: Path, studies: Path, bundle: Path, *conf: str) -> tuple[subprocess.Popen, str, Path]:
    """A MONAI Label server on loopback with the app copy in ``root``; returns (process, base url, log path)."""
    python = label_environment()
    app = shutil.copytree(APP, root / "app", ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    command = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "bundle", str(bundle), "--conf", "detector", "darkness", "--conf", "device", "cpu",
               "--conf", "min_lesion_mm3", "500", *conf, "--host", "127.0.0.1", "--port", str(port)]
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def wait_until_up(proc: subprocess.Popen, base: str, log_path: Path) -> bool:
    """True when /info/ answers 200; False when the process exited first."""
    started = time.perf_counter()
    while time.perf_counter() - started < START_TIMEOUT_S and proc.poll() is None:
        try:
            status, _ = http(f"{base}/info/", timeout=5)
        except OSError:
            time.sleep(1.0)
            continue
        if status == 200:
            return True
        time.sleep(1.0)
    if proc.poll() is None:
        pytest.fail(f"server neither up nor exited after {START_TIMEOUT_S} s; log:\n{log_path.read_text()[-4000:]}")
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory, case, bundle_root) -> Iterator[dict]:  # noqa: F811
    """Studies: ``case`` with its liver label under ``liver`` and a decoy under ``final`` (as if a user had submitted
    a returned lesion mask); ``final_only`` with its liver label under ``final`` only. A secret file elsewhere on the
    server's disk."""
    root = tmp_path_factory.mktemp("label_safety")
    studies = root / "studies"
    for tag in ("liver", "final"):
        (studies / "labels" / tag).mkdir(parents=True)
    shutil.copy(case["ct_path"], studies / "case.nii.gz")
    shutil.copy(case["label_path"], studies / "labels" / "liver" / "case.nii.gz")
    decoy = np.zeros(case["label"].shape, dtype=np.uint8)
    decoy[:4, :4, :2] = 1  # a tiny "lesion mask" in a corner: read as the liver, it would hide the lesion
    save_nifti(studies / "labels" / "final" / "case.nii.gz", decoy, case["affine"])
    shutil.copy(case["ct_path"], studies / "final_only.nii.gz")
    shutil.copy(case["label_path"], studies / "labels" / "final" / "final_only.nii.gz")
    secret = root / "secret.nii.gz"
    secret.write_text(SECRET)
    proc, base, log_path = start_server(root, studies, bundle_root)
    try:
        if not wait_until_up(proc, base, log_path):
            pytest.fail(f"server exited {proc.poll()}; log:\n{log_path.read_text()[-4000:]}")
        yield {"url": base, "secret": secret, "ct": Path(case["ct_path"]), "label": Path(case["label_path"])}
    finally:
        stop(proc)


def post(server: dict, model: str = MODEL, query: dict | None = None, params: str = "{}",
         files: dict[str, Path] | None = None) -> tuple[int, bytes]:
    """``POST /infer/<model>?<query>`` with a multipart body: the raw ``params`` text and optional files."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{params}\r\n'.encode()]
    for field, path in (files or {}).items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    url = f"{server['url']}/infer/{model}?" + urllib.parse.urlencode({"output": "json", **(query or {})})
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_liver_label_comes_from_the_liver_tag_never_from_final(server):
    """Item 3: the decoy under ``final`` is ignored; the result equals the one with the liver label uploaded."""
    status, body = post(server, query={"image": "case"})
    assert status == 200, body[-2000:]
    from_store = json.loads(body)
    status, body = post(server, files={"file": server["ct"], "label": server["label"]})
    assert status == 200, body[-2000:]
    uploaded = json.loads(body)
    assert from_store["n_lesions"] == uploaded["n_lesions"] >= 1
    assert from_store["volume_score"] == pytest.approx(uploaded["volume_score"])
    status, body = post(server, query={"image": "final_only"})
    assert status == 422 and "no liver label" in json.loads(body)["detail"]


# (query, params, what the answer must say): every row names something outside the datastore
SERVER_PATH_REQUESTS = [
    ({"image": "{secret}"}, "{}", "not an image id of this datastore"),
    ({"image": "{ct}"}, "{}", "not an image id of this datastore"),
    ({"image": "../secret"}, "{}", "not an image id of this datastore"),
    ({"image": "case"}, '{"label": "{secret}"}', "label must be a file uploaded with the request"),
    ({"image": "case"}, '{"label": "{label}"}', "label must be a file uploaded with the request"),
    ({"image": "case"}, '{"image": "{secret}"}', "not an image id of this datastore"),
]


@pytest.mark.parametrize("query, params, message", SERVER_PATH_REQUESTS)
def test_requests_cannot_name_server_paths(query, params, message, server):
    """Item 4: 422 with a message that names the rule; nothing of the file's content comes back."""
    paths = {"{secret}": str(server["secret"]), "{ct}": str(server["ct"]), "{label}": str(server["label"])}
    for key, value in paths.items():
        query = {k: v.replace(key, value) for k, v in query.items()}
        params = params.replace(key, value)
    status, body = post(server, query=query, params=params)
    assert status == 422, body[-2000:]
    assert message in json.loads(body)["detail"]
    assert SECRET.encode() not in body


@pytest.mark.parametrize("model, params, status_code, message", [
    ("no_such_model", "{}", 404, "no model 'no_such_model'"),
    (MODEL, "{not json", 422, "params is not valid JSON"),
    (MODEL, '{"threshold": "nan"}', 422, "threshold must be a number in [0, 1]"),
    (MODEL, '{"threshold": "abc"}', 422, "threshold must be a number in [0, 1]"),
    (MODEL, '{"threshold": 5}', 422, "threshold must be a number in [0, 1]"),
    (MODEL, '{"label_preset": "nosuch"}', 422, "unknown label preset"),
])
def test_bad_requests_are_client_errors_before_inference(model, params, status_code, message, server):
    """Item 10: 4xx with a clear message, answered before the inference would run (well under its run time)."""
    started = time.perf_counter()
    status, body = post(server, model=model, query={"image": "case"}, params=params)
    assert status == status_code, body[-2000:]
    assert message in json.loads(body)["detail"]
    assert time.perf_counter() - started < 20


def test_liver_label_tag_final_is_refused_at_start(tmp_path, bundle_root):  # noqa: F811
    """Item 3: a server told to read the liver label from ``final`` does not start, and says why."""
    studies = tmp_path / "studies"
    studies.mkdir()
    proc, base, log_path = start_server(tmp_path, studies, bundle_root, "--conf", "liver_label_tag", "final")
    try:
        up = wait_until_up(proc, base, log_path)
        if up:  # MONAI Label may keep serving with a failed app: then every request must fail
            status, body = http(f"{base}/info/", timeout=30)
            assert status >= 400 or "models" not in json.loads(body), body[-2000:]
        assert "keep the liver label under its own tag" in log_path.read_text()
    finally:
        stop(proc)


def test_mask_geometry_is_unchanged_for_a_datastore_image(server, case, tmp_path):  # noqa: F811
    """The safety checks leave the normal path as it was: a datastore id gives the lesion mask on the CT's grid."""
    status, body = post(server, query={"image": "case", "output": "image"})
    assert status == 200, body[-2000:]
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(body)
    image = nib.load(path)
    assert image.shape == case["ct"].shape
    np.testing.assert_allclose(image.affine, case["affine"], atol=1e-4)
