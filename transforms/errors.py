"""The one error type for bad input data.

It lives in ``transforms`` (the lowest layer) so that transforms, networks-free data code and the ``pipeline``
CLI all raise and catch the same class. Every message names the file, the problem and, where one exists, the fix.
"""

from __future__ import annotations

from os import PathLike

from monai.config import NdarrayOrTensor
from monai.data import MetaTensor


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

