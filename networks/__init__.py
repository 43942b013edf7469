"""Networks, losses and scoring of the frequency-aware liver lesion detector (pure torch + MONAI blocks)."""

from networks.detector import FrequencyAwareDetector
from networks.frequency import ButterworthHighPass
from networks.losses import DetectorLoss, RestorationLoss, SegmentationLoss
from networks.restoration import RestorationNet
from networks.scoring import anomaly_map_from_logits, image_scores, msgms_map, smooth_map
from networks.skip_decay_unet import SkipDecayUNet

__all__ = [
    "ButterworthHighPass",
    "DetectorLoss",
    "FrequencyAwareDetector",
    "RestorationLoss",
    "RestorationNet",
    "SegmentationLoss",
    "SkipDecayUNet",
    "anomaly_map_from_logits",
    "image_scores",
    "msgms_map",
    "smooth_map",
]
