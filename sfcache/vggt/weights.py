"""Find, read and fingerprint VGGT checkpoints; infer the architecture from tensor shapes."""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from sfcache.errors import WeightsError
from sfcache.vggt.config import PRESETS, VGGTConfig
from sfcache.vggt.model import CHECKPOINT_PREFIX, VGGTFeatures

WEIGHT_FILES = ("model.safetensors", "model.pt")  # hub snapshot layout, preferred first
TORCH_SUFFIXES = (".pt", ".pth")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
RANDOM_SPEC = re.compile(r"^random:(?P<preset>[\w.-]+?)(?:@(?P<seed>\d+))?$")


def load_vggt(
    spec: str, device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None
) -> tuple[VGGTFeatures, str]:
    """A frozen eval-mode VGGTFeatures on `device` and its weights id.

    spec: a .pt/.pth/.safetensors file, a directory holding model.safetensors or model.pt, a hub id
    ("facebook/VGGT-1B"), or "random:<preset>[@seed]". The id is "sha256:<file hex>" or "random:<preset>+seed<k>".
    """
    random_spec = _random_spec(spec)
    if random_spec:
        preset, seed = random_spec
        model = VGGTFeatures(PRESETS[preset], compute_dtype=compute_dtype, seed=seed)
        return model.to(device), f"random:{preset}+seed{seed}"

    path = resolve_weights_file(spec)
    state_dict = read_state_dict(path)
    try:
        config = infer_config(state_dict)
        with torch.device("meta"):
            model = VGGTFeatures(config, compute_dtype=compute_dtype)
        model.load_vggt_state_dict(state_dict, assign=True)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None
    return model.to(device), file_fingerprint(path)


def random_weights_warning(weights_id: str | None) -> str | None:
    """The one warning every command prints for targets made with `random:` weights (None for real ones)."""
    if not str(weights_id).startswith("random:"):
        return None
    return (
        f"RANDOM WEIGHTS ({weights_id}): these targets carry no geometry; for tests and demos only, "
        "never for training a policy"
    )


def weights_config(spec: str) -> VGGTConfig:
    """The architecture a spec names, without building the model or hashing the file (for dry runs)."""
    random_spec = _random_spec(spec)
    if random_spec:
        return PRESETS[random_spec[0]]
    path = resolve_weights_file(spec)
    try:
        return infer_config(read_state_dict(path))
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None


def _random_spec(spec: str) -> tuple[str, int] | None:
    """(preset, seed) of a "random:<preset>[@seed]" spec; None for any other spec."""
    match = RANDOM_SPEC.match(spec)
    if not match:
        return None
    if match["preset"] not in PRESETS:
        raise WeightsError(f"{spec}: unknown preset {match['preset']!r}; choose one of {', '.join(PRESETS)}")
    return match["preset"], int(match["seed"] or 0)


def resolve_weights_file(spec: str) -> Path:
    """The checkpoint file a spec names: the file itself, model.* inside a directory, or a hub download."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: directory holds none of {', '.join(WEIGHT_FILES)}")
    if path.is_file():
        return path
    if HUB_ID.match(spec):
        return _download_from_hub(spec)
    raise WeightsError(f"{spec}: no such file or directory, and not a hub id like 'facebook/VGGT-1B'")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise WeightsError(
            f"{repo_id}: downloading needs huggingface_hub (pip install 'sfcache[hub]'); "
            "or pass a local path to the checkpoint"
        ) from None
    for name in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=name))
        except LocalEntryNotFoundError:
            raise WeightsError(
                f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
                "(offline?); pass a local path instead"
            ) from None
        except EntryNotFoundError:
            continue
        except Exception as error:  # noqa: BLE001  network, auth, gating, unknown repo: one message for the user
            raise WeightsError(
                f"{repo_id}: cannot fetch {name} from the Hugging Face Hub "
                f"({type(error).__name__}: {error}); pass a local path instead"
            ) from None
    raise WeightsError(f"{repo_id}: the hub repo holds none of {', '.join(WEIGHT_FILES)}")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or torch .pt/.pth file, memory-mapped where the format allows."""
    zipped = path.suffix in TORCH_SUFFIXES and path.is_file() and zipfile.is_zipfile(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        elif path.suffix in TORCH_SUFFIXES:  # torch.save's zip archive maps; a legacy pickle file cannot
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        else:
            raise WeightsError(f"{path}: expected a .safetensors, .pt or .pth checkpoint")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        if not zipped and path.suffix != ".safetensors":  # torch's own message here talks about weights_only
            raise WeightsError(
                f"{path}: not a PyTorch checkpoint (neither the zip archive torch.save writes nor "
                "a legacy torch file); expected VGGT's model.pt or a .safetensors"
            ) from None
        raise WeightsError(f"{path}: cannot read checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(state, Mapping) and not any(key.startswith(CHECKPOINT_PREFIX) for key in state):
        state = next((state[key] for key in ("model", "state_dict") if isinstance(state.get(key), Mapping)), state)
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return dict(state)


def infer_config(state_dict: Mapping[str, Tensor]) -> VGGTConfig:
    """The architecture a checkpoint was trained with, from tensor shapes alone (head dim 64)."""
    tensors = {
        key[len(CHECKPOINT_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(CHECKPOINT_PREFIX)
    }

    def shape(key: str) -> tuple[int, ...]:
        if key not in tensors:
            raise WeightsError(f"cannot infer the architecture: {CHECKPOINT_PREFIX}{key} is missing")
        return tuple(tensors[key].shape)

    def count_blocks(prefix: str) -> int:
        indices = {key[len(prefix) :].split(".", 1)[0] for key in tensors if key.startswith(prefix)}
        return len(indices)

    embed_dim = shape("camera_token")[-1]
    fields = {
        "embed_dim": embed_dim,
        "num_register_tokens": shape("register_token")[2],
        "depth": count_blocks("frame_blocks."),
        "mlp_ratio": shape("frame_blocks.0.mlp.fc1.weight")[0] / embed_dim,
    }
    if "patch_embed.pos_embed" in tensors:
        patch_size = shape("patch_embed.patch_embed.proj.weight")[-1]
        positions = shape("patch_embed.pos_embed")[1] - 1
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise WeightsError(
                f"{CHECKPOINT_PREFIX}patch_embed.pos_embed holds {positions} patch positions, expected a square grid"
            )
        fields.update(
            patch_embed="dinov2",
            patch_size=patch_size,
            img_size=grid * patch_size,
            patch_embed_depth=count_blocks("patch_embed.blocks."),
        )
    else:
        patch_size = shape("patch_embed.proj.weight")[-1]
        # a conv embedder has no resolution-specific weights; keep the official 37x37-patch training grid
        fields.update(patch_embed="conv", patch_size=patch_size, img_size=37 * patch_size, patch_embed_depth=0)
    try:
        return VGGTConfig(**fields)
    except ValueError as error:
        raise WeightsError(f"cannot infer the architecture: {error}") from None


def file_fingerprint(path: Path) -> str:
    """sha256 of the checkpoint file, recorded in stores so targets can be traced to exact weights."""
    with open(path, "rb") as file:
        return "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
