"""Recipes: `--recipe openvla-oft` decodes as TF and `--recipe openpi` letterboxes as openpi, with pi0's three
camera slots and a token mask that flows through CachedTargets into the loss; compute dtype is recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import LocalCluster
from PIL import Image
from typer.testing import CliRunner

from sfcache.cli.main import app
from sfcache.errors import ConfigMismatch, SfcacheError, StoreError
from sfcache.extract import ExtractConfig, extract, plan
from sfcache.inspection import check, label_band, open_store, pca_picture, summarize, verify, vggt_frames
from sfcache.inspection.pictures import _hatched
from sfcache.pooling import pooled_targets
from sfcache.recipes import RECIPES, insert_blanks, recipe_inputs
from sfcache.sources import open_source
from sfcache.sources.images import decode_image, encode_jpeg
from sfcache.sources.synthetic import write_lerobot, write_libero_hdf5, write_libero_rlds, write_robotwin
from sfcache.store import open_cache
from sfcache.torch import CachedTargets, SpatialForcingLoss
from sfcache.train.data import open_training_data
from sfcache.vggt import load_vggt
from sfcache.vggt.preprocess import letterbox, letterbox_mask, preprocess

GOLDEN = Path(__file__).parent / "data" / "tf_jpeg_golden.npz"


@pytest.fixture(scope="module")
def scheduler():
    with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster:
        yield cluster.scheduler_address


def reference(source, recipe: str, layout, grid=(16, 16), compute_dtype=None):
    """Targets and mask per episode, computed in this process from the recipe's inputs."""
    model = load_vggt("random:tiny", "cpu", compute_dtype=compute_dtype)[0]
    out = {}
    for info in source.episodes():
        images, mask = recipe_inputs(
            source.read(info.key).frames,
            RECIPES[recipe],
            layout,
            RECIPES[recipe].preprocess,
            model.config.img_size,
            grid,
            14,
        )
        out[info.key] = (pooled_targets(model, images, (-1,), grid)[3].numpy(), mask)
    return out


# ----------------------------------------------------------------------------- openvla-oft


def test_fast_dct_decode_equals_tensorflow_default_decode_on_tf_written_jpegs():
    """tests/data/tf_jpeg_golden.npz: JPEGs from tf.io.encode_jpeg and tf.io.decode_image's output."""
    golden = np.load(GOLDEN)
    for index in range(2):
        data, expected = golden[f"jpeg_{index}"].tobytes(), golden[f"tf_decoded_{index}"]
        np.testing.assert_array_equal(decode_image(data, fast_dct=True), expected)
        assert (decode_image(data) != expected).mean() > 0.3  # libjpeg's ISLOW default is not TF's decode


def test_openvla_oft_recipe_decodes_rlds_as_tf_and_records_compute_dtype(tmp_path, scheduler):
    written = write_libero_rlds(tmp_path / "data", episodes=1, steps=2, size=64)
    summary = extract(
        ExtractConfig(
            source=written.path,
            out=tmp_path / "s",
            vggt="random:tiny",
            recipe="openvla-oft",
            compute_dtype="bfloat16",
            scheduler=scheduler,
        ),
        progress=False,
    )
    cache = open_cache(tmp_path / "s")
    assert summary.recipe == cache.recipe == "openvla-oft" and cache.provenance.vggt.preprocess == "sf"
    assert cache.provenance.vggt.compute_dtype == "bfloat16" and not cache.has_mask
    source = open_source(written.path)
    key = cache.episodes[0]
    islow = source.read(key).frames
    source.jpeg_fast_dct = True
    ifast = source.read(key).frames
    want = np.stack(
        [[decode_image(encode_jpeg(frame), fast_dct=True) for frame in step] for step in written.episodes[key].frames]
    )
    np.testing.assert_array_equal(ifast, want)
    assert (ifast != islow).any()
    expected, _ = reference(source, "openvla-oft", ("primary", "wrist"), compute_dtype=torch.bfloat16)[key]
    np.testing.assert_allclose(cache.read(key), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
    assert summarize(cache).recipe.jpeg_dct == "ifast" and not summarize(cache).warnings[1:]


def test_openvla_oft_from_hdf5_says_it_matches_only_from_rlds(tmp_path, scheduler):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=1, steps=1, size=32)
    extract(
        ExtractConfig(
            source=written.path, out=tmp_path / "s", vggt="random:tiny", recipe="openvla-oft", scheduler=scheduler
        ),
        progress=False,
    )
    warnings = summarize(open_store(tmp_path / "s")).warnings
    assert any("only when extracted from modified_libero_rlds" in w for w in warnings)


# ----------------------------------------------------------------------------- openpi


@pytest.mark.parametrize("size", [(240, 320), (480, 640), (300, 200), (97, 131), (256, 256), (224, 224)])
def test_letterbox_equals_openpi_resize_with_pad_bit_for_bit(size):
    image_tools = pytest.importorskip("openpi_client.image_tools")
    frames = np.random.default_rng(sum(size)).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(letterbox(frames), image_tools.resize_with_pad(frames, 224, 224))
    white = image_tools.resize_with_pad(np.full((1, *size, 3), 255, np.uint8), 224, 224)[0]
    np.testing.assert_array_equal(letterbox_mask(*size), white.min(axis=-1) == 255)  # content = pasted pixels


def test_openpi_vggt_input_is_the_white_padded_policy_image_upsampled():
    """openpi-SF's VGGT copy: uint8 -> [-1, 1] -> [0, 1], padding white, bicubic to 518, not clamped."""
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 240, 320, 3), dtype=np.uint8)
    policy = torch.from_numpy(letterbox(frames[0])).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
    copy = policy / 2.0 + 0.5
    copy[:, :, ~torch.from_numpy(letterbox_mask(240, 320))] = 1.0
    want = F.interpolate(copy, size=(518, 518), mode="bicubic", align_corners=False)
    assert torch.equal(preprocess(frames, "letterbox", 518)[0], want)
    assert want.max() > 1.0 or want.min() < 0.0  # bicubic overshoot is kept


def test_openpi_store_from_two_cameras_has_three_slots_blank_masked(tmp_path, scheduler):
    written = write_robotwin(tmp_path / "data", tasks=1, episodes=1, steps=2, height=48, width=64)
    config = ExtractConfig(
        source=written.path,
        out=tmp_path / "s",
        vggt="random:tiny",
        recipe="openpi",
        views=("head", "left_wrist"),
        scheduler=scheduler,
    )
    planned = plan(config)
    assert planned.selection.layout == ("head", "left_wrist", "blank")
    assert planned.bytes_per_step == 3 * 256 * (256 * 2 + 1)
    extract(config, progress=False)
    cache = open_store(tmp_path / "s")
    assert check(tmp_path / "s").ok
    assert cache.views == ("head", "left_wrist", "blank") and cache.recipe == "openpi" and cache.has_mask
    assert cache.provenance.vggt.preprocess == "letterbox" and cache.provenance.source["views"] == [
        "head",
        "left_wrist",
    ]
    key = cache.episodes[0]
    values, mask = cache.read(key, mask=True)
    assert values.shape == (2, 3, 256, 256) and mask.shape == (2, 3, 256) and mask.dtype == bool
    assert not mask[:, 2].any()  # the blank slot
    rows = np.flatnonzero(
        F.interpolate(torch.from_numpy(letterbox_mask(48, 64)).float()[None, None], size=(16, 16), mode="nearest")[0, 0]
        .bool()
        .any(dim=1)
        .numpy()
    )
    assert rows.tolist() == list(range(2, 14))  # 48x64 -> 168 rows of 224 -> token rows 2..13
    assert mask[:, :2].reshape(2, 2, 16, 16)[:, :, rows].all() and mask[:, :2].sum() == 2 * 2 * 12 * 16
    expected, expected_mask = reference(open_source(written.path, views=("head", "left_wrist")), "openpi", cache.views)[
        key
    ]
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(values, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    summary = summarize(cache)
    assert summary.recipe.slots == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    result = verify(cache, steps=2)
    assert result.ok and result.mask_errors == 0
    shown = CliRunner().invoke(app, ["inspect-cache", str(tmp_path / "s")], catch_exceptions=False).output
    assert "openpi: matches OpenHelix-Team/Spatial-Forcing openpi-SF" in " ".join(shown.split())
    assert summary.recipe.jpeg_dct == "islow"  # RoboTwin stores JPEGs: the decode is shown
    # its picture shows what VGGT saw (the letterbox, padding white) and draws masked tokens hatched
    picture = pca_picture(cache, tmp_path / "pca.png", steps=1)
    image, band = np.asarray(Image.open(picture.path).convert("RGB")), label_band(6 * 224, [key.rpartition("/")[0]])
    assert (picture.width, picture.height) == (6 * 224, band + 224)
    frame = open_source(written.path, views=("head", "left_wrist")).read(key, 0, 1).frames  # [1, 2, 48, 64, 3]
    seen = vggt_frames(insert_blanks(frame, cache.views), "letterbox")[0]  # [3, 224, 224, 3]
    assert (seen[0, :20] == 255).all() and (seen[2] == 255).all()  # white padding, a white blank slot
    below = 16  # rows under the step label
    np.testing.assert_array_equal(image[band + below : band + 224, :224], seen[0, below:])
    blank_pca = image[band : band + 224, 5 * 224 :]
    assert set(np.unique(blank_pca[:, :, 0]).tolist()) >= {70, 150}  # hatched (and its "masked" label)
    padding_pca = image[band + 210 : band + 224, 224:448]  # token rows 14-15: the letterbox padding
    np.testing.assert_array_equal(padding_pca, _hatched((224, 224))[210:224])
    resumed = ExtractConfig(
        source=written.path,
        out=tmp_path / "s",
        vggt="random:tiny",
        recipe="none",
        views=("head", "left_wrist"),
        scheduler=scheduler,
    )
    with pytest.raises(ConfigMismatch, match="recipe"):
        extract(resumed, progress=False)


def test_masks_flow_through_cached_targets_dataloader_and_loss(tmp_path, scheduler):
    written = write_robotwin(tmp_path / "data", tasks=1, episodes=1, steps=3, height=48, width=64)
    extract(
        ExtractConfig(
            source=written.path,
            out=tmp_path / "s",
            vggt="random:tiny",
            recipe="openpi",
            views=("head", "blank", "left_wrist"),
            scheduler=scheduler,
        ),
        progress=False,
    )
    targets = CachedTargets(tmp_path / "s", recipe="openpi")
    assert targets.views == ("head", "blank", "left_wrist")
    one, one_mask = targets[1]
    assert one.shape == (3, 256, 256) and one_mask.shape == (3, 256) and not one_mask[1].any()
    loader = torch.utils.data.DataLoader(targets, batch_size=3)
    batch, mask = next(iter(loader))
    assert batch.shape == (3, 3, 256, 256) and mask.shape == (3, 3, 256) and mask.dtype == torch.bool
    key_batch, key_mask = targets.targets_for([targets.cache.episodes[0]] * 2, [0, 2])
    assert torch.equal(key_batch, batch[[0, 2]]) and torch.equal(key_mask, mask[[0, 2]])

    loss_fn = SpatialForcingLoss(vla_dim=32, target_dim=256)
    tokens = torch.randn(3, 3 * 256, 32, requires_grad=True)
    mask[0] = False  # a sample with no valid token
    batch[0, 0, 0] = float("nan")  # ... even hiding a NaN
    loss, per = loss_fn(tokens, batch, mask=mask, per_sample=True)
    loss.backward()
    assert per[0] == 0 and torch.isfinite(loss) and torch.isfinite(tokens.grad).all()
    assert tokens.grad[0].abs().sum() == 0 and tokens.grad[1].abs().sum() > 0
    assert torch.isclose(loss, per[1:].mean())
    nothing = loss_fn(tokens, batch, mask=torch.zeros_like(mask))
    nothing.backward()
    assert nothing.item() == 0 and torch.isfinite(tokens.grad).all()

    with pytest.raises(SfcacheError, match="ExtractConfig.recipe openpi, but recipe 'openvla-oft'"):
        CachedTargets(tmp_path / "s", recipe="openvla-oft")
    with pytest.raises(SfcacheError, match="token mask"):
        CachedTargets(tmp_path / "s", return_mask=False)
    with pytest.raises(SfcacheError, match="sf train trains an OpenVLA-OFT-style policy"):
        open_training_data(written.path, tmp_path / "s", ("head", "left_wrist"), (16, 16), 4, 8, 0)


# ----------------------------------------------------------------------------- options and old stores


@pytest.mark.parametrize(
    "options, message",
    [
        ({"recipe": "pi05"}, "ExtractConfig.recipe must be one of none, openvla-oft, openpi"),
        ({"recipe": "openpi", "preprocess": "sf"}, "ExtractConfig.recipe openpi fixes the VGGT input"),
        ({"preprocess": "letterbox"}, "letterbox comes with ExtractConfig.recipe openpi"),
        ({"compute_dtype": "float16"}, "ExtractConfig.compute_dtype must be one of auto, bfloat16, float32"),
    ],
)
def test_bad_recipe_options_are_one_clear_error(tmp_path, options, message):
    with pytest.raises(SfcacheError, match=message):
        ExtractConfig(source=tmp_path, out=tmp_path / "s", vggt="random:tiny", **options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"recipe": "openvla-oft", "views": ("head", "left_wrist")}, "takes views primary,wrist"),
        ({"views": ("head", "blank")}, "blank slots exist only with ExtractConfig.recipe openpi"),
        ({"recipe": "openpi", "views": ("head", "left_wrist", "right_wrist", "blank")}, "has 3 camera slots"),
        ({"recipe": "openpi", "views": ("blank",)}, "at least one camera view"),
    ],
)
def test_views_that_do_not_fit_the_recipe_are_refused(tmp_path, options, message):
    written = write_robotwin(tmp_path / "data", tasks=1, episodes=1, steps=1, height=24, width=32)
    with pytest.raises(SfcacheError, match=message):
        extract(ExtractConfig(source=written.path, out=tmp_path / "s", vggt="random:tiny", **options), progress=False)


def test_openpi_fills_pi0_slots_from_the_default_views(tmp_path):
    written = write_lerobot(tmp_path / "data", episodes=1, steps=1, size=32)
    planned = plan(ExtractConfig(source=written.path, out=tmp_path / "s", vggt="random:tiny", recipe="openpi"))
    assert planned.selection.recipe.name == "openpi" and planned.selection.layout == ("primary", "wrist", "blank")


def test_version_1_store_stays_readable_and_is_not_resumed(tmp_path, scheduler):
    written = write_libero_rlds(tmp_path / "data", episodes=1, steps=2, size=32)
    config = ExtractConfig(source=written.path, out=tmp_path / "s", vggt="random:tiny", scheduler=scheduler)
    extract(config, progress=False)
    before = open_cache(tmp_path / "s").read_rows(slice(0, 2))
    meta = tmp_path / "s" / "zarr.json"
    document = json.loads(meta.read_text())
    attrs = document["attributes"]["sfcache"]
    attrs["format_version"] = 1  # what sfcache wrote before recipes
    del attrs["recipe"], attrs["targets"]["mask"]
    meta.write_text(json.dumps(document))
    old = open_cache(tmp_path / "s")
    assert old.recipe == "none" and not old.has_mask
    values, mask = old.read_rows(slice(0, 2), mask=True)
    np.testing.assert_array_equal(values, before)
    assert mask.all() and CachedTargets(tmp_path / "s", recipe="none").return_mask is False
    with pytest.raises(ConfigMismatch, match="format_version"):
        extract(config, progress=False)
    attrs["format_version"] = 0
    meta.write_text(json.dumps(document))
    with pytest.raises(StoreError, match="reads 1, 2"):
        open_cache(tmp_path / "s")
