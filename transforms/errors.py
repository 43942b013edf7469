"""The one error type for bad input data.

It lives in ``transforms`` (the lowest layer) so that transforms, networks-free data code and the ``pipeline``
CLI all raise and catch the same class. Every message names the file, the problem and, where one exists, the fix.
The check of a (slice, liver mask) pair that both synthesis transforms start with lives here too.
"""

from __future__ import annotations

from os import PathLike

import numpy as np
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.utils import convert_data_type


class InputDataError(ValueError):
    """Bad input data: unreadable, wrongly shaped, mislabelled or implausible.

    Args:
        path: the file (or folder) the problem was found in; ``None`` when the data did not come from a file.
        problem: what is wrong, in one sentence.
        fix: what the user can do about it (optional).
    """

    def __init__(self, path: str | PathLike | None, problem: str, fix: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        where = self.path if self.path is not None else "<in-memory data>"
        message = f"{where}: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)

    def __reduce__(self):  # keep the three fields through multiprocessing (DataLoader workers)
        return (type(self), (self.path, self.problem, self.fix))


def file_of(image: NdarrayOrTensor) -> str | None:
    """The file an image came from, when its meta data says so (for error messages)."""
    if isinstance(image, MetaTensor):
        name = image.meta.get("filename_or_obj")
        return None if name is None else str(name)
    return None


def checked_slice_and_liver(image: NdarrayOrTensor, liver: NdarrayOrTensor) -> tuple[np.ndarray, np.ndarray]:
    """``image`` as float32 numpy (1, H, W) and ``liver`` as numpy of the same shape, after checking both.

    Raises:
        InputDataError: (naming the image's file when its meta data has one) the image is not (1, H, W), the liver
            mask has another shape, or the image holds NaN or inf.
    """
    image_np = convert_data_type(image, np.ndarray, dtype=np.float32)[0]
    liver_np = convert_data_type(liver, np.ndarray)[0]
    if image_np.ndim != 3 or image_np.shape[0] != 1:
        raise InputDataError(file_of(image), f"expected a (1, H, W) slice, got shape {image_np.shape}.")
    if liver_np.shape != image_np.shape:
        raise InputDataError(
            file_of(image), f"liver mask shape {liver_np.shape} differs from image shape {image_np.shape}."
        )
    if not np.isfinite(image_np).all():
        raise InputDataError(file_of(image), "the slice holds non-finite values (NaN or inf).")
    return image_np, liver_np
