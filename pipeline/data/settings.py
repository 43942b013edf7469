"""What a preparation is: :class:`PrepareSettings` (everything that changes the cached slices), the case-level
:class:`SplitSettings`, and :func:`volume_transform`, the volume preprocessing ``prepare`` and inference share."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from monai.transforms import Compose, Orientationd

from transforms.intensity import DEFAULT_HU_WINDOW, HUWindowd, ShiftLiverMedianHUd
from transforms.roi import LiverROId

__all__ = ["PrepareSettings", "SplitSettings", "is_finite_number", "prepare_settings_from_json", "volume_transform"]


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that changes the cached slices; a case is rebuilt when any of it changes."""

    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    field_mm: float = 300.0
    size: int = 256
    min_liver_area: int = 1
    mask_outside: bool = True
    orientation: str = "RAS"
    # a number: each volume shifted so that its liver median HU is this (ShiftLiverMedianHU); None: HU as scanned.
    # On by default since docs/results/full_skips_norm/ (3 seeds on IRCADb p17: the training livers lie at 46-120 HU)
    liver_reference_hu: float | None = 100.0

    def __post_init__(self) -> None:
        """Refuse settings that cannot describe a preparation (they come from flags and from inference.json)."""
        problems = []
        window = self.hu_window
        if (not isinstance(window, (tuple, list)) or len(window) != 2 or not all(is_finite_number(v) for v in window)
                or not float(window[0]) < float(window[1])):
            problems.append(f"hu_window must be two finite numbers MIN < MAX, got {window!r}")
        if not is_finite_number(self.field_mm) or not self.field_mm > 0:
            problems.append(f"field_mm must be a positive number of mm, got {self.field_mm!r}")
        if not _is_integer(self.size) or not MIN_SIZE <= self.size <= MAX_SIZE:
            problems.append(f"size must be an integer number of pixels in [{MIN_SIZE}, {MAX_SIZE}], got {self.size!r}")
        if not _is_integer(self.min_liver_area) or self.min_liver_area < 0:
            problems.append(f"min_liver_area must be a non-negative integer, got {self.min_liver_area!r}")
        if not isinstance(self.mask_outside, (bool, np.bool_)):
            problems.append(f"mask_outside must be true or false, got {self.mask_outside!r}")
        if not isinstance(self.orientation, str) or not _is_axcodes(self.orientation):
            problems.append(f"orientation must be three axis codes such as RAS or LPS, got {self.orientation!r}")
        if self.liver_reference_hu is not None and (not is_finite_number(self.liver_reference_hu)
                                                    or not -1000 <= self.liver_reference_hu <= 3000):
            problems.append(f"liver_reference_hu must be null or a number of HU, got {self.liver_reference_hu!r}")
        if problems:
            raise ValueError("; ".join(problems) + ".")
        object.__setattr__(self, "hu_window", (float(window[0]), float(window[1])))  # frozen: as a tuple of floats

    def to_json(self) -> dict:
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        return d


MIN_SIZE, MAX_SIZE = 1, 2048


def prepare_settings_from_json(settings: Mapping[str, Any] | None) -> PrepareSettings:
    """:class:`PrepareSettings` from its JSON form; absent keys take the defaults, except ``liver_reference_hu``:
    settings without it were recorded before per-volume normalisation existed or became the default, i.e. without
    it, and read as ``None`` (no shift), so an older model's inference repeats its preparation.

    Raises:
        ValueError: not an object, or values :class:`PrepareSettings` refuses.
    """
    if not settings:
        return PrepareSettings(liver_reference_hu=None)
    if not isinstance(settings, Mapping):
        raise ValueError(f"expected an object, got {settings!r}")
    known = {k: v for k, v in settings.items() if k in PrepareSettings.__dataclass_fields__}
    known.setdefault("liver_reference_hu", None)
    if isinstance(known.get("hu_window"), list):
        known["hu_window"] = tuple(known["hu_window"])
    return PrepareSettings(**known)


def is_finite_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool, not NaN or infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_axcodes(text: str) -> bool:
    """Three letters, one of each pair L/R, A/P, S/I (nibabel's axis codes)."""
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    return len(text) == 3 and all(sum(c in pair for c in text.upper()) == 1 for pair in pairs)


@dataclass
class SplitSettings:
    """How cases are split; always by case, never by slice."""

    val_fraction: float = 0.5
    seed: int = 0
    val_cases: Sequence[str] = ()
    test_cases: Sequence[str] = ()
    train_cases: Sequence[str] = ()
    normal_from_abnormal: int = 0
    lesion_margin: int = 2
    extra: dict = field(default_factory=dict)


def volume_transform(settings: PrepareSettings, liver_values: Sequence[int], lesion_values: Sequence[int]) -> Compose:
    """The volume-level preprocessing shared by ``prepare`` and inference.

    In: ``{"image": (1, X, Y, Z) HU, "label": (1, X, Y, Z) dataset label values}`` as
    :func:`pipeline.common.io.load_case`
    returns. Out: the :class:`~transforms.roi.LiverROId` keys on the (1, S, S, Z) ROI grid.
    """
    normalise = []
    if settings.liver_reference_hu is not None:
        normalise = [ShiftLiverMedianHUd("image", "label", settings.liver_reference_hu, liver_values, lesion_values)]
    return Compose(
        [
            Orientationd(keys=["image", "label"], axcodes=settings.orientation, labels=None),
            *normalise,
            HUWindowd("image", *settings.hu_window),
            LiverROId(
                "image",
                label_key="label",
                liver_values=liver_values,
                lesion_values=lesion_values,
                field_mm=settings.field_mm,
                size=settings.size,
                mask_outside=settings.mask_outside,
            ),
        ]
    )
