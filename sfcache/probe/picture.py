"""The probe's picture of one test frame per view: frame | ground truth | prediction | error, one row per
predictor (probe heads and the mean-depth baseline), colour bars in metres."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfcache.probe.metrics import valid_pixels


def depth_picture(
    path: Path,
    title: str,
    frame: np.ndarray | None,
    truth: np.ndarray,
    predictions: dict[str, np.ndarray],
    max_depth: float,
) -> Path:
    """frame uint8 [H, W, 3] or None, truth and each prediction float [H, W] metres -> a PNG at `path`.
    Invalid ground-truth pixels are grey and left out of the error column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = valid_pixels(truth, max_depth)
    shown = np.where(valid, truth, np.nan)
    low, high = (float(np.nanmin(shown)), float(np.nanmax(shown))) if valid.any() else (0.0, 1.0)
    errors = {name: np.where(valid, np.abs(p - truth), np.nan) for name, p in predictions.items()}
    worst = max([float(np.nanmax(e)) for e in errors.values() if np.isfinite(e).any()] or [1.0])
    depth_map = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
    error_map = matplotlib.colormaps["magma"].with_extremes(bad="0.6")
    rows = len(predictions)
    fig, axes = plt.subplots(rows, 4, figsize=(13, 3.1 * rows), squeeze=False, layout="constrained")
    for row, (name, predicted) in enumerate(predictions.items()):
        left, gt, pred, err = axes[row]
        if frame is not None:
            left.imshow(frame)
        rel = float(np.mean(np.abs(predicted - truth)[valid] / truth[valid])) if valid.any() else float("nan")
        left.set_ylabel(f"{name}\nAbsRel {rel:.3f}", fontsize=9)
        gt.imshow(shown, cmap=depth_map, vmin=low, vmax=high)
        image = pred.imshow(predicted, cmap=depth_map, vmin=low, vmax=high)
        fig.colorbar(image, ax=[gt, pred], label="depth (m)")
        image = err.imshow(errors[name], cmap=error_map, vmin=0, vmax=worst)
        fig.colorbar(image, ax=err, label="|error| (m)")
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    for axis, label in zip(axes[0], ("frame", "ground truth", "prediction", "error")):
        axis.set_title(label)
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
