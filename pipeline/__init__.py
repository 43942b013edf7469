"""hepafair's user-facing layer: datasets, prepare, phantom, training/evaluation glue, inference, the CLI.

Submodules load on first attribute access (``pipeline.prepare``), so bundle configs can write
``$import pipeline`` and then ``$pipeline.prepare.load_manifest(...)``, and the CLI stays quick to start.
"""

from __future__ import annotations

import importlib

_SUBMODULES = {
    "baselines",
    "bmad",
    "cli",
    "compare",
    "datasets",
    "evaluation",
    "figures",
    "inference",
    "io",
    "metrics",
    "phantom",
    "prepare",
    "training",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
