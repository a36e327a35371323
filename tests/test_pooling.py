"""SF target grid resampling and its fixed position embedding, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfcache.pooling import pool_grid, position_embedding


def grid_tokens(batch: int = 2, views: int = 2, h: int = 37, w: int = 37, dim: int = 8) -> torch.Tensor:
    return torch.randn(batch, views, h * w, dim, generator=torch.Generator().manual_seed(0))


def test_shape_and_row_major_corners_are_preserved():
    tokens = grid_tokens()
    pooled = pool_grid(tokens, (37, 37), (16, 16))
    assert pooled.shape == (2, 2, 256, 8) and pooled.dtype == tokens.dtype
    for source, target in [(0, 0), (36, 15), (36 * 37, 15 * 16), (37 * 37 - 1, 255)]:
        assert torch.allclose(pooled[:, :, target], tokens[:, :, source], atol=1e-6)


def test_bilinear_align_corners_by_hand():
    """2x2 -> 3x3: corners kept, edge midpoints are pair means, the centre is the mean of all four."""
    corners = torch.tensor([[1.0, 3.0], [5.0, 11.0]]).reshape(1, 4, 1)
    pooled = pool_grid(corners, (2, 2), (3, 3)).reshape(3, 3)
    expected = torch.tensor([[1.0, 2.0, 3.0], [3.0, 5.0, 7.0], [5.0, 8.0, 11.0]])
    assert torch.allclose(pooled, expected)


def test_non_square_grids_and_leading_axes():
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3 * 4, 1)  # value = 4 * row + col
    pooled = pool_grid(tokens, (3, 4), (5, 7)).reshape(2, 5, 7)
    rows, cols = torch.meshgrid(torch.linspace(0, 2, 5), torch.linspace(0, 3, 7), indexing="ij")
    assert torch.allclose(pooled[0], 4 * rows + cols, atol=1e-5)  # bilinear is exact on a linear ramp
    assert torch.allclose(pooled[1], 12 + 4 * rows + cols, atol=1e-5)


def test_identity_when_sizes_are_equal():
    tokens = grid_tokens(h=5, w=6)
    assert torch.equal(pool_grid(tokens, (5, 6), (5, 6)), tokens)


def test_pooling_is_linear_so_the_embedding_can_be_added_after_caching():
    features = grid_tokens(dim=64)
    embedding = position_embedding(37, 37, 64, 1.0)
    together = pool_grid(features + embedding, (37, 37), (16, 16))
    apart = pool_grid(features, (37, 37), (16, 16)) + pool_grid(embedding[None, None], (37, 37), (16, 16))
    assert torch.allclose(together, apart, atol=1e-5)


def test_numpy_in_numpy_out_and_half_precision():
    tokens = grid_tokens(h=4, w=4)
    pooled = pool_grid(tokens.numpy(), (4, 4), (2, 2))
    assert isinstance(pooled, np.ndarray)
    assert np.allclose(pooled, pool_grid(tokens, (4, 4), (2, 2)).numpy())
    assert pool_grid(tokens.half(), (4, 4), (2, 2)).dtype == torch.float16


def test_wrong_token_count_is_rejected():
    with pytest.raises(ValueError, match="37x37"):
        pool_grid(torch.zeros(1, 1, 100, 4), (37, 37), (16, 16))


def test_position_embedding_by_hand():
    """2x2 grid, square image: coordinates +-(1/sqrt2)/2; dim 8 = [sin x, cos x, sin y, cos y] x 2 freqs."""
    embedding = position_embedding(2, 2, 8, 1.0)
    assert embedding.shape == (4, 8) and embedding.dtype == torch.float32
    c = 0.5 / math.sqrt(2)
    omegas = (1.0, 0.1)  # 100 ** (-k / 2)

    def expected(x: float, y: float) -> list[float]:
        def sincos(p: float) -> list[float]:
            return [math.sin(p * o) for o in omegas] + [math.cos(p * o) for o in omegas]

        return [0.1 * v for v in sincos(x) + sincos(y)]

    for token, (x, y) in enumerate([(-c, -c), (c, -c), (-c, c), (c, c)]):  # row-major: x varies fastest
        assert torch.allclose(embedding[token], torch.tensor(expected(x, y)), atol=1e-7), token


def test_position_embedding_aspect_ratio_spans():
    """Width 2x height: x spans +-2/sqrt5 and y +-1/sqrt5 (times (n-1)/n); sin(x) is channel 0, sin(y) channel dim/2."""
    h, w, dim = 3, 5, 4
    embedding = position_embedding(h, w, dim, 2.0).reshape(h, w, dim)
    span_x, span_y = 2 / math.sqrt(5) * (w - 1) / w, 1 / math.sqrt(5) * (h - 1) / h
    assert math.isclose(embedding[0, -1, 0].item(), 0.1 * math.sin(span_x), rel_tol=1e-6)
    assert math.isclose(embedding[-1, 0, 2].item(), 0.1 * math.sin(span_y), rel_tol=1e-6)
    assert torch.allclose(embedding[1, 2], torch.tensor([0.0, 0.1, 0.0, 0.1]))  # the centre is at (0, 0)
    assert embedding.abs().max() <= 0.1
