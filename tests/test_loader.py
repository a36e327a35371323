"""The batched target path (`CachedTargets.read_stored` / `batches` / `decode`) against the per-sample one, for
every stored dtype, masks, reduced stores, crop boxes and pool(E), in-process and in fork and spawn workers;
the trainer's targets against `targets_for`; missing and unfinished episodes as one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sfcache.errors import SfcacheError, StoreError
from sfcache.reduce import request
from sfcache.sources import EpisodeInfo
from sfcache.store import Reduction, StoreConfig, create_store, decode, encode, lock_store, pack_episodes
from sfcache.store.encoding import widen
from sfcache.torch import CachedTargets, StoredTargets, WithTargets
from sfcache.train.augment import random_boxes
from sfcache.train.loop import StepBatches, TrainConfig, Trainer, prepare
from tests._train_helpers import GRID, write_dataset, write_store

CHANNELS, K, STEPS = 32, 8, 24
ROWS = [5, 0, 23, 7, 8, 5, 16, 1, 12, 9, 22, 3]  # shuffled, a repeat, several shards


def make_store(path: Path, dtype: str, reduce: bool, mask: bool, unfinished: bool = False) -> Path:
    """24 rows (episodes of 10 and 14 steps, 8-row shards) of random targets, 2 views x 4x4 tokens x 32 channels."""
    generator = np.random.default_rng(0)
    reduction = None
    if reduce:
        basis = np.linalg.qr(generator.standard_normal((CHANNELS, K)))[0].T.astype(np.float32)
        mean = generator.standard_normal(CHANNELS).astype(np.float32)
        fidelity = {"0": {"k": K, "mean": 1.0, "p1": 1.0, "worst": 1.0}}
        reduction = Reduction(request(f"pca:{K}", None, STEPS), {0: mean}, {0: basis}, fidelity)
    config = StoreConfig(
        episodes=pack_episodes([EpisodeInfo("a", "", 10), EpisodeInfo("b", "", STEPS - 10)]),
        layers=(0,),
        grid=(4, 4),
        native_grid=(8, 8),
        aspect_ratio=1.0,
        views=("primary", "wrist"),
        channels=CHANNELS,
        vggt={"config": {"depth": 4}},
        source={},
        dtype=dtype,
        steps_per_shard=8,
        reduce=reduction,
        token_mask=mask,
    )
    values = generator.standard_normal((STEPS, 2, 16, CHANNELS)).astype(np.float32)
    tokens = generator.random((STEPS, 2, 16)) > 0.3
    with lock_store(path):
        cache = create_store(path, config)
        for shard in range(config.num_shards - (1 if unfinished else 0)):
            rows = cache.shard_rows(shard)
            cache.write_shard(shard, {0: values[rows]}, tokens[rows] if mask else None)
    return path


STORES = [  # dtype, --reduce, token mask
    ("float16", False, False),
    ("bfloat16", False, False),
    ("int8", False, True),
    ("float16", True, True),
    ("int8", True, False),
]


@pytest.fixture(scope="module", params=STORES, ids=lambda p: f"{p[0]}{'-pca' if p[1] else ''}{'-mask' if p[2] else ''}")
def store(request, tmp_path_factory) -> tuple[Path, tuple]:
    return make_store(tmp_path_factory.mktemp("store") / "s", *request.param), request.param


def per_sample(targets: CachedTargets, rows: list[int]):
    """The targets of `rows` one `dataset[i]` at a time, stacked (a pair on a masked store)."""
    items = [targets[row] for row in rows]
    return tuple(map(torch.stack, zip(*items))) if isinstance(items[0], tuple) else torch.stack(items)


def assert_same(got, expected) -> None:
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def variants(path: Path, reduced: bool) -> list[CachedTargets]:
    kinds = [
        CachedTargets(path),
        CachedTargets(path, add_position_embedding=False),
        CachedTargets(path, dtype=torch.float16),
    ]
    return kinds + ([CachedTargets(path, coefficients=True)] if reduced else [])


@pytest.mark.own_process  # forked DataLoader workers
def test_batched_reads_equal_the_per_sample_path_in_process_and_in_fork_workers(tmp_path):
    for dtype, reduced, mask in STORES:
        path = make_store(tmp_path / f"{dtype}{reduced}{mask}", dtype, reduced, mask)
        for targets in variants(path, reduced):
            expected = per_sample(targets, ROWS)
            stored = targets.read_stored(ROWS)
            assert isinstance(stored, StoredTargets) and stored.rows.tolist() == ROWS
            assert stored.values.dtype == getattr(torch, dtype)  # the stored bytes, not float32 targets
            assert stored.values.shape[-1] == (K if reduced else CHANNELS)
            assert (stored.scales is not None) == (dtype == "int8") and (stored.mask is not None) == mask
            assert_same(targets.decode(stored), expected)
            assert_same(targets.read_rows(ROWS), expected)
            batches = [ROWS[:5], ROWS[5:9], ROWS[9:]]
            decoded = [targets.decode(batch) for batch in targets.batches(batches, num_workers=2)]
            decoded = tuple(map(torch.cat, zip(*decoded))) if mask else torch.cat(decoded)
            assert_same(decoded, expected)


def test_crop_boxes_and_pool_e_are_decoded_per_sample_as_targets_for_joins_them(store):
    path, (dtype, reduced, mask) = store
    targets = CachedTargets(path)
    boxes = random_boxes(len(ROWS), torch.Generator().manual_seed(1))
    if mask:
        with pytest.raises(SfcacheError, match="carries a token mask"):
            targets.decode(targets.read_stored(ROWS), boxes=boxes)
        return
    keys, steps = zip(*(targets.index.locate(row) for row in ROWS))
    batched = targets.decode(targets.read_stored(ROWS), boxes=boxes)
    one_by_one = torch.cat(
        [targets.targets_for([k], [s], boxes=boxes[i : i + 1]) for i, (k, s) in enumerate(zip(keys, steps))]
    )
    assert_same(batched, one_by_one)
    assert_same(targets.targets_for(list(keys), list(steps), boxes=boxes), batched)
    uncropped = CachedTargets(path, add_position_embedding=False).read_rows(ROWS)
    assert not torch.equal(batched - targets.position_embedding(), uncropped)  # the boxes did resample the grid


@pytest.mark.own_process
def test_batches_in_spawn_workers_keep_held_batches_intact_while_slots_are_reused(tmp_path):
    path = make_store(tmp_path / "s", "int8", True, True)
    targets = CachedTargets(path)
    batches = [list(np.random.default_rng(i).choice(STEPS, 4)) for i in range(12)]
    held = []
    loader = targets.batches(batches, num_workers=2, prefetch_factor=1, multiprocessing_context="spawn")
    assert len(loader) == len(batches)
    for i, stored in enumerate(loader):
        assert_same(targets.decode(stored), per_sample(targets, batches[i]))
        if i % 4 == 0:
            held.append((i, stored, stored.values.numpy()))  # a batch, and a numpy view of its memory, kept
    for i, stored, values in held:  # slots are handed back only once nothing refers to them
        assert_same(targets.decode(stored), per_sample(targets, batches[i]))
        assert np.array_equal(values, stored.values.numpy())


def test_missing_or_unfinished_episodes_are_one_clear_error(tmp_path):
    path = make_store(tmp_path / "s", "float16", False, False, unfinished=True)
    targets = CachedTargets(path)
    with pytest.raises(StoreError, match=r"2 episodes are not fully extracted \(e.g. \['a', 'b'\]\)|1 episodes"):
        targets.check_episodes({"a": (None, 10), "b": (None, 14)})
    with pytest.raises(StoreError, match="does not match the dataset's episodes .*'?c'? is not in the store"):
        targets.check_episodes({"a": (None, 10), "c": (None, 3)})
    with pytest.raises(StoreError, match="b has 14 steps in the store, 13 in the dataset"):
        WithTargets([{"episode_key": "b", "step": 0}], targets, lengths={"b": 13})
    with pytest.raises(StoreError, match=r"\['b'\]\); run `sf extract` again"):
        WithTargets([{"episode_key": "b", "step": 0}], targets, lengths={"b": 14})
    loader = targets.batches([[2, 20]], num_workers=1)
    with pytest.raises(StoreError) as raised:  # through a worker: the store's own one-line message
        next(iter(loader))
    assert str(raised.value).startswith(f"{path}: episode 'b' step 10 (row 20) is in shard 2, which is not extracted")


def test_batches_refuse_a_batch_sampler_that_sizing_would_consume_or_advance(tmp_path):
    targets = CachedTargets(make_store(tmp_path / "s", "float16", False, False))

    class Unsized(torch.utils.data.Sampler):  # a random batch sampler without batch_size: its draws would advance
        def __iter__(self):
            return iter(torch.randperm(STEPS).view(-1, 4).tolist())

        def __len__(self):
            return STEPS // 4

    for sampler in ((batch for batch in [ROWS[:4], ROWS[4:]]), Unsized()):
        with pytest.raises(
            SfcacheError, match=r"is neither a sequence of batches nor a sampler with batch_size; freeze"
        ):
            targets.batches(sampler, num_workers=2)
    frozen = list(Unsized())
    assert [stored.rows.tolist() for stored in targets.batches(frozen, num_workers=1)] == frozen


class SharedReads(torch.utils.data.Dataset):
    """In a DataLoader worker: whether a read decoded there (`dataset[i]`, `WithTargets`, `read_rows`) and one
    handed out as stored (`memory="shared"`) were allocated in POSIX shared memory."""

    def __init__(self, targets: CachedTargets):
        self.targets = targets

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[bool, bool]:
        read = self.targets.read_stored(ROWS)
        return read.values.is_shared(), self.targets.read_stored(ROWS, memory="shared").values.is_shared()


def test_a_read_decoded_in_a_worker_takes_no_shared_memory_one_handed_out_as_stored_does(tmp_path):
    targets = CachedTargets(make_store(tmp_path / "s", "int8", True, True))
    loader = torch.utils.data.DataLoader(SharedReads(targets), batch_size=None, num_workers=1)
    assert list(next(iter(loader))) == [False, True]


def test_the_trainers_targets_are_what_targets_for_joins_for_the_same_batch(tmp_path):
    source = write_dataset(tmp_path / "data", demos=2, steps=12)
    store = write_store(tmp_path / "store", source)
    trainer = Trainer(
        TrainConfig(
            source=source,
            out=tmp_path / "run",
            cache=store,
            steps=1,
            batch_size=6,
            model_size="tiny",
            grid=GRID,
            loader_workers=2,
            val_episodes=0,
            resume=False,
        )
    )
    dataset, targets = trainer.data.train, trainer.data.targets
    batches = StepBatches(len(dataset), 6, 3, 0, 1)
    raw = next(iter(trainer._loader(dataset, batches)))
    boxes = random_boxes(6, torch.Generator().manual_seed(2))
    batch = prepare(raw, trainer.policy_config, trainer.device, boxes, None, targets)
    keys, steps = zip(*(dataset.rows.locate(index) for index in next(iter(batches))))
    assert_same(batch.targets, targets.targets_for(list(keys), list(steps), boxes=boxes))
    assert batch.targets.shape == (6, 2, GRID * GRID, targets.channels)


def test_widen_is_the_stores_decode_bit_for_bit_for_every_dtype_and_scale_layout():
    values = np.random.default_rng(3).standard_normal((3, 2, 4, 256)).astype(np.float32) * 5
    for dtype in ("float16", "bfloat16", "int8"):
        stored, scale = encode(values, dtype)
        tensor = torch.from_numpy(stored)
        tensor = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
        got = widen(tensor, None if scale is None else torch.from_numpy(scale))
        assert torch.equal(got, torch.from_numpy(decode(stored, dtype, scale)))
    stored, _ = encode(values, "int8")
    per_channel = np.abs(values).max(axis=2) / 127  # format version 1: one scale per step, view and channel
    got = widen(torch.from_numpy(stored), torch.from_numpy(per_channel))
    assert torch.equal(got, torch.from_numpy(decode(stored, "int8", per_channel)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.own_process  # forked DataLoader workers
def test_on_a_gpu_batches_arrive_pinned_and_decode_there_as_on_the_cpu(tmp_path):
    path = make_store(tmp_path / "s", "int8", True, False)
    on_gpu, on_cpu = CachedTargets(path, device="cuda"), CachedTargets(path)
    assert on_gpu.read_stored(ROWS).values.is_pinned()
    batches = [ROWS[:6], ROWS[6:]]
    for rows, stored in zip(batches, on_gpu.batches(batches, num_workers=2)):
        assert stored.values.is_pinned() and stored.scales.is_pinned()
        boxes = random_boxes(len(rows), torch.Generator().manual_seed(0))
        decoded = on_gpu.decode(stored, boxes=boxes)
        assert decoded.device.type == "cuda"
        torch.testing.assert_close(decoded.cpu(), on_cpu.decode(on_cpu.read_stored(rows), boxes=boxes))
