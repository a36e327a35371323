"""Inspect a target store: what it holds, whether it is whole, whether it is right, what its features look like.

Every function returns a frozen result record (`to_json()` is what `sf inspect-cache --json` prints) or
writes one file; `sf inspect-cache` renders them.
A store costs GPU hours, so the checks read everything that can go wrong on disk (torn or
overwritten shards, NaN, an index that does not add up, done flags without data) and `verify`
recomputes sampled steps from the source with the recorded configuration.
"""

from sfcache.inspection.integrity import CheckResult, Failure, check
from sfcache.inspection.pictures import PcaPicture, label_band, pca_picture, pca_picture_size, pca_rgb, vggt_frames
from sfcache.inspection.store_access import open_store
from sfcache.inspection.summary import (
    EpisodeReport,
    RecipeSummary,
    ReduceSummary,
    StepNorms,
    Summary,
    VggtSummary,
    episode_report,
    summarize,
)
from sfcache.inspection.verification import (
    DEFAULT_THRESHOLDS,
    LayerCosines,
    VerifyResult,
    WorstToken,
    token_cosine,
    verify,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "CheckResult",
    "EpisodeReport",
    "Failure",
    "LayerCosines",
    "PcaPicture",
    "RecipeSummary",
    "ReduceSummary",
    "StepNorms",
    "Summary",
    "VerifyResult",
    "VggtSummary",
    "WorstToken",
    "check",
    "episode_report",
    "label_band",
    "open_store",
    "pca_picture",
    "pca_picture_size",
    "pca_rgb",
    "summarize",
    "token_cosine",
    "verify",
    "vggt_frames",
]
