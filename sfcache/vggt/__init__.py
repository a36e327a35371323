"""Feature-only VGGT (the official aggregator) for Spatial Forcing targets."""

from sfcache.vggt.config import PRESETS, VGGTConfig
from sfcache.vggt.model import VGGTFeatures
from sfcache.vggt.preprocess import preprocess
from sfcache.vggt.weights import infer_config, load_vggt, random_weights_warning, weights_config

__all__ = [
    "PRESETS",
    "VGGTConfig",
    "VGGTFeatures",
    "infer_config",
    "load_vggt",
    "preprocess",
    "random_weights_warning",
    "weights_config",
]
