"""MONAI transforms for liver CT anomaly detection: array transforms and their dictionary twins."""

from transforms.errors import InputDataError
from transforms.intensity import (
    DEFAULT_HU_WINDOW,
    HUWindow,
    HUWindowd,
    RandLiverIntensityJitter,
    RandLiverIntensityJitterd,
)
from transforms.lesion_like import RandLesionLikeAnomaly
from transforms.perlin import RandPerlinMask, perlin_noise_2d
from transforms.roi import LiverMasks, LiverMasksd, LiverROI, LiverROId
from transforms.slicing import AxialSlicesd, RandAxialSliced, eligible_slices
from transforms.sources import AnomalySource, ImageFolderSource, PerlinTextureSource, augment_gray
from transforms.synthesis import RandLiverAnomaly, RandLiverAnomalyd

__all__ = [
    "DEFAULT_HU_WINDOW",
    "AnomalySource",
    "AxialSlicesd",
    "HUWindow",
    "HUWindowd",
    "ImageFolderSource",
    "InputDataError",
    "LiverMasks",
    "LiverMasksd",
    "LiverROI",
    "LiverROId",
    "PerlinTextureSource",
    "RandAxialSliced",
    "RandLesionLikeAnomaly",
    "RandLiverIntensityJitter",
    "RandLiverIntensityJitterd",
    "RandLiverAnomaly",
    "RandLiverAnomalyd",
    "RandPerlinMask",
    "augment_gray",
    "eligible_slices",
    "perlin_noise_2d",
]
