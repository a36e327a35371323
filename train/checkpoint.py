"""Reading an `sf train` checkpoint, for the trainer's resume and for the policies that load one."""

from __future__ import annotations

from pathlib import Path

import torch

from sfcache.errors import SfcacheError

REQUIRED_CHECKPOINT_KEYS = (
    "step",
    "model",
    "sf_loss",
    "optimizer",
    "scheduler",
    "rng",
    "action_sum",
    "action_count",
    "policy",
    "identity",
    "config",
)


def load_checkpoint(
    path: Path,
    required: tuple[str, ...] = REQUIRED_CHECKPOINT_KEYS,
    advice: str = "delete it or pass --no-resume to start over",
) -> dict:
    """A checkpoint written by `sf train` holding `required`; a truncated or foreign file is a one-line error
    ending in `advice` (what to do)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many kinds (unpickling, zip, EOF) for a damaged file
        raise SfcacheError(
            f"{path}: not a readable sf train checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); {advice}"
        ) from None
    missing = [k for k in required if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise SfcacheError(f"{path}: not an sf train checkpoint (missing {', '.join(missing)}); {advice}")
    return saved
