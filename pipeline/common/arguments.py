"""Argument types for the command lines: each parses one value or raises ``argparse.ArgumentTypeError``, so that a
bad number is one usage line naming the flag (exit 2), never a traceback or a silent run that does nothing."""

from __future__ import annotations

import argparse
import math


def int_list(text: str) -> list[int]:
    """``"1,2"`` or ``"1 2"`` -> ``[1, 2]``: non-negative integer label values."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers separated by commas, got {text!r}")
    return values


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(text: str, kind: type, ok, what: str) -> float | int:
    value = _number(text, kind)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _checked(text, int, lambda v: v >= 1, "at least 1")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(text, float, lambda v: v > 0, "greater than 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(text, float, lambda v: v >= 0, "0 or more")


def unit_float(text: str) -> float:
    """A finite number in [0, 1] (a threshold on a [0, 1] map, a fraction)."""
    return _checked(text, float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def hu_or_off(text: str) -> float | None:
    """A finite number of HU, or ``off`` / ``none`` -> None (``--liver-reference-hu``; its range is checked by
    :class:`pipeline.data.settings.PrepareSettings`, the one place that knows it)."""
    if text.strip().lower() in ("off", "none"):
        return None
    return _number(text, float)


def flip_list(text: str) -> list[str]:
    """``"lr,ud"`` -> ``["lr", "ud"]``: distinct test-time flip names of :data:`networks.ensemble.FLIP_CHOICES`."""
    from networks.ensemble import FLIP_CHOICES

    names = [v for v in text.replace(",", " ").split() if v]
    if not names or any(n not in FLIP_CHOICES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(FLIP_CHOICES)}, got {text!r}")
    return names


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (argparse type of ``--shard``)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4: the first of four shards), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard index must be in 0..{count - 1} of {count} shards, got {text!r}")
    return index, count


class _DeprecatedAlias(argparse.Action):
    """Stores the value under the new flag's destination and says on stderr which flag replaces the old one."""

    def __init__(self, *args, new_flag: str, **kwargs) -> None:
        self.new_flag = new_flag
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import sys

        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {self.new_flag}.",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(group: argparse._ActionsContainer, old_flag: str, new_action: argparse.Action) -> None:
    """Accept ``old_flag`` (hidden from ``--help``) as a renamed spelling of ``new_action``'s flag for one release.

    Same destination, type and choices as ``new_action``; using it prints a deprecation warning on stderr.
    """
    group.add_argument(old_flag, dest=new_action.dest, type=new_action.type, choices=new_action.choices,
                       metavar=new_action.metavar, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                       action=_DeprecatedAlias, new_flag=new_action.option_strings[0])
