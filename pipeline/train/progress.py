"""The progress bar of a training run, as a handler one config key switches off."""

from __future__ import annotations

from typing import Any

from pipeline.train.runtime import as_flag

__all__ = ["TrainingProgress"]


class TrainingProgress:
    """A tqdm progress bar over each training epoch (ignite's ``ProgressBar``), attached only when ``enabled``.

    A handler of its own so that a config switches it with one key (``progress: false`` for logs to files;
    ``--progress false`` on the command line works too, see :func:`~pipeline.train.runtime.as_flag`).
    """

    def __init__(self, enabled: bool | str = True) -> None:
        self.enabled = as_flag(enabled)

    def attach(self, engine: Any) -> None:
        if self.enabled:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False, desc="train").attach(
                engine, output_transform=lambda out: {"loss": out[0]["loss"]}
            )
