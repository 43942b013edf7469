"""Learning curves as files: ``curve.json`` and ``curve.csv`` after every validation (:class:`ValidationCurve`)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from networks.scoring import DEFAULT_SF
from pipeline.common.files import atomic_write_bytes, atomic_write_json
from pipeline.evaluate.baselines import baseline_report
from pipeline.train.runtime import is_rank_zero
from pipeline.train.validation import SyntheticAnomalyAUROC, validation_due
from transforms.context import centre_channel

__all__ = ["ValidationCurve"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")


class ValidationCurve:
    """Learning curves as files: after every ``interval``-th training epoch and the last (attach it after
    :class:`~pipeline.train.validation.IntervalValidation`), append the evaluator's metrics, the synthetic-anomaly
    health metric, the learning rate, α, the iteration and the wall-clock to ``output_dir/curve.json`` and
    ``curve.csv`` (rank 0 only, atomic writes).

    ``curve.json`` = ``{"rows": [{"epoch", "iteration", "elapsed_s", "lr", "alpha", <metric>: float, ...}],
    "baselines": {...} | null}``; ``elapsed_s`` counts training seconds over resumed runs too. ``baselines`` are the
    trivial baselines on the evaluated slices (``pipeline.evaluate.baselines.baseline_report``), computed once, so a
    plot can draw them as horizontal lines. A resumed training keeps the rows of the epochs it had finished.
    """

    def __init__(self, evaluator: Any, output_dir: str | os.PathLike, interval: int = 1,
                 health: SyntheticAnomalyAUROC | None = None, network: torch.nn.Module | None = None,
                 baseline_items: Sequence[Mapping] | None = None, sf: int = DEFAULT_SF,
                 mm_per_pixel: float | None = None) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        self.evaluator, self.output_dir, self.interval = evaluator, Path(output_dir), int(interval)
        self.health, self.network, self.baseline_items, self.sf = health, network, baseline_items, int(sf)
        self.mm_per_pixel = mm_per_pixel
        self.rows: list[dict[str, Any]] | None = None
        self.baselines: dict[str, Any] | None = None
        self._clock: float | None = None
        self._elapsed_before = 0.0

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=validation_due(self.interval)), self)

    def _start(self, engine: Any) -> None:
        if self._clock is not None:
            return
        self._clock = time.monotonic()
        first_epoch = engine.state.epoch - 1  # epochs already done (a resumed run starts after them)
        self.rows = []
        saved = self.output_dir / "curve.json"
        if first_epoch > 0 and saved.is_file():
            old = json.loads(saved.read_bytes())
            self.rows = [row for row in old.get("rows", []) if row.get("epoch", 0) <= first_epoch]
            self.baselines = old.get("baselines")
            self._elapsed_before = float(self.rows[-1]["elapsed_s"]) if self.rows else 0.0

    def _baselines(self) -> dict[str, Any] | None:
        if not self.baseline_items:
            return None
        # a 2.5D item's image is a stack: the baselines look at its own (middle) slice
        stack = {k: np.stack([centre_channel(np.asarray(item[k], dtype=np.float32))[0] for item in self.baseline_items])
                 for k in ("image", "liver", "lesion")}
        labels = [bool(item.get("has_lesion", stack["lesion"][i].any())) for i, item in enumerate(self.baseline_items)]
        if all(labels) or not any(labels):
            return None
        case_ids = [str(item.get("case_id", "")) for item in self.baseline_items]
        return baseline_report(stack["image"], stack["liver"], stack["lesion"], sf=self.sf, labels=labels,
                               case_ids=case_ids, mm_per_pixel=self.mm_per_pixel)

    def __call__(self, engine: Any) -> None:
        if not is_rank_zero():
            return
        if self.rows is None:
            self._start(engine)
        row: dict[str, Any] = {
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "elapsed_s": round(self._elapsed_before + time.monotonic() - self._clock, 1),
            "lr": float(engine.optimizer.param_groups[0]["lr"]) if getattr(engine, "optimizer", None) else None,
            "alpha": float(getattr(engine.state, "alpha", float("nan"))),
        }
        # undefined values (nan: one class only) are written as null by atomic_write_json, empty in the CSV
        row.update({name: float(value) for name, value in self.evaluator.state.metrics.items()})
        if self.health is not None:
            row["synthetic_pixel_auroc_liver"] = float(self.health(self.network or engine.network))
        if self.baselines is None and self.baseline_items:
            self.baselines = self._baselines()
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self._write()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k not in ("lr",))
        engine.logger.info(f"curve: epoch {row['epoch']}, iteration {row['iteration']}: {shown}")

    def _write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_dir / "curve.json", {"rows": self.rows, "baselines": self.baselines})
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        lines = [",".join(columns)] + [
            ",".join(_csv_value(row.get(c)) for c in columns) for row in self.rows
        ]
        atomic_write_bytes(self.output_dir / "curve.csv", ("\n".join(lines) + "\n").encode("utf-8"))


def _csv_value(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else str(value)
