"""Display orientation of axial slices: the prepared RAS layout <-> radiological display.

Prepared slices (and RAS volumes' axial planes) are (X, Y) arrays, X toward the patient's right and Y toward anterior.
A slice is shown in radiological convention: anterior up and the patient's right on the image's left. That is the
anti-transpose ``shown = slice[::-1, ::-1].T``, which is its own inverse. It lives here, with the helpers every stage
uses, because the BMAD PNG export/import, the report figures and the inference overlay must all agree on it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ras_to_display", "display_to_ras"]


def ras_to_display(array: np.ndarray) -> np.ndarray:
    """Map a slice from the prepared RAS layout to radiological display (anterior up, patient's right on the left).

    In: ``(..., X, Y)`` array, X toward the patient's right, Y toward anterior. Out: ``(..., Y, X)`` array, same dtype
    and values, ``out[..., r, c] = in[..., X - 1 - c, Y - 1 - r]``. The mapping is its own inverse.
    """
    return np.ascontiguousarray(np.swapaxes(np.asarray(array)[..., ::-1, ::-1], -1, -2))


def display_to_ras(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_display` (the same anti-transpose): ``(..., rows, cols)`` -> ``(..., X, Y)`` RAS."""
    return ras_to_display(array)
