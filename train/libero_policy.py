"""An `sf train` checkpoint as a LIBERO policy (`sfcache.libero_eval.LiberoPolicy`).

The checkpoint records the size of its training frames (`frames`); `sf eval-libero` renders the simulator
at that size (`render_size`), so a policy trained on LIBERO's 128 px frames sees 128 px renders, not 256 px
ones resized. The observation is then prepared exactly as the trainer prepared its validation batches: the views in the
checkpoint's order, JPEG round trip when the training frames were JPEG (RLDS), the central 90% crop
resized bilinearly to the policy's input (training crops a random 90% box, evaluation the centre),
proprio standardised inside the model, the instruction as bytes. Training actions are LIBERO's own
(gripper -1 open, +1 close), so the chunk only has its gripper binarised.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from sfcache.device import resolve_device
from sfcache.errors import SfcacheError
from sfcache.libero_eval import Observation, jpeg_roundtrip, normalize_gripper
from sfcache.train.augment import center_boxes, crop_images
from sfcache.train.checkpoint import load_checkpoint
from sfcache.train.loop import CHECKPOINT
from sfcache.train.model import Policy, PolicyConfig, encode_instructions
from sfcache.vggt import random_weights_warning

JPEG_SOURCES = ("libero_rlds",)  # training frames that were JPEG-decoded


class CheckpointPolicy:
    """policy(observation) -> action chunk [chunk, 7] of a trained checkpoint, in LIBERO's convention."""

    def __init__(self, path: Path, device: str = "auto", seed: int = 7):
        path = Path(path)
        self.path = path / CHECKPOINT if path.is_dir() else path
        if not self.path.is_file():
            raise SfcacheError(f"{path}: no checkpoint here (expected an `sf train` run folder or its {CHECKPOINT})")
        saved = load_checkpoint(
            self.path,
            required=("step", "model", "policy", "identity"),
            advice="give an `sf train` run folder or its checkpoint",
        )
        try:
            self.config = PolicyConfig(**{**saved["policy"], "grid": tuple(saved["policy"]["grid"])})
        except TypeError as error:
            raise SfcacheError(f"{self.path}: its policy settings do not fit this sfcache ({error})") from None
        self.identity, self.step, state = saved["identity"], int(saved["step"]), saved["model"]
        if (self.config.proprio_dim, self.config.action_dim) != (8, 7):
            raise SfcacheError(
                f"{self.path}: trained with proprio {self.config.proprio_dim} and actions "
                f"{self.config.action_dim}; LIBERO has proprio 8 and actions 7"
            )
        self.device = resolve_device(device)
        torch.manual_seed(seed)
        self.model = Policy(self.config).to(self.device).eval()
        self.model.load_state_dict(state)
        self.views = tuple(self.identity["views"])
        self.source_format = self.identity.get("source", {}).get("format")
        self.frames: dict | None = saved.get("frames")  # None in checkpoints from before it was recorded
        self._text: dict[str, torch.Tensor] = {}

    def describe(self) -> dict:
        """What is evaluated: recorded with the results, so a resumed evaluation must use the same weights."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        warning = random_weights_warning(self.identity.get("online_vggt") or self.identity.get("weights_id"))
        return {
            **({"random_weights": warning} if warning else {}),  # its SF targets came from random: VGGT weights
            "checkpoint": str(self.path.resolve()),
            "sha256": digest,
            "step": self.step,
            "views": list(self.views),
            "source_format": self.source_format,
            "image_size": list(self.config.image_size),
            "frames": self.frames,
        }

    def render_size(self, default: int) -> int:
        """The simulator render size that gives the training frames' size (`default` when unknown or not square)."""
        if self.frames is None or self.frames["size"][0] != self.frames["size"][1]:
            return default
        return int(self.frames["size"][0])

    def images(self, observation: Observation) -> torch.Tensor:
        """float [1, V, 3, S, S] in [0, 1]: the checkpoint's views, centre-cropped and resized as in validation."""
        missing = [v for v in self.views if v not in observation.images]
        if missing:
            raise SfcacheError(
                f"{self.path}: the policy was trained on views {list(self.views)}; the simulator "
                f"gives {sorted(observation.images)}"
            )
        frames = [observation.images[v] for v in self.views]
        if self.source_format in JPEG_SOURCES:
            fast = bool(self.identity.get("jpeg_fast_dct"))  # decoded in training as the store's recipe did
            frames = [jpeg_roundtrip(f, fast_dct=fast) for f in frames]
        stacked = torch.from_numpy(np.stack(frames)).to(self.device).permute(0, 3, 1, 2).float()[None] / 255
        return crop_images(stacked, center_boxes(1), self.config.image_size[0])

    @torch.no_grad()
    def __call__(self, observation: Observation) -> np.ndarray:
        text = self._text.get(observation.instruction)
        if text is None:
            text = self._text[observation.instruction] = encode_instructions(
                [observation.instruction], self.config.text_len
            ).to(self.device)
        proprio = torch.from_numpy(observation.proprio.astype(np.float32))[None].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            actions, _ = self.model(self.images(observation), text, proprio)
        return normalize_gripper(actions[0].float().cpu().numpy(), low=-1.0, high=1.0)
