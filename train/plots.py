"""`sf train`'s loss curves, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from sfcache.vggt import random_weights_warning


def plot_metrics(metrics_path: Path, png_path: Path, weights_id: str | None = None) -> None:
    """Loss curves (train action L1, alignment loss, validation L1 vs the mean-action baseline) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = (
        [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.exists()
        else []
    )
    train_rows = [r for r in records if r["split"] == "train"]
    val_rows = [r for r in records if r["split"] == "val"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    marker = "o" if len(train_rows) == 1 else None  # one logged step: a point, not an invisible line
    left.plot(
        [r["step"] for r in train_rows], [r["action_l1"] for r in train_rows], marker=marker, label="train action L1"
    )
    if any("align_loss" in r for r in train_rows):
        left.plot(
            [r["step"] for r in train_rows if "align_loss" in r],
            [r["align_loss"] for r in train_rows if "align_loss" in r],
            marker=marker,
            label="align loss (1 - cos)",
        )
    left.set_xlabel("step")
    left.set_ylabel("train loss")
    left.set_title("training")
    left.legend()
    right.plot([r["step"] for r in val_rows], [r["val_action_l1"] for r in val_rows], "o-", label="val action L1")
    right.plot(
        [r["step"] for r in val_rows], [r["val_mean_action_l1"] for r in val_rows], "x--", label="mean-action baseline"
    )
    right.set_xlabel("step")
    right.set_ylabel("action L1")
    right.set_title("validation (held-out episodes)")
    right.legend()
    random_weights = random_weights_warning(weights_id) is not None
    fig.suptitle(
        "SF targets: "
        + (
            f"VGGT {weights_id}" + (" (RANDOM weights, no geometry)" if random_weights else "")
            if weights_id
            else "none (baseline without SF)"
        ),
        color="red" if random_weights else "black",
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
