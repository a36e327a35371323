"""OpenVLA-OFT's RLDS pipeline, run with real TensorFlow + TFDS, joins each sample to its cached target and crop.

dlimp (pins tensorflow 2.15) and prismatic (OFT's own repository) are not installable from the registry,
so `oft_pipeline` below replicates, op for op, the parts of them the join depends on:
- dlimp `DLataset.from_rlds`: `builder.as_dataset(split, shuffle_files, decoders={"steps": SkipDecoding()},
  read_config)`, then the steps moved to the top with the episode's metadata repeated per step as
  `traj_metadata` (`_broadcast_metadata_rlds`);
- OFT `make_dataset_from_rlds.restructure` (image_obs_keys primary/wrist, timestep) with the one line
  users add (`episode_fields`), `add_pad_mask_dict`, `chunk_act_obs` (window 1, future actions),
  flatten and a frame shuffle;
- `decode_and_resize`: `tf.io.decode_image` + dlimp `resize_image` (lanczos3, antialias, round, clip);
- OFT `augment` (`oft_augment`: seed + i over the set of image names, per-camera kwargs, skipping padding)
  calling `dlimp.transforms.augment_image`, applied per observation window through dlimp's `vmap`.
OFT's `augment` and dlimp's `augment_image` are `tests/_oft_doubles.py`, in both seedings users have installed (the
fork OFT pins, and upstream); every test of the boxes runs against both.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import LocalCluster

from sfcache.errors import SfcacheError, StoreError
from sfcache.extract import ExtractConfig, extract
from sfcache.integrations import openvla_oft as sf_oft
from sfcache.pooling import pooled_targets
from sfcache.sources import EpisodeInfo, open_source
from sfcache.sources.synthetic import write_libero_rlds
from sfcache.store import create_store, lock_store, open_cache, pack_episodes
from sfcache.torch import CachedTargets, SpatialForcingLoss, crop_target_grid
from sfcache.train.augment import crop_images
from sfcache.vggt import load_vggt
from sfcache.vggt.preprocess import preprocess
from tests._oft_doubles import OFT_AUGMENT, VARIANTS, crop_seed, draw_crop_box, installed, oft_augment
from tests.test_store import build, make_config

EPISODES, STEPS, FUTURE, SIZE, POLICY = 4, 6, 2, 96, 224
IMAGE_KEYS = {"primary": "image", "wrist": "wrist_image"}
CROP_ONLY = dict(random_resized_crop=OFT_AUGMENT["random_resized_crop"], augment_order=["random_resized_crop"])


def vmap(tf, fn):
    """dlimp's `vmap`: `fn` on each element of the leading axis, restacked."""

    def mapped(structure):
        elements = zip(*map(tf.unstack, tf.nest.flatten(structure)))
        results = [fn(tf.nest.pack_sequence_as(structure, list(element))) for element in elements]
        return tf.nest.map_structure(lambda *x: tf.stack(x), *results)

    return mapped


def oft_pipeline(tf, tfds, builder):
    """Frames as OFT's training pipeline yields them, each augmented twice with one seed (OFT's kwargs and
    crop only), plus the un-augmented 224 px frames under `test_unaugmented`."""
    episodes = builder.as_dataset(
        split="train",
        shuffle_files=True,
        decoders={"steps": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(skip_prefetch=True),
    )

    def steps_on_top(episode):
        steps = dict(episode)
        steps = steps.pop("steps")
        length = tf.shape(tf.nest.flatten(steps)[0])[0]
        metadata = {k: v for k, v in episode.items() if k != "steps"}
        return {**steps, "traj_metadata": tf.nest.map_structure(lambda x: tf.repeat(x, length), metadata)}

    def restructure(traj):
        length = tf.shape(traj["action"])[0]
        new_obs = {f"image_{new}": traj["observation"][old] for new, old in IMAGE_KEYS.items()}
        new_obs["proprio"] = traj["observation"]["state"]
        new_obs["timestep"] = tf.range(length)
        new_obs.update(sf_oft.episode_fields(traj))  # the line users add
        new_obs["pad_mask_dict"] = {
            f"image_{new}": tf.strings.length(new_obs[f"image_{new}"]) != 0 for new in IMAGE_KEYS
        }
        kept = length - FUTURE  # chunk_act_obs, window 1
        actions = tf.gather(traj["action"], tf.minimum(tf.range(kept)[:, None] + tf.range(FUTURE + 1), length - 1))
        return {
            "observation": tf.nest.map_structure(lambda x: tf.gather(x, tf.range(kept)[:, None]), new_obs),
            "action": actions,
            "language_instruction": traj["language_instruction"][:kept],
        }

    def decode_and_resize(obs):
        for view in IMAGE_KEYS:
            image = tf.io.decode_image(obs[f"image_{view}"], expand_animations=False, dtype=tf.uint8)
            image = tf.image.resize(image, (POLICY, POLICY), method="lanczos3", antialias=True)
            obs[f"image_{view}"] = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return obs

    augment = sf_oft.augment_with_boxes(oft_augment)  # the line users change

    def frame_transforms(frame):
        obs = vmap(tf, decode_and_resize)(frame["observation"])
        seed = tf.random.uniform([2], maxval=tf.dtypes.int32.max, dtype=tf.int32)
        crop_only = vmap(tf, lambda o: augment(o, seed=seed, augment_kwargs=CROP_ONLY))(dict(obs))
        augmented = vmap(tf, lambda o: augment(o, seed=seed, augment_kwargs=OFT_AUGMENT))(dict(obs))
        augmented["test_crop_only"] = tf.stack([crop_only["image_primary"], crop_only["image_wrist"]], axis=1)
        augmented["test_crop_only_boxes"] = crop_only["sf_crop_boxes"]
        augmented["test_unaugmented"] = tf.stack([obs["image_primary"], obs["image_wrist"]], axis=1)
        return {**frame, "observation": augmented}

    frames = episodes.map(steps_on_top).map(restructure).flat_map(tf.data.Dataset.from_tensor_slices)
    return frames.shuffle(64, seed=3).map(frame_transforms)


@pytest.fixture(scope="module")
def oft(tmp_path_factory):
    """OFT-pipeline runs over a small RLDS dataset with its cache, one per dlimp variant: collated batches."""
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tmp_path_factory.mktemp("oft")
    written = write_libero_rlds(root / "data", episodes=EPISODES, steps=STEPS, size=SIZE, shards=2)
    with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster:
        extract(
            ExtractConfig(
                source=written.path,
                out=root / "store",
                vggt="random:tiny",
                layers=(-1,),
                recipe="openvla-oft",
                steps_per_shard=8,
                batch_size=4,
                scheduler=cluster.scheduler_address,
            ),
            progress=False,
        )
    builder = sf_oft.with_tfds_ids(tfds.builder_from_directory(str(written.path / "1.0.0")))
    transform = sf_oft.with_sf_fields(lambda sample: {"observation": sample["observation"]})
    collate = sf_oft.collate_with_sf_fields(lambda items: {"observation": [i["observation"] for i in items]})
    batches = {}
    for variant in VARIANTS:
        with installed(variant):
            samples = [transform(sample) for sample in oft_pipeline(tf, tfds, builder).as_numpy_iterator()]
        batches[variant] = [collate(samples[i : i + 4]) for i in range(0, len(samples), 4)]
    return {
        "tf": tf,
        "tfds": tfds,
        "builder": builder,
        "written": written,
        "store": root / "store",
        "batches": batches["fork"],
        "variants": batches,
    }


def test_tfds_ids_name_sfcache_episodes_and_train_slices(oft):
    """TFDS's train[i:i+1] is sfcache's episode_i, and its tfds_id maps to that key in the store."""
    tfds, cache, source = oft["tfds"], open_cache(oft["store"]), open_source(oft["written"].path)
    assert "tfds_shards" in cache.attrs["source"]
    for i in range(EPISODES):
        (episode,) = oft["builder"].as_dataset(
            split=f"train[{i}:{i + 1}]", read_config=tfds.ReadConfig(add_tfds_id=True)
        )
        key = cache.key_for(episode["tfds_id"].numpy().decode())
        assert key == f"libero_10_no_noops/episode_{i:06d}" and cache.episode(key).length == STEPS
        actions = np.stack([step["action"].numpy() for step in episode["steps"]])
        np.testing.assert_array_equal(actions, source.read(key).actions)


def online_targets(model, frames: np.ndarray, targets: CachedTargets) -> torch.Tensor:
    """What online SF computes for frames [B, V, H, W, 3] (random tiny VGGT): [B, V*256, C] with pool(E)."""
    with torch.no_grad():
        images = preprocess(frames, "sf", model.config.img_size)
        (pooled,) = pooled_targets(model, images, model.resolve_layers((-1,)), targets.grid).values()
    return (pooled + targets.position_embedding()).flatten(1, 2)


def test_every_sample_is_joined_to_the_target_of_its_unaugmented_frame(oft):
    """Exact against VGGT on sfcache's decode of the joined (episode, step), and against VGGT on the pipeline's
    own un-augmented frame: `--recipe openvla-oft` decodes JPEGs as TF does (IFAST) and resizes as dlimp does."""
    targets, source = CachedTargets(oft["store"], recipe="openvla-oft"), open_source(oft["written"].path)
    source.jpeg_fast_dct = True  # what the recipe reads with
    model = load_vggt("random:tiny", "cpu")[0]
    batches = oft["batches"]
    seen = {(tfds_id, int(step)) for b in batches for tfds_id, step in zip(b["sf_tfds_id"], b["sf_step"])}
    assert len(seen) == EPISODES * (STEPS - FUTURE) == sum(len(b["sf_step"]) for b in batches)
    for batch in batches[:2]:
        full = {**batch, "sf_crop_boxes": torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * 2] * len(batch["sf_step"]))}
        joined = sf_oft.batch_targets(targets, full)  # [B, V*256, C]
        keys = [targets.cache.key_for(tfds_id) for tfds_id in batch["sf_tfds_id"]]
        decoded = np.stack([source.read(k, int(t), int(t) + 1).frames[0] for k, t in zip(keys, batch["sf_step"])])
        exact = F.cosine_similarity(joined, online_targets(model, decoded, targets), dim=-1)
        assert exact.min() > 0.99999, exact.min()
        frames = np.stack([obs["test_unaugmented"][0] for obs in batch["observation"]])
        online = online_targets(model, frames, targets)
        cosine = F.cosine_similarity(joined, online, dim=-1)  # [B, tokens]
        assert cosine.min() > 0.99999, cosine.min()
        # a neighbouring step's target is much further away: the join picks this very frame
        other = targets.targets_for(batch["sf_tfds_id"], (batch["sf_step"] + 1) % (STEPS - FUTURE)).flatten(1, 2)
        assert (F.cosine_similarity(other, online, dim=-1).mean(1) < cosine.mean(1) - 1e-3).all()
        cropped = sf_oft.batch_targets(targets, batch)
        expected = (
            crop_target_grid(
                targets.targets_for(batch["sf_tfds_id"], batch["sf_step"]) - targets.position_embedding(),
                targets.grid,
                targets.native_grid,
                batch["sf_crop_boxes"],
            )
            + targets.position_embedding()
        )
        torch.testing.assert_close(cropped, expected.flatten(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_crop_boxes_are_the_crops_dlimp_applied_per_view(oft, variant):
    """Against both dlimps: every sample's box, cropping its un-augmented frame, gives the pixels dlimp's crop
    gave (within uint8 truncation); the same box 1 px off does not."""
    checked, worst = 0, 0.0
    for batch in oft["variants"][variant]:
        boxes = batch["sf_crop_boxes"]  # [B, V, 4]
        assert boxes.shape[1:] == (2, 4)
        crop_only = torch.from_numpy(np.stack([obs["test_crop_only_boxes"][0] for obs in batch["observation"]]))
        torch.testing.assert_close(boxes, crop_only, rtol=0, atol=1e-6)  # the crop is OFT's first op
        assert not torch.equal(boxes[:, 0], boxes[:, 1])  # each view has its own seed
        spans = boxes[..., 2:] - boxes[..., :2]
        torch.testing.assert_close(spans, torch.full_like(spans, 0.9**0.5), rtol=0, atol=1e-5)
        raw = torch.from_numpy(np.stack([obs["test_unaugmented"][0] for obs in batch["observation"]]))
        applied = np.stack([obs["test_crop_only"][0] for obs in batch["observation"]]).astype(np.int16)
        full = np.stack([obs["image_primary"][0] for obs in batch["observation"]]).astype(np.int16)
        assert np.abs(full - applied[:, 0]).mean() > 1.0  # OFT's kwargs also change colours
        for view in range(2):
            image = raw[:, view].permute(0, 3, 1, 2)[:, None].float() / 255
            ours = (crop_images(image, boxes[:, view], POLICY)[:, 0].permute(0, 2, 3, 1) * 255).numpy()
            worst = max(worst, np.abs(ours - applied[:, view]).max())
            for shift in ([1, 1, 1, 1], [0, 0, 1, 1], [-1, 0, -1, 0]):  # moved 1 px, or grown 1 px
                off = boxes[:, view] + torch.tensor(shift, dtype=torch.float32) / POLICY
                moved = (crop_images(image, off, POLICY)[:, 0].permute(0, 2, 3, 1) * 255).numpy()
                assert np.abs(moved - applied[:, view]).max(axis=(1, 2, 3)).min() > 2  # every sample sees it
            checked += len(boxes)
    assert worst <= 1.01, worst  # uint8 truncation
    assert checked == 2 * EPISODES * (STEPS - FUTURE)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_boxes_follow_the_installed_dlimps_seeds_with_colour_ops_before_the_crop(variant):
    """Colour ops ahead of the crop change the fork's crop seed, not upstream's; per-camera kwargs, padding views
    and views without a crop get the full image; a flip is refused."""
    tf = pytest.importorskip("tensorflow")
    height, width = 180, 240
    crop = dict(scale=[0.4, 0.8], ratio=[0.6, 1.6])
    order = ["random_brightness", "random_contrast", "random_resized_crop", "random_saturation", "random_hue"]
    kwargs = {**OFT_AUGMENT, "random_resized_crop": crop, "augment_order": order}
    obs = {
        "image_primary": tf.zeros((height, width, 3), tf.uint8),
        "image_wrist": tf.zeros((height, width, 3), tf.uint8),
        "image_left": tf.zeros((8, 8, 3), tf.uint8),
        "pad_mask_dict": {"image_primary": True, "image_wrist": True, "image_left": True},
    }
    names = list({key[6:] for key in obs if key.startswith("image_")})  # OFT's seed + i enumerates this set
    augment = sf_oft.augment_with_boxes(oft_augment)
    seed = tf.constant([123, 456])
    with installed(variant):
        boxes = augment(dict(obs), seed=seed, augment_kwargs=kwargs)["sf_crop_boxes"].numpy()
    for v, view in enumerate(sf_oft.VIEWS):
        drawn = {}
        for model in VARIANTS:
            y0, x0, y1, x1 = draw_crop_box(tf, crop_seed(tf, model, seed + names.index(view), 2), **crop)[0].numpy()
            # crop_and_resize's corners sit on pixel centres: in sfcache's convention the same sampling is
            drawn[model] = np.array(
                [
                    ((height - 1) * y0 + (1 - (y1 - y0)) / 2) / height,
                    ((width - 1) * x0 + (1 - (x1 - x0)) / 2) / width,
                ]
            )
            drawn[model] = np.concatenate([drawn[model], drawn[model] + [y1 - y0, x1 - x0]])
        scale = np.array([height, width, height, width])
        assert np.abs((boxes[v] - drawn[variant]) * scale).max() < 0.01
        other = "upstream" if variant == "fork" else "fork"
        assert np.abs((boxes[v] - drawn[other]) * scale).max() > 1  # the two seedings give other crops

    per_camera = {"primary": kwargs, "wrist": {"augment_order": ["random_hue"], "random_hue": [0.05]}}
    padded = {**obs, "pad_mask_dict": {**obs["pad_mask_dict"], "image_primary": False}}
    with installed(variant):
        only_primary = augment(dict(obs), seed=seed, augment_kwargs=per_camera)["sf_crop_boxes"].numpy()
        no_crop = augment(dict(padded), seed=seed, augment_kwargs=kwargs)["sf_crop_boxes"].numpy()
        np.testing.assert_allclose(only_primary[0], boxes[0], atol=1e-6)
        np.testing.assert_allclose(only_primary[1], sf_oft.FULL_BOX, atol=1e-6)
        np.testing.assert_allclose(no_crop[0], sf_oft.FULL_BOX, atol=1e-6)
        np.testing.assert_allclose(no_crop[1], boxes[1], atol=1e-6)
        for flips in (["random_resized_crop", "random_flip_left_right"], ["random_flip_left_right"]):
            with pytest.raises(SfcacheError, match="has 'random_flip_left_right', which a crop box cannot describe"):
                augment(dict(obs), seed=seed, augment_kwargs={**kwargs, "augment_order": flips})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_check_boxes_reports_the_pixel_error_of_the_boxes_on_real_frames(oft, variant, monkeypatch):
    samples = [
        {
            "observation": {
                "image_primary": obs["test_unaugmented"][:, 0],
                "image_wrist": obs["test_unaugmented"][:, 1],
                "pad_mask_dict": {"image_primary": np.ones(1, bool), "image_wrist": np.ones(1, bool)},
            }
        }
        for obs in oft["batches"][0]["observation"]
    ]
    with installed(variant):
        report = sf_oft.check_boxes(samples, oft_augment, OFT_AUGMENT, limit=3)
        assert (report.samples, report.views) == (3, sf_oft.VIEWS)
        assert report.max_error_px < 0.05 and report.max_levels <= 1, report
        assert str(report).startswith("crop boxes of 3 samples x 2 views ['primary', 'wrist']: at most 0.0")
        measured = sf_oft.crop_boxes
        monkeypatch.setattr(sf_oft, "crop_boxes", lambda *a, **k: measured(*a, **k) + [0, 1 / POLICY, 0, 1 / POLICY])
        off = sf_oft.check_boxes(samples, oft_augment, OFT_AUGMENT, limit=3)
    assert 0.95 < off.max_error_px < 1.05 and off.max_levels > 2, off  # a box 1 px off is reported as such


def test_a_join_to_an_episode_of_another_length_fails_clearly(oft):
    targets = CachedTargets(oft["store"])
    batch = oft["batches"][0]
    with pytest.raises(StoreError, match=rf"has {STEPS} steps in the cache but {STEPS + 1} in your data pipeline"):
        sf_oft.batch_targets(targets, {**batch, "sf_episode_length": batch["sf_episode_length"] + 1})
    with pytest.raises(SfcacheError, match=r"targets.tokens"):
        SpatialForcingLoss(8, targets.channels)(
            torch.zeros(len(batch["sf_step"]), 513, 8), sf_oft.batch_targets(targets, batch)
        )


def test_sfcache_imports_after_tensorflow():
    """TensorFlow first, then sfcache's readers and inspection: no protobuf default-pool clash."""
    pytest.importorskip("tensorflow")
    code = (
        "import tensorflow, sfcache.sources, sfcache.inspection, sfcache.sources.synthetic; "
        "from sfcache.sources.tf_example import Example; "
        "print(tensorflow.train.Example.FromString(Example().SerializeToString()) is not None)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("True"), result.stderr[-2000:]


def test_tfds_ids_resolve_through_recorded_shards_and_old_stores_still_open_and_resume(tmp_path):
    build(tmp_path / "old")  # a store made before shards were recorded
    old = CachedTargets(tmp_path / "old", add_position_embedding=False)
    assert old.cache.key_for("s-train.tfrecord-00000-of-00002__0") == "s-train.tfrecord-00000-of-00002__0"
    with pytest.raises(StoreError, match="is not in the cache"):
        old.get("s-train.tfrecord-00000-of-00002__0", 0)
    episodes = pack_episodes([EpisodeInfo(f"suite_no_noops/episode_{i:06d}", "x", n) for i, n in enumerate((5, 7, 3))])
    shards = [
        ["suite_no_noops", "s-train.tfrecord-00000-of-00002", 2],
        ["suite_no_noops", "s-train.tfrecord-00001-of-00002", 1],
    ]
    source = {**make_config().source, "format": "libero_rlds", "tfds_shards": shards}
    _, values = build(tmp_path / "new", episodes=episodes, source=source)
    new = CachedTargets(tmp_path / "new", add_position_embedding=False)
    got = new.targets_for(
        [b"s-train.tfrecord-00001-of-00002__0", "s-train.tfrecord-00000-of-00002__1"],
        [2, 6],
        lengths=torch.tensor([3, 7]),
    )
    np.testing.assert_array_equal(got.numpy(), values[[5 + 7 + 2, 5 + 6]].astype(np.float16).astype(np.float32))
    with pytest.raises(StoreError, match="'s-train.tfrecord-00000-of-00002__1' has 7 steps in the cache but 8"):
        new.get("s-train.tfrecord-00000-of-00002__1", 0, length=8)
    with lock_store(tmp_path / "new"):  # shards recorded or not: the same store resumes
        create_store(tmp_path / "new", make_config(episodes=episodes, source={**source, "tfds_shards": None}))


def test_boxes_of_oft_views_are_refused_on_a_store_of_another_view_order():
    from types import SimpleNamespace

    store = SimpleNamespace(views=("wrist", "primary"), store="stores/swapped")
    with pytest.raises(SfcacheError, match=r"holds views \['wrist', 'primary'\], but OFT's crop boxes are for"):
        sf_oft.batch_targets(store, {})


DOC = Path(__file__).resolve().parents[1] / "docs" / "openvla-oft.md"
ANCHORS = Path(__file__).resolve().parent / "data" / "openvla_sf_anchors"


def doc_edits(text: str) -> dict[str, list[tuple[int, int, str, str]]]:
    """The doc's patch section: {file: [(first, last, instruction, block)]}, lines [first, last] replaced by the
    block (last = first - 1: inserted after line first - 1), each as printed."""
    section = text.split("## 2. The patch", 1)[1].split("\n## ", 1)[0]
    edits: dict[str, list] = {}
    for part in re.split(r"^### ", section, flags=re.M)[1:]:
        path = re.match(r"`([^`]+)`", part)[1]
        for instruction, block in re.findall(r"((?:[^\n]+\n)+)\n```python\n(.*?)```", part, flags=re.S):
            instruction = " ".join(instruction.split())
            if m := re.search(r"replace lines (\d+)-(\d+)", instruction, flags=re.I):
                first, last = int(m[1]), int(m[2])
            elif m := re.search(r"line (\d+) \(`[^`]+`\) becomes", instruction, flags=re.I):
                first = last = int(m[1])
            elif m := re.search(r"after line (\d+)|\(ends at line (\d+)\), add", instruction, flags=re.I):
                first, last = int(m[1] or m[2]) + 1, int(m[1] or m[2])
            else:
                raise AssertionError(f"doc instruction not understood: {instruction}")
            edits.setdefault(path, []).append((first, last, instruction, block))
    return edits


def anchor_lines(name: str) -> list[str]:
    """The committed anchor lines of one file at their line numbers, every other line blank: [line 1, ...]."""
    numbered = [
        line.split("|", 1) for line in (ANCHORS / f"{name}.lines").read_text().splitlines() if line[:1].isdigit()
    ]
    lines = [""] * max(int(number) for number, _ in numbered)
    for number, text in numbered:
        lines[int(number) - 1] = text
    return lines


def matches(anchor: str, line: str) -> bool:
    """A doc anchor (`...` standing for any text) against a file line."""
    return re.fullmatch(".*".join(map(re.escape, anchor.split("..."))), line.strip()) is not None


def test_the_docs_patch_applied_as_printed_compiles_and_its_diff_counts_are_true(tmp_path):
    text = DOC.read_text()
    edits = doc_edits(text)
    assert [len(e) for e in edits.values()] == [4, 7]
    counted = {}
    for path, file_edits in edits.items():
        name = Path(path).name
        original = anchor_lines(name)
        patched = list(original)
        for first, last, instruction, block in sorted(file_edits, reverse=True):
            anchors = re.findall(r"(?:line \d+ \(|from |through |after the )`([^`]+)`", instruction, flags=re.I)
            where = original[first - 1] if last >= first else original[last - 1]
            indent = len(where) - len(where.lstrip())
            assert block.splitlines()[0][:indent] == " " * indent and block[indent] != " ", (instruction, block)
            if "replace lines" in instruction.lower():
                assert matches(anchors[0], original[first - 1]) and matches(anchors[1], original[last - 1]), instruction
            elif "ends at line" in instruction:  # `x = Call(...)`: that call's closing line
                assert original[last - 1].strip() == ")", instruction
                start = anchors[0].split("(...)")[0]
                assert any(line.strip().startswith(start) for line in original[: last - 1]), instruction
            else:
                assert matches(anchors[0], where), (anchors[0], where)
            patched[first - 1 : last] = block.splitlines()
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "a" / name).write_text("\n".join(original) + "\n")
        (tmp_path / "b" / name).write_text("\n".join(patched) + "\n")
        compile((tmp_path / "b" / name).read_text(), path, "exec")  # a mis-indented line is a SyntaxError here
        diff = subprocess.run(
            ["diff", "-u", str(tmp_path / "a" / name), str(tmp_path / "b" / name)], capture_output=True, text=True
        ).stdout.splitlines()[2:]
        counted[name] = (sum(line[0] == "+" for line in diff), sum(line[0] == "-" for line in diff))
    table = {
        Path(m[1]).name: (int(m[2]), int(m[3]))
        for m in re.finditer(r"^\| `([^`]+\.py)` \| (\d+) \| (\d+)", text, flags=re.M)
    }
    assert table == counted
    written, deleted = (sum(c[i] for c in counted.values()) for i in (0, 1))
    assert re.search(rf"^\| total \| {written} \| {deleted} \|", text, flags=re.M)
    assert f"`diff -u` counts {written} insertions and {deleted} deletions" in " ".join(text.split())
    assert f"**{written} lines written**" in text and f"**{deleted} lines deleted**" in text
