"""Where the MONAI Bundle lives, and which trained bundle ``infer`` uses when none is named.

Kept free of heavy imports: the command line reads it before it loads torch.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLE_DIR", "BUNDLE_ENV", "default_bundle"]

# The bundle shipped with this checkout (configs, docs; models/ once trained with --bundle_root pointing here).
BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundles" / "liver_ct_anomaly_detection"
# A trained bundle root (or checkpoint) to use when `infer` gets no --bundle, e.g. a lab's shared model.
BUNDLE_ENV = "HEPAFAIR_BUNDLE"


def default_bundle() -> Path | None:
    """``$HEPAFAIR_BUNDLE`` when set, else :data:`BUNDLE_DIR` when it holds trained weights
    (``models/model.pt``), else None."""
    named = os.environ.get(BUNDLE_ENV)
    if named:
        return Path(named)
    return BUNDLE_DIR if (BUNDLE_DIR / "models" / "model.pt").is_file() else None
