"""hepafair's user-facing layer: datasets, prepare, phantom, training/evaluation glue, inference, the CLI.

Submodules load on first attribute access (``pipeline.prepare``), so bundle configs can write
``$import pipeline`` and then ``$pipeline.prepare.load_manifest(...)``, and the CLI stays quick to start.
"""

from __future__ import annotations

import importlib

_SUBMODULES = {
    "arguments",
    "baselines",
    "bmad",
    "bundle",
    "cli",
    "compare",
    "datasets",
    "dicom",
    "evaluation",
    "figures",
    "inference",
    "io",
    "metrics",
    "parallel",
    "phantom",
    "prepare",
    "shards",
    "training",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
