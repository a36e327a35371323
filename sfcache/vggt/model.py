"""Feature-only VGGT: the official aggregator's outputs, patch tokens only, for the requested layers only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sfcache.errors import Field, Message, SfcacheError, WeightsError
from sfcache.vggt.config import VGGTConfig
from sfcache.vggt.dinov2 import DINOV2_LAYER_SCALE_INIT, build_patch_embed
from sfcache.vggt.layers import Block, LayerScale, rope_2d_tables

CHECKPOINT_PREFIX = "aggregator."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AGGREGATOR_NORM_EPS = 1e-5
AGGREGATOR_LAYER_SCALE_INIT = 0.01
RANDOM_INIT_STD = 0.02


class Aggregator(nn.Module):
    """Alternating frame / global attention over DINOv2 patch tokens plus per-frame camera and register tokens."""

    def __init__(self, config: VGGTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = build_patch_embed(config)
        # index 0 goes to the first frame of each sequence, index 1 to all other frames
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, config.num_register_tokens, dim))
        self.frame_blocks = nn.ModuleList(self._block() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(self._block() for _ in range(config.depth))

    def _block(self) -> Block:
        return Block(
            self.config.embed_dim,
            self.config.mlp_hidden_dim,
            norm_eps=AGGREGATOR_NORM_EPS,
            qk_norm=True,
            layer_scale_init=AGGREGATOR_LAYER_SCALE_INIT,
        )

    def forward(self, images: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """images [B, S, 3, H, W] in [0, 1] -> {layer: [B, S, h*w, 2C]}; stops after the deepest layer."""
        batch, frames, _, height, width = images.shape
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
        patches = self.patch_embed(((images - mean) / std).view(batch * frames, 3, height, width))

        special = torch.cat((self.camera_token, self.register_token), dim=2)
        special = torch.cat(
            (special[:, :1].expand(batch, 1, -1, -1), special[:, 1:].expand(batch, frames - 1, -1, -1)), dim=1
        )
        tokens = torch.cat((special.reshape(batch * frames, *special.shape[2:]), patches), dim=1)
        per_frame, dim = tokens.shape[1:]
        first_patch = self.config.special_tokens

        cos, sin = rope_2d_tables(grid_h, grid_w, first_patch, self.config.rope_freq, images.device)
        frame_rope, global_rope = (cos, sin), (cos.repeat(frames, 1), sin.repeat(frames, 1))
        outputs = {}
        for index in range(max(layers) + 1):
            frame_out = self.frame_blocks[index](tokens.view(batch * frames, per_frame, dim), frame_rope)
            tokens = self.global_blocks[index](frame_out.view(batch, frames * per_frame, dim), global_rope)
            if index in layers:
                outputs[index] = torch.cat(
                    (
                        frame_out.view(batch, frames, per_frame, dim)[:, :, first_patch:],
                        tokens.view(batch, frames, per_frame, dim)[:, :, first_patch:],
                    ),
                    dim=-1,
                )
        return outputs


def auto_compute_dtype(device: torch.device) -> torch.dtype:
    """What official VGGT inference runs under: fp32 on CPU, bf16 autocast on Ampere+, fp16 before."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def resolve_layers(
    layers: Sequence[int], depth: int, name: Field | str = "layers", distinct: bool = False
) -> tuple[int, ...]:
    """Layer indices of a `depth`-block VGGT as non-negative ints (negative count from the end, like SF's -1).
    SfcacheError naming `name` (the config field that asked them, e.g. `ExtractConfig.layers`), the layers asked
    and the valid range; `distinct` also refuses one layer named twice."""
    bad = [int(layer) for layer in layers if not -depth <= layer < depth]
    if bad or not layers:
        raise SfcacheError(
            Message(
                name,
                f" {','.join(map(str, bad or layers)) or '(none)'}: this VGGT has layers "
                f"0..{depth - 1} (or -{depth}..-1; -1 is the last, the one SF uses)",
            )
        )
    resolved = tuple(int(layer) % depth for layer in layers)
    if distinct and len(set(resolved)) != len(resolved):
        raise SfcacheError(Message(name, f" {','.join(map(str, layers))}: names the same layer twice"))
    return resolved


class VGGTFeatures(nn.Module):
    """Frozen VGGT feature extractor: `model(images, layers)` -> {layer: patch tokens [B, S, h*w, 2*embed_dim]}.

    Parameters keep fp32; `compute_dtype` (None = automatic) is the autocast dtype of the forward pass,
    so LayerNorms and the residual stream stay fp32 exactly as in official inference.
    """

    def __init__(self, config: VGGTConfig, compute_dtype: torch.dtype | None = None, seed: int = 0):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        building_on_meta = torch.get_default_device().type == "meta"
        with torch.device("meta"):
            self.aggregator = Aggregator(config)
        if not building_on_meta:
            self.aggregator.to_empty(device="cpu")
            self.reset_parameters(seed)
        self.eval()
        self.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Seeded random weights (for tests and demos): N(0, 0.02) matrices and tokens, official LayerScale inits."""
        generator = torch.Generator().manual_seed(seed)
        for name, module in self.aggregator.named_modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, LayerScale):
                in_dinov2 = name.startswith("patch_embed.")
                module.gamma.fill_(DINOV2_LAYER_SCALE_INIT if in_dinov2 else AGGREGATOR_LAYER_SCALE_INIT)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0.0, RANDOM_INIT_STD, generator=generator)
                module.bias.zero_()
            for parameter in module.parameters(recurse=False):
                if parameter.ndim > 1 and not isinstance(module, (nn.Linear, nn.Conv2d)):
                    parameter.normal_(0.0, RANDOM_INIT_STD, generator=generator)

    def compute_dtype_for(self, device: torch.device) -> torch.dtype:
        return self.compute_dtype or auto_compute_dtype(device)

    def resolve_layers(self, layers: Sequence[int], name: Field | str = "layers") -> tuple[int, ...]:
        """`layers` of this model as non-negative ints (see the module's `resolve_layers`)."""
        return resolve_layers(layers, self.config.depth, name)

    def forward(self, images: Tensor, layers: Sequence[int] = (-1,)) -> dict[int, Tensor]:
        """images float [B, S, 3, H, W] in [0, 1], H and W multiples of the patch size.

        Returns {layer: float32 [B, S, h*w, 2*embed_dim]} keyed as requested; channels [0, C) come from the
        frame block, [C, 2C) from the global block; tokens row-major over the (H/p, W/p) grid.
        """
        patch = self.config.patch_size
        if images.ndim != 5 or images.shape[2] != 3 or images.shape[-2] % patch or images.shape[-1] % patch:
            raise ValueError(
                f"images must be [B, S, 3, H, W] with H, W multiples of {patch}; got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype} (use sfcache.vggt.preprocess)")
        resolved = self.resolve_layers(layers)
        dtype = self.compute_dtype_for(images.device)
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            outputs = self.aggregator(images.float(), sorted(set(resolved)))
        return {layer: outputs[index].float() for layer, index in zip(layers, resolved)}

    def load_vggt_state_dict(self, state_dict: Mapping[str, Tensor], assign: bool = False) -> None:
        """Load the `aggregator.*` part of an official VGGT state dict (head keys are ignored).

        Missing, unexpected or misshaped aggregator keys raise WeightsError naming them; nothing is loaded then.
        `assign=True` adopts the given tensors instead of copying (for a model built on the meta device).
        """
        theirs = {
            key[len(CHECKPOINT_PREFIX) :]: value
            for key, value in state_dict.items()
            if key.startswith(CHECKPOINT_PREFIX)
        }
        if not theirs:
            example = ", ".join(list(state_dict)[:3]) or "none"
            raise WeightsError(f"no '{CHECKPOINT_PREFIX}*' keys (keys start: {example}); not a VGGT state dict")
        ours = self.aggregator.state_dict()
        problems = []
        for label, keys in (
            ("missing", sorted(ours.keys() - theirs.keys())),
            ("unexpected", sorted(theirs.keys() - ours.keys())),
        ):
            if keys:
                problems.append(f"{len(keys)} {label} ({_name_some(keys)})")
        misshaped = [
            f"{CHECKPOINT_PREFIX}{key} is {tuple(theirs[key].shape)}, expected {tuple(ours[key].shape)}"
            for key in sorted(ours.keys() & theirs.keys())
            if theirs[key].shape != ours[key].shape
        ]
        if misshaped:
            problems.append(f"{len(misshaped)} misshaped ({'; '.join(misshaped[:5])})")
        if problems:
            raise WeightsError(f"aggregator keys do not match {self.config}: " + "; ".join(problems))
        self.aggregator.load_state_dict({key: value.float() for key, value in theirs.items()}, assign=assign)
        self.requires_grad_(False)


def _name_some(keys: list[str], limit: int = 5) -> str:
    named = ", ".join(CHECKPOINT_PREFIX + key for key in keys[:limit])
    return named + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")
