"""SpatialForcingLoss against SF's definition, and CachedTargets against the store it reads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sfcache.errors import SfcacheError, StoreError
from sfcache.pooling import pool_grid, position_embedding
from sfcache.store import open_cache
from sfcache.torch import CachedTargets, SpatialForcingLoss, WithTargets
from tests._train_helpers import CHANNELS, GRID, write_dataset, write_store


def rotated(vectors: torch.Tensor, angles: list[float]) -> torch.Tensor:
    """Rotate 2-d vectors [N, 2] by per-token angles: cos(v, rotated v) = cos(angle)."""
    a = torch.tensor(angles, dtype=torch.float32)
    x, y = vectors.unbind(-1)
    return torch.stack([x * a.cos() - y * a.sin(), x * a.sin() + y * a.cos()], dim=-1)


@pytest.fixture
def loss_2d() -> SpatialForcingLoss:
    torch.manual_seed(0)
    return SpatialForcingLoss(vla_dim=3, target_dim=2, norm="none")


def test_hand_computed_cosines(loss_2d):
    x = torch.randn(2, 4, 3)
    proj = loss_2d.project(x).detach()
    # sample 0: cos = 1, 0, -1, 0.5 -> mean 0.125 -> 0.875; sample 1: all cos = 1 -> 0
    targets = torch.stack(
        [rotated(proj[0], [0, math.pi / 2, math.pi, math.pi / 3]), 3.0 * proj[1]]
    )  # scale does not matter for a cosine
    loss, per = loss_2d(x, targets, per_sample=True)
    assert per.tolist() == pytest.approx([0.875, 0.0], abs=1e-5)
    assert loss.item() == pytest.approx(0.4375, abs=1e-5)


def test_mask_by_token_and_by_view(loss_2d):
    x = torch.randn(2, 4, 3)
    proj = loss_2d.project(x).detach()
    angles = [0, math.pi / 2, math.pi, math.pi / 3]
    targets = torch.stack([rotated(proj[0], angles), rotated(proj[1], angles)])
    token_mask = torch.tensor([[True, True, False, True], [False, False, True, False]])
    loss, per = loss_2d(x, targets, token_mask, per_sample=True)
    assert per.tolist() == pytest.approx([1 - (1 + 0 + 0.5) / 3, 2.0], abs=1e-5)
    assert loss.item() == pytest.approx((per[0].item() + 2.0) / 2, abs=1e-5)
    # per-view mask [B, V] with 2 views of 2 tokens; [B, V, T] targets are flattened the same way
    view_mask = torch.tensor([[True, False], [False, True]])
    loss_v, per_v = loss_2d(x, targets.view(2, 2, 2, 2), view_mask, per_sample=True)
    assert per_v.tolist() == pytest.approx([1 - (1 + 0) / 2, 1 - (-1 + 0.5) / 2], abs=1e-5)
    assert loss_v.item() == pytest.approx(per_v.mean().item(), abs=1e-6)


def test_fully_masked_sample_is_left_out_of_the_mean(loss_2d):
    x = torch.randn(2, 4, 3)
    proj = loss_2d.project(x).detach()
    targets = torch.stack([-proj[0], proj[1]])
    mask = torch.tensor([[True] * 4, [False] * 4])
    loss, per = loss_2d(x, targets, mask, per_sample=True)
    assert per.tolist() == pytest.approx([2.0, 0.0], abs=1e-5)
    assert loss.item() == pytest.approx(2.0, abs=1e-5)


def sf_reference(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SF's compute_align_loss_cosine: per sample 1 - mean cos, summed and divided by the batch size."""
    total = 0.0
    for p, t in zip(projected, targets):
        p, t = torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(t, dim=-1)
        total = total + 1 - (p * t).sum(-1).mean()
    return total / len(projected)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm", "none"])
def test_matches_sf_formula_and_projector_layout(norm):
    torch.manual_seed(1)
    loss_fn = SpatialForcingLoss(vla_dim=16, target_dim=24, norm=norm)
    fc1, act, fc2 = loss_fn.projector
    assert (fc1.in_features, fc1.out_features, fc2.in_features, fc2.out_features) == (16, 24, 24, 24)
    assert isinstance(act, torch.nn.GELU)
    assert torch.all(fc1.bias == 0) and torch.all(fc2.bias == 0)
    bound = math.sqrt(6 / (16 + 24))  # xavier-uniform
    assert fc1.weight.abs().max() <= bound and fc1.weight.std() > bound / 4
    x, targets = torch.randn(3, 10, 16), torch.randn(3, 10, 24)
    expected = sf_reference(
        fc2(
            act(
                fc1(
                    loss_fn.norm(x)
                    if norm == "layernorm"
                    else (x - x.mean((0, 1))) / torch.sqrt(x.var((0, 1), unbiased=False) + 1e-5)
                    if norm == "batchnorm"
                    else x
                )
            )
        ),
        targets,
    )
    assert loss_fn(x, targets).item() == pytest.approx(expected.item(), abs=1e-5)


def test_gradient_reaches_tokens_and_projector():
    torch.manual_seed(2)
    loss_fn = SpatialForcingLoss(vla_dim=8, target_dim=6)
    x = torch.randn(2, 5, 8, requires_grad=True)
    loss_fn(x, torch.randn(2, 5, 6)).backward()
    assert x.grad.abs().sum() > 0
    assert loss_fn.projector[0].weight.grad.abs().sum() > 0


def test_shape_and_option_errors_are_clear():
    with pytest.raises(SfcacheError, match="norm must be one of"):
        SpatialForcingLoss(4, 4, norm="rmsnorm")
    loss_fn = SpatialForcingLoss(4, 6)
    with pytest.raises(SfcacheError, match=r"VLA tokens \(2, 5, 4\) .* targets \(2, 4, 6\)"):
        loss_fn(torch.randn(2, 5, 4), torch.randn(2, 4, 6))
    # OFT with proprio: 2 views x 4 tokens + the proprio token sliced by mistake
    with pytest.raises(SfcacheError, match=r"VLA tokens \(2, 9, 4\) .* targets \(2, 2, 4, 6\).*without proprio"):
        loss_fn(torch.randn(2, 9, 4), torch.randn(2, 2, 4, 6))
    with pytest.raises(SfcacheError, match="does not divide"):
        loss_fn(torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.ones(2, 2, dtype=torch.bool))


def test_alignment_reaches_low_loss_when_trained():
    """The projector can align tokens to targets that are a fixed function of them (loss -> ~0)."""
    torch.manual_seed(3)
    loss_fn = SpatialForcingLoss(vla_dim=8, target_dim=12)
    mixing = torch.randn(8, 12)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    x = torch.randn(16, 6, 8)
    targets = torch.tanh(x @ mixing)
    start = loss_fn(x, targets).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = loss_fn(x, targets)
        loss.backward()
        optimizer.step()
    assert start > 0.5 and loss.item() < 0.15
    assert np.isfinite(loss.item())


# ----------------------------------------------------------------------------- CachedTargets


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cached")
    return write_store(root / "store", write_dataset(root / "data", demos=2, steps=6))


def expected_position_embedding() -> torch.Tensor:
    """SF: E on VGGT's 16x16 native grid (tiny VGGT at 224 px), pooled to the 4x4 cache grid."""
    full = position_embedding(16, 16, CHANNELS, 1.0)
    return pool_grid(full, (16, 16), (GRID, GRID))


def test_cached_targets_add_pooled_position_embedding(store):
    cache = open_cache(store)
    targets = CachedTargets(store)
    raw = CachedTargets(store, add_position_embedding=False)
    key = cache.episodes[1]
    record = cache.episode(key)
    stored = torch.from_numpy(cache.read(key, 3))[0]
    assert targets.get(key, 3).shape == (2, GRID * GRID, CHANNELS)
    assert torch.allclose(raw.get(key, 3), stored)
    assert torch.allclose(targets.get(key, 3), stored + expected_position_embedding(), atol=1e-6)
    assert torch.allclose(targets[record.start + 3], targets.get(key, 3))  # flat index = (key, step)
    batch = targets.targets_for([key, cache.episodes[0]], torch.tensor([3, 0]))
    assert torch.allclose(batch[0], targets.get(key, 3)) and torch.allclose(batch[1], targets.get(cache.episodes[0], 0))
    assert len(targets) == cache.num_steps
    batches = list(torch.utils.data.DataLoader(targets, batch_size=5))  # batched fetch, one read per batch
    assert torch.equal(torch.cat(batches), torch.stack([targets[i] for i in range(len(targets))]))


def test_cached_targets_name_bad_keys_and_steps(store):
    targets = CachedTargets(store)
    with pytest.raises(StoreError, match="'nope' is not in the cache"):
        targets.get("nope", 0)
    key = open_cache(store).episodes[0]
    with pytest.raises(StoreError, match=r"has steps \[0, 6\), asked step 6"):
        targets.get(key, 6)
    with pytest.raises(StoreError, match="layer 7 is not stored"):
        CachedTargets(store, layer=7)


class KeyedSamples(torch.utils.data.Dataset):
    """A user's dataset: dict samples carrying the episode key and step."""

    def __init__(self, keys: list[str]):
        self.items = [(k, s) for k in keys for s in range(6)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        key, step = self.items[i]
        return {"episode_key": key, "step": step, "x": torch.tensor(float(i))}


@pytest.mark.own_process  # forked DataLoader workers: away from threads other tests leave running
def test_join_works_in_dataloader_workers_read_only(store):
    cache = open_cache(store)
    targets = CachedTargets(store)
    joined = WithTargets(KeyedSamples(cache.episodes), targets)
    loader = torch.utils.data.DataLoader(joined, batch_size=4, num_workers=2)
    batches = list(loader)
    got = torch.cat([b["sf_targets"] for b in batches])
    expected = targets.targets_for([k for k, _ in joined.dataset.items], [s for _, s in joined.dataset.items])
    assert torch.equal(got, expected)
    assert targets.cache.mode == "r"
    with pytest.raises(ValueError, match="read-only"):  # zarr refuses writes through this handle
        targets.cache._array(f"targets/layer_{targets.layer}")[0] = 0
