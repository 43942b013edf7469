"""Where the MONAI Bundle lives, how the pipeline runs it, and which trained bundle ``infer`` uses when none is named.

Kept free of heavy imports: the command line reads it before it loads torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BUNDLE_DIR", "BUNDLE_ENV", "default_bundle", "run_bundle"]

# The bundle shipped with this checkout (configs, docs; models/ once trained with --bundle_root pointing here).
BUNDLE_DIR = Path(__file__).resolve().parents[2] / "bundles" / "liver_ct_anomaly_detection"
# A trained bundle root (or checkpoint) to use when `infer` gets no --bundle, e.g. a lab's shared model.
BUNDLE_ENV = "HEPAFAIR_BUNDLE"


def default_bundle() -> Path | None:
    """``$HEPAFAIR_BUNDLE`` when set, else :data:`BUNDLE_DIR` when it holds trained weights
    (``models/model.pt``), else None."""
    named = os.environ.get(BUNDLE_ENV)
    if named:
        return Path(named)
    return BUNDLE_DIR if (BUNDLE_DIR / "models" / "model.pt").is_file() else None


def run_bundle(run_id: str, configs: Sequence[str], bundle_root: Path, **overrides: object) -> int:
    """Run the bundle through MONAI's own CLI, as a user would (``python -m monai.bundle run ...``)."""
    config_files = [str(BUNDLE_DIR / "configs" / c) for c in configs]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        repr(config_files),
        "--meta_file",
        str(BUNDLE_DIR / "configs" / "metadata.json"),
        "--logging_file",
        str(BUNDLE_DIR / "configs" / "logging.conf"),
        "--bundle_root",
        str(bundle_root),
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    print("  $ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)
