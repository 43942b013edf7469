"""Benchmark figures (median, min, max, target), the printed table and the JSON output."""

from __future__ import annotations

import operator
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.common.files import atomic_write_json

__all__ = ["Figure", "time_call", "ratio_figure", "format_table", "machine_info", "write_report"]

_COMPARE = {"<=": operator.le, ">=": operator.ge}


@dataclass
class Figure:
    """One reported number: the median of repeated measurements with their min and max.

    ``target`` is ``(comparison, value)`` with comparison ``"<="`` or ``">="``, checked against the median;
    None for figures reported without a target (floors, absolute times).
    """

    name: str
    unit: str
    median: float
    min: float
    max: float
    values: list[float] = field(default_factory=list)
    target: tuple[str, float] | None = None
    note: str = ""

    @classmethod
    def from_values(
        cls,
        name: str,
        unit: str,
        values: Sequence[float],
        target: tuple[str, float] | None = None,
        note: str = "",
    ) -> Figure:
        """The figure of ``values`` (at least one)."""
        if not values:
            raise ValueError(f"figure {name!r} has no measurements.")
        values = [float(v) for v in values]
        return cls(name, unit, statistics.median(values), min(values), max(values), values, target, note)

    @property
    def met(self) -> bool | None:
        """Whether the median meets the target; None without a target."""
        if self.target is None:
            return None
        comparison, value = self.target
        return bool(_COMPARE[comparison](self.median, value))

    def to_json(self) -> dict:
        """Plain JSON values, ``target`` as ``{"comparison", "value"}`` and ``met``."""
        d = asdict(self)
        d["target"] = None if self.target is None else {"comparison": self.target[0], "value": self.target[1]}
        d["met"] = self.met
        return d


def time_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Wall-clock seconds of one call ``fn(*args, **kwargs)`` and its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def ratio_figure(
    name: str,
    numerator: Figure,
    denominator: Figure,
    target: tuple[str, float] | None = None,
    note: str = "",
) -> Figure:
    """``numerator / denominator`` of two figures measured apart (e.g. in two processes): median over median, and
    the range that their spreads allow (min over max, max over min)."""
    return Figure(
        name,
        "x",
        numerator.median / denominator.median,
        numerator.min / denominator.max,
        numerator.max / denominator.min,
        [],
        target,
        note,
    )


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def format_table(figures: Sequence[Figure]) -> str:
    """The figures as a fixed-width text table: figure, median, min, max, unit, target, met?."""
    header = ("figure", "median", "min", "max", "unit", "target", "met?")
    rows = [
        (
            f.name,
            _number(f.median),
            _number(f.min),
            _number(f.max),
            f.unit,
            "-" if f.target is None else f"{f.target[0]} {f.target[1]:g}",
            {None: "-", True: "yes", False: "NO"}[f.met],
        )
        for f in figures
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    rule = "-" * len(lines[0] if lines else "")
    head = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(header, widths)))
    notes = [f"  {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join([head, rule, *lines, *(["notes:", *notes] if notes else [])])


def machine_info() -> dict:
    """Where the figures were measured: they only compare within one machine and one run."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def write_report(path: str | Path, meta: dict, figures: Sequence[Figure], details: dict) -> Path:
    """Write ``{"meta", "figures", "details"}`` as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, {"meta": meta, "figures": [f.to_json() for f in figures], "details": details})
