"""sfcache.probe: the DPT head, the metrics, and a probe that finds depth where the tokens carry it (and only there)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sfcache.errors import ConfigMismatch, SfcacheError
from sfcache.probe import MEAN_DEPTH, ArrayData, DepthMetrics, DPTHead, FitSettings, probe, split_episodes


def test_dpt_head_maps_four_layers_to_positive_depth_and_every_part_learns():
    torch.manual_seed(0)
    head = DPTHead(dim=24, grid=(4, 6), image_size=(40, 60), views=2, width=16)
    tokens = torch.randn(3, 4, 2 * 4 * 6, 24, requires_grad=True)
    log_depth = head(tokens)
    assert log_depth.shape == (3, 2, 40, 60)
    assert torch.allclose(head.depth(tokens), log_depth.exp()) and (head.depth(tokens) > 0).all()
    log_depth.square().mean().backward()
    per_layer = tokens.grad.abs().sum(dim=(0, 2, 3))
    assert (per_layer > 0).all()  # every one of the 4 layers reaches the output
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # a view's depth depends only on that view's tokens
    other = tokens.detach().clone()
    other[:, :, 24:] += 1.0
    with torch.no_grad():
        assert torch.equal(head(other)[:, 0], head(tokens.detach())[:, 0])
    with pytest.raises(ValueError, match=r"expected \[B, 4, 2\*4\*6, dim\]"):
        head(torch.randn(1, 3, 48, 24))


def test_metrics_equal_hand_computed_values_per_view_over_valid_pixels():
    truth = np.array([[[[1.0, 2.0], [4.0, np.nan]], [[0.1, 0.2], [0.0, 50.0]]]])  # [1, 2 views, 2, 2]
    predicted = np.array([[[[1.5, 2.0], [2.0, 7.0]], [[0.1, 0.3], [9.0, 9.0]]]])
    metrics = DepthMetrics(("primary", "wrist"), max_depth=10.0)
    metrics.update(predicted[:, :, :1], truth[:, :, :1])  # batching does not change the result
    metrics.update(predicted[:, :, 1:], truth[:, :, 1:])
    result = metrics.result()
    # primary: valid 1, 2, 4 (NaN left out); errors 0.5, 0, 2 -> rel 0.5, 0, 0.5; ratios 1.5, 1, 2
    assert result["primary"] == pytest.approx(
        {"abs_rel": 1 / 3, "rmse_m": np.sqrt(4.25 / 3), "delta1": 1 / 3, "pixels": 3}
    )
    # wrist: valid 0.1, 0.2 (0 and beyond max_depth left out); errors 0, 0.1 -> rel 0, 0.5; ratios 1, 1.5
    assert result["wrist"] == pytest.approx({"abs_rel": 0.25, "rmse_m": np.sqrt(0.01 / 2), "delta1": 0.5, "pixels": 2})


def scenes(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """[n, 2, size, size] metres: a tilted floor with a box in front of it; view 2 the mirror image 20x nearer."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    out = np.empty((n, 2, size, size), np.float32)
    for i in range(n):
        depth = 1.0 + rng.uniform(0.5, 1.5) * y + rng.uniform(-0.3, 0.3) * x
        cy, cx, half = *rng.uniform(0.2, 0.8, 2), rng.uniform(0.1, 0.25)
        depth = np.where((abs(y - cy) < half) & (abs(x - cx) < half), depth - rng.uniform(0.3, 0.8), depth)
        out[i] = depth, depth[::-1] / 20
    return out


def tokens_of(depth: np.ndarray, grid: int = 4, dim: int = 32) -> np.ndarray:
    """[n, 4, V*grid*grid, dim]: each patch's log depths through a fixed random projection per layer."""
    rng = np.random.default_rng(1)
    n, views, size, _ = depth.shape
    p = size // grid
    patches = np.log(depth).reshape(n, views, grid, p, grid, p).transpose(0, 1, 2, 4, 3, 5)
    patches = patches.reshape(n, views * grid * grid, p * p)
    return np.stack([patches @ rng.normal(size=(p * p, dim)).astype(np.float32) for _ in range(4)], axis=1)


def test_the_probe_finds_depth_in_tokens_made_of_depth_and_not_in_noise(tmp_path):
    depth = scenes(96)
    tokens = tokens_of(depth)
    noise = np.random.default_rng(2).normal(size=tokens.shape).astype(np.float32)
    frames = (np.clip(depth / depth.max(), 0, 1)[..., None].repeat(3, -1) * 255).astype(np.uint8)
    data = ArrayData(
        np.concatenate([tokens, noise], 1), depth, np.arange(96) // 4, frames=frames, views=("primary", "wrist")
    )
    settings = FitSettings(steps=300, batch_size=8, width=16, lr=3e-3, log_every=100, device="cpu")
    report = probe(data, tmp_path, settings, heads={"depth_tokens": (0, 1, 2, 3), "noise": (4, 5, 6, 7)})
    test = report["results"]["test"]
    for view in ("primary", "wrist"):
        baseline = test[MEAN_DEPTH][view]["abs_rel"]
        assert test["depth_tokens"][view]["abs_rel"] < min(0.1, 0.5 * baseline), test
        assert test["depth_tokens"][view]["delta1"] > 0.8
        assert test["noise"][view]["abs_rel"] > 0.8 * baseline, test
        assert report["comparison"]["test"]["depth_tokens"][view]["abs_rel_over_mean_depth"] < 0.5
    assert report["split"]["test_rows"] == 20 and len(report["split"]["test_episodes"]) == 5  # 20% of 24, whole
    assert report["heads"] == {"depth_tokens": ["0", "1", "2", "3"], "noise": ["4", "5", "6", "7"]}
    assert json.loads((tmp_path / "probe.json").read_text()) == report
    assert sorted(report["pictures"]) == ["test_primary.png", "test_wrist.png"]
    assert (tmp_path / "test_wrist.png").read_bytes()[:4] == b"\x89PNG"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["probe"], r["step"]) for r in logged if r["split"] == "train"] == [
        (name, step) for name in ("depth_tokens", "noise") for step in (100, 200, 300)
    ]
    assert {r["probe"] for r in logged if r["split"] == "test"} == {"depth_tokens", "noise", MEAN_DEPTH}


def test_splits_hold_out_whole_episodes_deterministically():
    episodes = np.repeat(np.arange(10), 3)
    train, test = split_episodes(episodes, 0.2, seed=4)
    assert len(test) == 6 and not set(episodes[train]) & set(episodes[test])
    assert np.array_equal(test, split_episodes(episodes, 0.2, seed=4)[1])
    assert not np.array_equal(test, split_episodes(episodes, 0.2, seed=5)[1])
    with pytest.raises(SfcacheError, match="at least 2 episodes"):
        split_episodes(np.zeros(5), 0.2, 0)


def test_a_resumed_probe_equals_an_uninterrupted_one_and_other_settings_are_refused(tmp_path, monkeypatch):
    depth = scenes(24)
    data = ArrayData(tokens_of(depth), depth, np.arange(24) // 3)
    settings = FitSettings(steps=6, batch_size=4, width=8, save_every=2, log_every=1, device="cpu")
    reference = probe(data, tmp_path / "reference", settings)

    import sfcache.probe.fit as fit

    real = fit.HeadRun.save

    def stop_after_step_4(self):
        real(self)
        if self.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit.HeadRun, "save", stop_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        probe(data, tmp_path / "resumed", settings)
    monkeypatch.setattr(fit.HeadRun, "save", real)
    resumed = probe(data, tmp_path / "resumed", settings)
    assert resumed["results"] == reference["results"]
    logs = [(tmp_path / name / "metrics.jsonl").read_text() for name in ("reference", "resumed")]
    assert logs[0] == logs[1]
    with pytest.raises(ConfigMismatch, match=r"lr: checkpoint has 0.001, asked 0.002.*use --no-resume"):
        probe(data, tmp_path / "resumed", FitSettings(**{**settings.__dict__, "lr": 2e-3}))


def test_bad_probe_inputs_are_one_line_errors():
    with pytest.raises(SfcacheError, match=r"depth \(4, 2, 8\): expected \[N=4, V, H, W\] metres"):
        ArrayData(np.zeros((4, 4, 32, 8)), np.zeros((4, 2, 8)), np.arange(4))
    with pytest.raises(SfcacheError, match="30 tokens per row do not split into 2 views"):
        ArrayData(np.zeros((4, 4, 30, 8)), np.zeros((4, 2, 8, 8)), np.arange(4))
    with pytest.raises(SfcacheError, match="test_fraction must be in"):
        FitSettings(test_fraction=1.0)
