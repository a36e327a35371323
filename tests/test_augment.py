"""Crop augmentation keeps cached targets on the same image content as online SF's targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sfcache.crop import crop_target_grid
from sfcache.errors import SfcacheError
from sfcache.train.augment import center_boxes, colour_jitter, crop_images, random_boxes

NATIVE, GRID, CHANNELS = 37, 16, 6


def content_features(py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """A smooth 'VGGT feature' of the image content at image fractions (py, px): [..., C]."""
    k = torch.arange(1, CHANNELS + 1, dtype=torch.float32)
    return torch.sin(0.6 * k * py[..., None] + 0.9 * px[..., None] * (k % 3 + 1) + k)


def native_grid_of(box: torch.Tensor) -> torch.Tensor:
    """VGGT's 37x37 patch features of the image cropped to `box`: [C, 37, 37]."""
    y0, x0, y1, x1 = box.tolist()
    centers = (torch.arange(NATIVE) + 0.5) / NATIVE
    py, px = torch.meshgrid(y0 + (y1 - y0) * centers, x0 + (x1 - x0) * centers, indexing="ij")
    return content_features(py, px).permute(2, 0, 1)


def sf_pool(native: torch.Tensor) -> torch.Tensor:
    """SF's pooling (bilinear, align_corners=True) from 37x37 to 16x16, as tokens [h*w, C]."""
    pooled = F.interpolate(native[None], size=(GRID, GRID), mode="bilinear", align_corners=True)[0]
    return pooled.flatten(1).T


FULL = torch.tensor([0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cropped_cache_matches_online_targets_of_the_cropped_image(seed):
    boxes = random_boxes(4, torch.Generator().manual_seed(seed))
    cached = sf_pool(native_grid_of(FULL))[None, None].expand(4, 2, -1, -1)  # [B, V, 256, C]
    cropped = crop_target_grid(cached, (GRID, GRID), (NATIVE, NATIVE), boxes)
    for b, box in enumerate(boxes):
        online = sf_pool(native_grid_of(box))
        error = (cropped[b, 1] - online).abs().max().item()
        assert error < 0.01, f"box {box.tolist()}: max error {error}"
        # the test can fail: uncropped targets are far off
        assert (cached[b, 1] - online).abs().max().item() > 0.05


def test_full_box_is_identity_and_centre_crop_is_exact_for_linear_content():
    cached = torch.randn(2, 1, GRID * GRID, 3)
    same = crop_target_grid(cached, (GRID, GRID), (NATIVE, NATIVE), FULL.expand(2, 4))
    assert torch.allclose(same, cached, atol=1e-5)
    # content linear in position: bilinear resampling of a linear function is exact
    centers = (torch.arange(NATIVE) + 0.5) / NATIVE
    py, px = torch.meshgrid(centers, centers, indexing="ij")
    linear = torch.stack([py, px, 2 * py - px], dim=0)
    pooled = sf_pool(linear)[None, None]
    box = center_boxes(1)[0]
    cropped = crop_target_grid(pooled, (GRID, GRID), (NATIVE, NATIVE), center_boxes(1))
    y0, x0, y1, x1 = box.tolist()
    cy, cx = torch.meshgrid(y0 + (y1 - y0) * centers, x0 + (x1 - x0) * centers, indexing="ij")
    expected = sf_pool(torch.stack([cy, cx, 2 * cy - cx], dim=0))
    assert torch.allclose(cropped[0, 0], expected, atol=1e-5)


def test_boxes_have_90_percent_area_and_stay_inside():
    boxes = random_boxes(500, torch.Generator().manual_seed(0))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert torch.allclose(area, torch.full_like(area, 0.9))
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert boxes[:, 0].std() > 0.01  # positions vary
    centre = center_boxes(3)
    side = math.sqrt(0.9)
    assert torch.allclose(centre[0], torch.tensor([(1 - side) / 2, (1 - side) / 2, (1 + side) / 2, (1 + side) / 2]))


def test_image_crop_puts_content_where_the_box_says():
    # a 256 px image whose red channel is the row fraction and green the column fraction
    size = 256
    centers = (torch.arange(size) + 0.5) / size
    py, px = torch.meshgrid(centers, centers, indexing="ij")
    image = torch.stack([py, px, torch.zeros_like(py)])[None, None]  # [1, 1, 3, H, W]
    box = torch.tensor([[0.05, 0.02, 0.05 + math.sqrt(0.9), 0.02 + math.sqrt(0.9)]])
    out = crop_images(image, box, 224)
    assert out.shape == (1, 1, 3, 224, 224)
    out_centers = (torch.arange(224) + 0.5) / 224
    expected_rows = box[0, 0] + (box[0, 2] - box[0, 0]) * out_centers
    expected_cols = box[0, 1] + (box[0, 3] - box[0, 1]) * out_centers
    assert torch.allclose(out[0, 0, 0, :, 100], expected_rows, atol=2e-3)
    assert torch.allclose(out[0, 0, 1, 50, :], expected_cols, atol=2e-3)


def test_colour_jitter_is_seeded_bounded_and_keeps_grey_grey():
    images = torch.rand(3, 2, 3, 8, 8)
    a = colour_jitter(images, torch.Generator().manual_seed(5))
    b = colour_jitter(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, images)
    grey = torch.full((2, 1, 3, 4, 4), 0.5)
    jittered = colour_jitter(grey, torch.Generator().manual_seed(1))
    assert torch.allclose(jittered[:, :, 0], jittered[:, :, 1], atol=1e-5)  # hue/saturation leave grey alone
    assert torch.allclose(jittered[:, :, 1], jittered[:, :, 2], atol=1e-5)
    no_change = colour_jitter(images, torch.Generator().manual_seed(0), 0, 0, 0, 0)
    assert torch.allclose(no_change, images, atol=1e-5)


def test_per_view_boxes_crop_each_view_like_its_own_per_sample_box():
    torch.manual_seed(0)
    cached = torch.randn(3, 2, GRID * GRID, CHANNELS)
    boxes = random_boxes(6, torch.Generator().manual_seed(4)).view(3, 2, 4)
    both = crop_target_grid(cached, (GRID, GRID), (NATIVE, NATIVE), boxes)
    for view in range(2):
        alone = crop_target_grid(cached[:, view : view + 1], (GRID, GRID), (NATIVE, NATIVE), boxes[:, view])
        torch.testing.assert_close(both[:, view : view + 1], alone)
    assert not torch.allclose(both[:, 0], crop_target_grid(cached, (GRID, GRID), (NATIVE, NATIVE), boxes[:, 1])[:, 0])
    with pytest.raises(SfcacheError, match=r"crop boxes of shape \(3, 3, 4\) do not fit 3 samples x 2 views"):
        crop_target_grid(cached, (GRID, GRID), (NATIVE, NATIVE), torch.zeros(3, 3, 4))
