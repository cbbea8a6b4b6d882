"""wsl_models: pixel masks from image-level labels. Knows nothing of Label Studio."""

from .cam import AnalyticCAM, GradCAM, XGradCAM, cam_method
from .ensemble import Ensemble, EnsembleConfig, EnsembleOutput, ImageMasks
from .members import LITE_TRIO, MEMBERS, PAPER_TRIO, Member, Weights, build_member
from .versions import ModelStore, VersionError

__all__ = [
    "LITE_TRIO",
    "MEMBERS",
    "PAPER_TRIO",
    "AnalyticCAM",
    "Ensemble",
    "EnsembleConfig",
    "EnsembleOutput",
    "GradCAM",
    "ImageMasks",
    "Member",
    "ModelStore",
    "VersionError",
    "Weights",
    "XGradCAM",
    "build_member",
    "cam_method",
]
