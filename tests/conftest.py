"""Shared fixtures and helpers: paths to ../shared/data (skipped when absent), small generated cases, PNG sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the calling test with a clear reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the project's shared real data at {path} (absent on this machine)")
    return path


@pytest.fixture(scope="session")
def tiny_phantom_set(tmp_path_factory) -> Path:
    """One tiny prepared phantom set for the end-to-end tests: ``root/raw`` (4 volumes, 64 px, 24 slices, 2 with
    lesions) and ``root/prepared`` (64 px slices, validation/test split 50/50). Returns ``root``."""
    from pipeline.data.datasets import discover
    from pipeline.data.phantom import write_phantom_cohort
    from pipeline.data.prepare import prepare
    from pipeline.data.settings import PrepareSettings, SplitSettings

    root = tmp_path_factory.mktemp("tiny_phantom_set")
    write_phantom_cohort(root / "raw", n_cases=4, seed=3, size=64, n_slices=24)
    records = discover(root / "raw", label_preset="phantom")
    prepare(records, root / "prepared", PrepareSettings(size=64), SplitSettings(val_fraction=0.5), progress=False)
    return root


@pytest.fixture
def one_thread(monkeypatch):
    """One torch/OpenMP thread here and in the bundle subprocesses: on a shared 2-core machine, busy cores make
    multi-threaded small convolutions tens of times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
