"""What the training handlers ask about the run: is this process rank 0, and a yes/no option as a config or the
command line gives it."""

from __future__ import annotations

import torch

__all__ = ["as_flag", "is_rank_zero"]


def is_rank_zero() -> bool:
    """True outside ``torch.distributed`` and on its rank 0: the process that writes files."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def as_flag(value: bool | str | int | None) -> bool:
    """A yes/no option from a config or the command line: ``monai.bundle run --resume true`` passes the string
    ``"true"``, which plain ``bool()`` would also read as true for ``"false"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off", "", "none", "null"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)
