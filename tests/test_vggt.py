"""Feature-only VGGT: official numerics (golden fixtures), checkpoint handling, layer selection, preprocessing."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from sfcache.errors import Field, SfcacheError, WeightsError
from sfcache.vggt import PRESETS, VGGTConfig, VGGTFeatures, infer_config, load_vggt, preprocess, weights_config
from sfcache.vggt.model import resolve_layers
from sfcache.vggt.preprocess import resize_like_rlds

DATA = Path(__file__).parent / "data"
LAYERS = Field("ExtractConfig", "layers")
GOLDEN_IO = load_file(DATA / "vggt_golden_io.safetensors")
GOLDEN_CASES = sorted({key.rsplit("_", 1)[0] for key in GOLDEN_IO})
SMALL = VGGTConfig(img_size=42, embed_dim=128, depth=3, patch_embed_depth=1)


def full_checkpoint(model: VGGTFeatures) -> dict[str, torch.Tensor]:
    """An official-style full-model state dict: `aggregator.*` plus some head keys a loader must ignore."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state["camera_head.trunk.0.attn.qkv.weight"] = torch.randn(6, 2)
    state["depth_head.scratch.output_conv2.0.bias"] = torch.randn(3)
    return state


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_model() -> VGGTFeatures:
    return VGGTFeatures(SMALL, seed=1)


@pytest.fixture(scope="module")
def small_images() -> torch.Tensor:
    return torch.rand(2, 3, 3, 28, 42, generator=torch.Generator().manual_seed(0))


# ---- numerics against the official implementation -------------------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_official_aggregator(case):
    """Outputs computed by the official VGGT Aggregator (fixture) for stored and interpolated pos-embed grids,
    square and non-square inputs, several frames (both camera/register token slots) and layers."""
    embedder = case.split("_")[0]
    weights = DATA / f"vggt_golden_{embedder}.safetensors"
    model, weights_id = load_vggt(str(weights))
    assert weights_id == sha256(weights)
    images = GOLDEN_IO[f"{case}_input"].float() / 255
    expected = {
        int(key.rsplit("layer", 1)[1]): value for key, value in GOLDEN_IO.items() if key.startswith(case + "_layer")
    }
    out = model(images, layers=tuple(expected))
    for layer, target in expected.items():
        assert out[layer].shape == target.shape
        assert torch.allclose(out[layer], target, rtol=0, atol=1e-4 * target.abs().max().item()), (case, layer)


def test_layer_norm_eps_and_layer_scale_match_official():
    """eps barely moves outputs, so the golden test cannot see it: pin it here (1e-5 aggregator, 1e-6 DINOv2)."""
    aggregator = VGGTFeatures(VGGTConfig.tiny()).aggregator
    block = aggregator.global_blocks[0]
    assert {block.norm1.eps, block.norm2.eps, block.attn.q_norm.eps, block.attn.k_norm.eps} == {1e-5}
    dinov2 = aggregator.patch_embed
    assert {dinov2.blocks[0].norm1.eps, dinov2.blocks[0].norm2.eps, dinov2.norm.eps} == {1e-6}
    assert torch.all(block.ls1.gamma == 0.01) and torch.all(dinov2.blocks[0].ls2.gamma == 1.0)


def test_golden_architectures_are_inferred_from_shapes():
    dinov2 = weights_config(str(DATA / "vggt_golden_dinov2.safetensors"))
    assert dinov2 == VGGTConfig(img_size=42, embed_dim=64, depth=2, mlp_ratio=1.0, patch_embed_depth=1)
    conv = infer_config(load_file(DATA / "vggt_golden_conv.safetensors"))
    assert (conv.patch_embed, conv.patch_size, conv.depth, conv.mlp_ratio) == ("conv", 7, 1, 0.5)


def test_vggt_1b_has_the_official_aggregator_parameters():
    with torch.device("meta"):
        model = VGGTFeatures(VGGTConfig.vggt_1b())
    state = model.state_dict()
    assert len(state) == 1210
    assert sum(value.numel() for value in state.values()) == 909_112_320
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert shapes["aggregator.camera_token"] == (1, 2, 1, 1024)
    assert shapes["aggregator.register_token"] == (1, 2, 4, 1024)
    assert shapes["aggregator.patch_embed.pos_embed"] == (1, 1370, 1024)
    assert shapes["aggregator.patch_embed.mask_token"] == (1, 1024)
    assert shapes["aggregator.patch_embed.patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert shapes["aggregator.patch_embed.blocks.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["aggregator.global_blocks.23.attn.k_norm.bias"] == (64,)
    assert shapes["aggregator.frame_blocks.0.ls2.gamma"] == (1024,)
    assert "aggregator.patch_embed.blocks.0.attn.q_norm.weight" not in shapes  # DINOv2 has no qk-norm
    assert infer_config(state) == VGGTConfig.vggt_1b()
    assert PRESETS["vggt-1b"] == VGGTConfig.vggt_1b() and model.config.out_channels == 2048


# ---- checkpoints ------------------------------------------------------------------------------------------------


def test_full_model_state_dict_loads_and_heads_are_ignored(small_model, small_images):
    fresh = VGGTFeatures(SMALL, seed=2)
    assert not torch.equal(fresh(small_images)[-1], small_model(small_images)[-1])
    fresh.load_vggt_state_dict(full_checkpoint(small_model))
    assert torch.equal(fresh(small_images)[-1], small_model(small_images)[-1])


@pytest.mark.parametrize(
    "breakage, named",
    [
        ("drop", "aggregator.global_blocks.1.attn.k_norm.weight"),
        ("reshape", "aggregator.global_blocks.1.attn.k_norm.weight is (32,), expected (64,)"),
        ("extra", "aggregator.frame_blocks.3.norm1.weight"),
    ],
)
def test_bad_aggregator_keys_name_the_key_and_load_nothing(small_model, breakage, named):
    state = full_checkpoint(small_model)
    key = "aggregator.global_blocks.1.attn.k_norm.weight"
    if breakage == "drop":
        del state[key]
    elif breakage == "reshape":
        state[key] = torch.ones(32)
    else:
        state["aggregator.frame_blocks.3.norm1.weight"] = torch.ones(128)
    state["aggregator.camera_token"] = torch.full_like(state["aggregator.camera_token"], 7.0)
    target = VGGTFeatures(SMALL, seed=2)
    before = target.aggregator.camera_token.clone()
    with pytest.raises(WeightsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        target.load_vggt_state_dict(state)
    assert torch.equal(target.aggregator.camera_token, before)


def test_state_dict_without_aggregator_keys_is_rejected():
    with pytest.raises(WeightsError, match="not a VGGT state dict"):
        VGGTFeatures(SMALL).load_vggt_state_dict({"model.weight": torch.ones(2)})


@pytest.mark.parametrize("layout", ["x.pt", "x.pth", "x.safetensors", "dir/model.pt", "dir/model.safetensors"])
def test_load_vggt_from_files_and_directories(tmp_path, small_model, small_images, layout):
    path = tmp_path / layout
    path.parent.mkdir(exist_ok=True)
    state = full_checkpoint(small_model)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    spec = path.parent if layout.startswith("dir/") else path
    model, weights_id = load_vggt(str(spec))
    assert weights_id == sha256(path)
    assert model.config == SMALL and not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert torch.equal(model(small_images, layers=(0, 2))[2], small_model(small_images, layers=(2,))[2])


def test_wrapped_and_bf16_checkpoints_load(tmp_path, small_model, small_images):
    state = {key: value.to(torch.bfloat16) for key, value in full_checkpoint(small_model).items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "train_ckpt.pt")
    model, _ = load_vggt(str(tmp_path / "train_ckpt.pt"))
    assert model.aggregator.camera_token.dtype == torch.float32
    assert torch.equal(model.aggregator.camera_token, state["aggregator.camera_token"].float())


def test_non_preset_architecture_is_inferred(tmp_path, small_images):
    config = VGGTConfig(
        img_size=56, patch_size=14, embed_dim=192, depth=2, mlp_ratio=2.0, num_register_tokens=2, patch_embed_depth=3
    )
    source = VGGTFeatures(config, seed=5)
    save_file(full_checkpoint(source), tmp_path / "model.safetensors")
    model, _ = load_vggt(str(tmp_path))
    assert model.config == config
    assert model.config.num_heads == 3
    assert torch.equal(model(small_images)[-1], source(small_images)[-1])


def test_conv_embedder_checkpoint_is_inferred(tmp_path, small_images):
    config = VGGTConfig(img_size=518, embed_dim=64, depth=2, patch_embed="conv", patch_embed_depth=0)
    source = VGGTFeatures(config, seed=6)
    torch.save(full_checkpoint(source), tmp_path / "conv.pt")
    model, _ = load_vggt(str(tmp_path / "conv.pt"))
    assert model.config == config
    assert torch.equal(model(small_images, layers=(1,))[1], source(small_images, layers=(1,))[1])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{tmp}/missing.pt", "no such file"),
        ("{tmp}/garbage.pt", "not a PyTorch checkpoint .neither the zip archive torch.save writes"),
        ("{tmp}/weights.npz", "expected a .safetensors"),
        ("{tmp}", "holds none of model.safetensors, model.pt"),
        ("random:huge", "unknown preset 'huge'; choose one of vggt-1b, tiny"),
    ],
)
def test_unusable_specs_raise_weights_error(tmp_path, spec, message):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match=message):
        load_vggt(spec.format(tmp=tmp_path))


def test_hub_id_without_huggingface_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(WeightsError, match="facebook/VGGT-1B: downloading needs huggingface_hub"):
        load_vggt("facebook/VGGT-1B")


@pytest.mark.parametrize(
    "failure, message",
    [
        ("offline", "not in the local Hugging Face cache and the Hub cannot be reached"),
        ("network", "cannot fetch model.safetensors .*ConnectionError"),
    ],
)
def test_hub_download_failure_is_a_clear_error(monkeypatch, failure, message):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def download(**kwargs):
        raise LocalEntryNotFoundError("cache miss") if failure == "offline" else ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(WeightsError, match=message):
        load_vggt("facebook/VGGT-1B")


def test_random_weights_are_reproducible_from_the_seed():
    images = torch.rand(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    first, first_id = load_vggt("random:tiny@3")
    again, _ = load_vggt("random:tiny@3")
    other, other_id = load_vggt("random:tiny@4")
    assert (first_id, other_id) == ("random:tiny+seed3", "random:tiny+seed4")
    assert load_vggt("random:tiny")[1] == "random:tiny+seed0"
    assert weights_config("random:tiny@9") == VGGTConfig.tiny()
    assert first.config == VGGTConfig.tiny()
    assert torch.equal(first(images)[-1], again(images)[-1])
    assert not torch.allclose(first(images)[-1], other(images)[-1])


# ---- forward ----------------------------------------------------------------------------------------------------


def test_only_requested_layers_are_computed(small_model, small_images):
    calls = []
    hooks = [
        block.register_forward_hook(lambda *_: calls.append(1))
        for block in [*small_model.aggregator.frame_blocks, *small_model.aggregator.global_blocks]
    ]
    try:
        full = small_model(small_images, layers=(0, 1, 2))
        assert len(calls) == 6
        calls.clear()
        only = small_model(small_images, layers=(1,))
        assert len(calls) == 4
    finally:
        for hook in hooks:
            hook.remove()
    assert list(only) == [1]
    assert torch.equal(only[1], full[1])
    assert only[1].shape == (2, 3, 2 * 3, 2 * SMALL.embed_dim) and only[1].dtype == torch.float32


def test_negative_layers_count_from_the_end(small_model, small_images):
    out = small_model(small_images, layers=(-1, 0))
    assert set(out) == {-1, 0}
    assert torch.equal(out[-1], small_model(small_images, layers=(2,))[2])
    with pytest.raises(SfcacheError, match=r"^layers 3: this VGGT has layers 0\.\.2 \(or -3\.\.-1; "):
        small_model(small_images, layers=(3,))


@pytest.mark.parametrize(
    "layers, flag, distinct, message",
    [
        ((-2, 0), LAYERS, False, None),
        ((5,), LAYERS, False, r"^ExtractConfig\.layers 5: this VGGT has layers 0\.\.3 \(or -4\.\.-1; -1 is the last"),
        ((1, -5), Field("TrainConfig", "cache_layer"), False, r"^TrainConfig\.cache_layer -5: this VGGT has layers"),
        ((), LAYERS, False, r"^ExtractConfig\.layers \(none\): this VGGT has layers 0\.\.3"),
        ((3, -1), LAYERS, True, r"^ExtractConfig\.layers 3,-1: names the same layer twice"),
        ((7,), "layers", False, r"^layers 7: this VGGT has layers 0\.\.3"),  # a direct call's argument
    ],
)
def test_resolve_layers_names_the_config_field_the_layer_and_the_range(layers, flag, distinct, message):
    if message is None:
        assert resolve_layers(layers, 4, flag, distinct) == (2, 0)
        assert resolve_layers((3, -1), 4) == (3, 3)  # one layer under two names is fine for the model
    else:
        with pytest.raises(SfcacheError, match=message):
            resolve_layers(layers, 4, flag, distinct)


def test_channels_split_into_frame_then_global_halves(small_model, small_images):
    """A single frame: the global block sees the same tokens as the frame block but has other weights."""
    out = small_model(small_images[:, :1], layers=(0,))[0]
    frame_half, global_half = out[..., : SMALL.embed_dim], out[..., SMALL.embed_dim :]
    # the frame block's output is the global block's input, so both halves differ only by one residual block
    assert not torch.allclose(frame_half, global_half)
    assert (global_half - frame_half).abs().mean() < frame_half.abs().mean()


def test_first_frame_is_special(small_model):
    """Frame 0 gets camera/register slot 0, later frames slot 1: a repeated frame gives other features."""
    frame = torch.rand(1, 1, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    out = small_model(frame.repeat(1, 3, 1, 1, 1), layers=(0,))[0]
    assert not torch.allclose(out[:, 0], out[:, 1])
    assert torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_bad_images_raise():
    model = VGGTFeatures(SMALL)
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.rand(1, 1, 3, 30, 28))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 1, 3, 28, 28, dtype=torch.uint8))


def test_compute_dtype_defaults_to_fp32_on_cpu_and_can_be_chosen(small_model, small_images):
    assert small_model.compute_dtype_for(torch.device("cpu")) == torch.float32
    bf16 = VGGTFeatures(SMALL, compute_dtype=torch.bfloat16, seed=1)
    reference = small_model(small_images)[-1]
    low = bf16(small_images)[-1]
    assert low.dtype == torch.float32 and not torch.equal(low, reference)
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()


def test_tiny_preset_exercises_every_path():
    config = VGGTConfig.tiny()
    assert config.patch_embed == "dinov2" and config.num_register_tokens == 4 and config.num_heads >= 2
    model = VGGTFeatures(config)
    assert model.aggregator.patch_embed.pos_embed.shape == (1, 1 + 16 * 16, 128)
    out = model(torch.rand(1, 2, 3, 56, 70), layers=(-1,))[-1]  # pos-embed interpolated to 4x5
    assert out.shape == (1, 2, 20, 256)


# ---- preprocessing ------------------------------------------------------------------------------------------------


def frames_of(height: int, width: int, views: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(1, views, height, width, 3), dtype=np.uint8)


def pil_bicubic(frame: np.ndarray, width: int, height: int) -> torch.Tensor:
    resized = np.array(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
    return torch.from_numpy(resized).permute(2, 0, 1).float() / 255


def test_crop_mode_geometry_and_values():
    wide = frames_of(240, 320)
    out = preprocess(wide, "crop")
    assert out.shape == (1, 2, 3, 392, 518)  # 240 * 518 / 320 / 14 = 27.75 -> 28 patches
    assert torch.equal(out[0, 1], pil_bicubic(wide[0, 1], 518, 392))
    tall = frames_of(320, 240, views=1)
    out = preprocess(tall, "crop")
    assert out.shape == (1, 1, 3, 518, 518)  # resized to 518 x 686, center 518 rows kept
    assert torch.equal(out[0, 0], pil_bicubic(tall[0, 0], 518, 686)[:, 84:602])


def test_pad_mode_geometry_and_white_padding():
    wide = frames_of(240, 320)
    out = preprocess(wide, "pad")
    assert out.shape == (1, 2, 3, 518, 518)
    assert torch.equal(out[0, 0, :, 63:455], pil_bicubic(wide[0, 0], 518, 392))
    assert torch.all(out[0, :, :, :63] == 1.0) and torch.all(out[0, :, :, 455:] == 1.0)
    tall = preprocess(frames_of(320, 240, views=1), "pad")
    assert torch.all(tall[..., :, :63] == 1.0) and torch.all(tall[..., :, 455:] == 1.0)


def test_sf_mode_is_the_bicubic_upsample_of_the_policy_frame():
    checker = np.kron(np.indices((28, 28)).sum(0) % 2, np.ones((8, 8)))  # hard edges overshoot
    frames = (np.stack([checker * 255] * 3, -1)[None, None]).astype(np.uint8)
    out = preprocess(frames, "sf")
    expected = F.interpolate(
        torch.from_numpy(frames[0]).permute(0, 3, 1, 2).float() / 255,
        size=(518, 518),
        mode="bicubic",
        align_corners=False,
    )
    assert out.shape == (1, 1, 3, 518, 518)
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert out.min() < 0 and out.max() > 1  # not clamped, as in SF's trainer
    assert preprocess(frames, "sf", img_size=224).shape == (1, 1, 3, 224, 224)


def test_sf_mode_resizes_other_frames_like_the_rlds_pipeline():
    frames = frames_of(256, 256)
    policy_frames = resize_like_rlds(frames[0], 224, 224)[None]
    assert torch.equal(preprocess(frames, "sf"), preprocess(policy_frames, "sf"))


@pytest.mark.parametrize("case", ["down", "odd", "up"])
def test_rlds_resize_matches_tensorflow(case):
    """Expected frames were made with tf.image.resize(lanczos3, antialias=True) + round + clip (TF 2.21)."""
    fixture = np.load(DATA / "vggt_rlds_resize.npz")
    expected = fixture[f"{case}_expected"]
    resized = resize_like_rlds(fixture[f"{case}_input"][None], *expected.shape[:2])[0]
    assert np.array_equal(resized, expected)


def test_preprocess_accepts_torch_and_rejects_bad_frames():
    frames = frames_of(224, 224, views=1)
    assert torch.equal(preprocess(torch.from_numpy(frames), "sf", 112), preprocess(frames, "sf", 112))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(frames.astype(np.float32), "sf")
    with pytest.raises(ValueError, match="mode"):
        preprocess(frames, "stretch")
    with pytest.raises(ValueError, match="multiple of 14"):
        preprocess(frames, "crop", img_size=500)
