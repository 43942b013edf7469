"""Many volumes: ``--workers N`` gives the same bytes as one worker, ``--shard I/N`` + ``--merge`` the same folder as
one run, and a bad case is recorded while the others go on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.common.parallel import map_cases
from pipeline.data.settings import PrepareSettings
from pipeline.data.shards import select_shard
from pipeline.infer.batch import SUMMARY_NAME
from pipeline.infer.settings import write_inference_settings
from tests.infer.test_inference import _bundle_with_random_weights

PREPARE = ["--label-preset", "phantom", "--size", "48", "--val-fraction", "0.5"]


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (the manifest and every case file)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tiny_phantom_set, tmp_path_factory) -> Path:
    """The 4 tiny phantom volumes plus one corrupt case (its CT is not gzip data)."""
    root = tmp_path_factory.mktemp("raw")
    shutil.copytree(tiny_phantom_set / "raw", root, dirs_exist_ok=True)
    (root / "volume-9.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    shutil.copy(root / "segmentation-0.nii.gz", root / "segmentation-9.nii.gz")
    return root


@pytest.fixture(scope="module")
def single(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "prepared"
    assert cli_main(["prepare", "--data", str(raw), "--out", str(out), *PREPARE]) == 1  # the corrupt case fails
    return out


def test_workers_write_the_same_bytes_and_record_the_bad_case(raw, single, tmp_path):
    out = tmp_path / "prepared"
    assert cli_main(["prepare", "--data", str(raw), "--out", str(out), *PREPARE, "--workers", "2"]) == 1
    assert folder_bytes(out) == folder_bytes(single)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["case_id"] for f in manifest["failures"]] == ["volume-9"] and len(manifest["cases"]) == 4


def test_three_shards_merged_equal_one_run(raw, single, tmp_path, capsys):
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    for i, folder in enumerate(shards):
        status = cli_main(["prepare", "--data", str(raw), "--out", str(folder), *PREPARE, "--shard", f"{i}/3"])
        assert status == (1 if i == 1 else 0)  # volume-9, the 5th case by id, is in shard 4 % 3 = 1
        assert (folder / "shard.json").is_file() and not (folder / "manifest.json").exists()
    cases = [json.loads((f / "shard.json").read_text())["cases"] for f in shards]
    assert sorted(sum(cases, [])) == ["volume-0", "volume-1", "volume-2", "volume-3"]
    merged = tmp_path / "merged"
    assert cli_main(["prepare", "--merge", str(merged), *map(str, shards), *PREPARE]) == 1  # one failure kept
    assert folder_bytes(merged) == folder_bytes(single)
    # a missing shard, a shard given twice, a folder that is no shard: clear errors, exit 2
    capsys.readouterr()
    assert cli_main(["prepare", "--merge", str(tmp_path / "m2"), str(shards[0]), str(shards[2])]) == 2
    assert "shards [0, 2] of 3" in capsys.readouterr().err
    assert cli_main(["prepare", "--merge", str(tmp_path / "m3"), str(shards[0]), str(tmp_path)]) == 2
    assert "not a prepared shard" in capsys.readouterr().err


def test_merge_refuses_shards_prepared_with_other_settings(raw, tmp_path, capsys):
    for i, size in enumerate((48, 32)):
        args = ["--label-preset", "phantom", "--size", str(size)]
        cli_main(["prepare", "--data", str(raw), "--out", str(tmp_path / f"s{i}"), *args, "--shard", f"{i}/2"])
    capsys.readouterr()
    assert cli_main(["prepare", "--merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 2
    assert "other settings" in capsys.readouterr().err


def test_select_shard_is_a_stable_partition():
    ids = [f"case{k:02d}" for k in range(10)]
    shards = [select_shard(ids[::-1], i, 3, key=str) for i in range(3)]
    assert sorted(sum(shards, [])) == ids and [len(s) for s in shards] == [4, 3, 3]
    assert shards[0] == ["case00", "case03", "case06", "case09"]


def test_map_cases_keeps_input_order_and_errors(tmp_path):
    # os.stat as the per-case function: a missing file is a case error (OSError), and the spawned workers need not
    # import this test module
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("22")
    items = [str(tmp_path / name) for name in ("a", "missing", "b")]
    for workers in (1, 2):
        results = map_cases(os.stat, items, workers)
        assert [r.st_size if r else None for r, _ in results] == [1, None, 2]
        assert [type(e).__name__ if e else None for _, e in results] == [None, "FileNotFoundError", None]
        with pytest.raises(FileNotFoundError):
            map_cases(os.stat, items, workers, strict=True)


def test_infer_workers_and_shards_give_the_same_outputs(tiny_phantom_set, tmp_path):
    tiny = {"restoration_features": [4, 8], "segmentation_features": [4, 8]}
    torch.manual_seed(0)
    _bundle_with_random_weights(tmp_path / "bundle", wrap=False, **tiny)
    write_inference_settings(tmp_path / "bundle", 0.5, PrepareSettings(field_mm=300.0, size=32), "default", tiny)
    base = ["infer", "--data", str(tiny_phantom_set / "raw"), "--label-preset", "phantom", "--bundle",
            str(tmp_path / "bundle"), "--device", "cpu"]
    assert cli_main([*base, "--out", str(tmp_path / "one")]) == 0
    assert cli_main([*base, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    for shard in ("0/2", "1/2"):
        assert cli_main([*base, "--out", str(tmp_path / "shards"), "--shard", shard]) == 0
    one = json.loads((tmp_path / "one" / SUMMARY_NAME).read_text())
    two = json.loads((tmp_path / "two" / SUMMARY_NAME).read_text())
    assert [r["volume_score"] for r in one["cases"]] == [r["volume_score"] for r in two["cases"]]
    shard_rows = [row for i in range(2) for row in json.loads(
        (tmp_path / "shards" / f"inference_summary.shard-{i}-of-2.json").read_text())["cases"]]
    assert sorted(r["case_id"] for r in shard_rows) == [r["case_id"] for r in one["cases"]]
    import nibabel as nib

    for row in one["cases"]:
        name = f"{row['case_id']}_anomaly.nii.gz"
        expected = np.asarray(nib.load(tmp_path / "one" / name).dataobj)
        for other in ("two", "shards"):
            np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / other / name).dataobj), expected)


@pytest.fixture(scope="module")
def many(tiny_phantom_set, tmp_path_factory) -> Path:
    """60 cases (copies of the 4 tiny volumes under other numbers): enough queued work that an interrupt arrives
    while cases remain, even on a fast idle machine where one tiny case takes a few tens of milliseconds."""
    root = tmp_path_factory.mktemp("many")
    for k in range(60):
        for stem in ("volume", "segmentation"):
            shutil.copy(tiny_phantom_set / "raw" / f"{stem}-{k % 4}.nii.gz", root / f"{stem}-{k}.nii.gz")
    return root


def test_ctrl_c_with_workers_leaves_no_half_case_and_a_rerun_completes(many, tmp_path):
    out, reference = tmp_path / "prepared", tmp_path / "reference"
    command = [sys.executable, "-m", "pipeline", "prepare", "--data", str(many), "--out", str(out), *PREPARE,
               "--workers", "2"]
    # a session of its own, so that the signal reaches the workers too, as a terminal's Ctrl-C does; SIGINT reset to
    # its default in the child, as in a terminal (a shell without job control starts background jobs, e.g. a CI
    # runner's, with SIGINT ignored, and Python then keeps ignoring it)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not any(p.is_dir() and not p.name.startswith(".") for p in (out / "cases").glob("*")):
            assert proc.poll() is None, "prepare ended before the first case folder was seen"
            assert time.monotonic() < deadline, "no case folder appeared within 180 s"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"interrupted" in err and not (out / "manifest.json").exists()
    folders = [p for p in (out / "cases").iterdir() if not p.name.startswith(".")]
    assert 0 < len(folders) < 60 and all((p / "case.json").is_file() for p in folders)  # only complete cases
    assert cli_main(["prepare", "--data", str(many), "--out", str(out), *PREPARE, "--workers", "2"]) == 0
    assert cli_main(["prepare", "--data", str(many), "--out", str(reference), *PREPARE]) == 0
    assert folder_bytes(out) == folder_bytes(reference)
