"""The `sf train` loop: AdamW, warmup + cosine, clipping, bf16 on GPU, exact resume, validation, plots.

Every random choice is a function of (seed, step): the batch indices come from a per-epoch
permutation, the crop boxes and colour jitter from a generator seeded with (seed, step). So a
run resumed from its checkpoint (model, optimizer, schedule, RNG state, running action mean)
takes exactly the steps an uninterrupted run takes, even after a kill -9: the checkpoint is
written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sfcache.device import DEVICE_CHOICES, check_device, resolve_device
from sfcache.errors import (
    ConfigMismatch,
    Message,
    ResumeMismatch,
    SfcacheError,
    differences,
    field_of,
    raise_problems,
)
from sfcache.options import comma_list, comma_text, option, square_grid, square_grid_text
from sfcache.progress import progress_bar
from sfcache.provenance import identity_fields
from sfcache.torch import CachedTargets, SpatialForcingLoss
from sfcache.train.augment import CROP_AREA, center_boxes, colour_jitter, crop_images, random_boxes
from sfcache.train.checkpoint import load_checkpoint
from sfcache.train.data import StepDataset, TrainingData, check_resume, open_training_data
from sfcache.train.model import SIZES, Policy, PolicyConfig
from sfcache.train.online import OnlineTargets
from sfcache.train.plots import plot_metrics

CHECKPOINT, METRICS, PLOT = "checkpoint.pt", "metrics.jsonl", "loss_curves.png"


@dataclass
class TrainConfig:
    """What `sf train` was asked to do (each option field's help is its `sf train` option's)."""

    source: Path = option(help="Dataset the cache was extracted from (any sf format).")
    out: Path = option(help="Run folder: checkpoint.pt, metrics.jsonl, loss_curves.png.")
    cache: Path | None = option(None, "Target store made by `sf extract` (read only).")
    steps: int = option(2000, "Optimizer steps in total (a resumed run counts on).")
    batch_size: int = option(16, "Steps per optimizer step.", identity=True)
    lr: float = option(3e-4, "Peak AdamW learning rate (linear warmup, cosine decay).")
    weight_decay: float = 0.01
    warmup_steps: int = option(100, "Steps of linear learning-rate warmup.")
    grad_clip: float = 1.0
    align_weight: float = option(0.5, "SF's alpha; 0 trains the baseline without SF.", identity=True)
    align_layer: int | None = option(None, "Policy block whose visual tokens are aligned (default: 3/4 of the depth).")
    model_size: str = option("small", " | ".join(SIZES) + ".")
    grid: int = option(
        16,
        "Visual tokens per view, NxN or N per side; images are N*14 px (16x16 -> 224).",
        parse=square_grid,
        show=square_grid_text,
    )
    views: tuple[str, ...] | None = option(
        None, "Comma-separated camera views (default: the cache's).", parse=comma_list, show=comma_text
    )
    cache_layer: int | None = option(None, "Stored VGGT layer (default: the only one).")
    online_vggt: str | None = option(
        None, "VGGT weights: compute targets inside each step like the public SF trainer (to compare)."
    )
    device: str = option("auto", f"{DEVICE_CHOICES}.")
    val_episodes: int = option(2, "Episodes held out for validation action L1.")
    val_every: int = option(200, "Validate every N steps.")
    val_samples: int = 256
    save_every: int = option(200, "Checkpoint every N steps.")
    log_every: int = 10
    seed: int = option(0, "Seed of the initialisation, batch order and augmentation.", identity=True)
    resume: bool = option(True, "Continue from OUT/checkpoint.pt if present.")
    loader_workers: int = option(2, "DataLoader worker processes.")
    augment: bool = option(True, "Random 90% crop + colour jitter.")
    deterministic: bool = option(False, "Deterministic kernels (bitwise resume).")

    def __post_init__(self):
        self.source, self.out = Path(self.source), Path(self.out)
        self.cache = Path(self.cache) if self.cache else None
        named = partial(field_of, TrainConfig)
        problems = []
        if self.model_size not in SIZES:
            problems.append(Message(named("model_size"), f" must be one of {list(SIZES)}, got {self.model_size!r}"))
        if self.align_weight < 0:
            problems.append(Message(named("align_weight"), f" must be >= 0, got {self.align_weight}"))
        if self.align_weight > 0 and self.cache is None and self.online_vggt is None:
            problems.append(
                Message(
                    named("align_weight"),
                    " > 0 needs targets: give ",
                    named("cache"),
                    " STORE or ",
                    named("online_vggt"),
                    " WEIGHTS (or ",
                    named("align_weight"),
                    " 0 for the baseline without SF)",
                )
            )
        counts = ("steps", "batch_size", "val_every", "save_every", "log_every", "grid")
        small = [Message(named(name), f" {getattr(self, name)}") for name in counts if getattr(self, name) < 1]
        if small:
            problems.append(Message("these must be >= 1: ", Message.join(", ", small)))
        negative = ("warmup_steps", "val_episodes", "loader_workers")
        below = [Message(named(name), f" {getattr(self, name)}") for name in negative if getattr(self, name) < 0]
        if below:
            problems.append(Message("these must be >= 0: ", Message.join(", ", below)))
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(Message(named("lr"), f" must be a positive finite number, got {self.lr}"))
        depth = SIZES[self.model_size][1] if self.model_size in SIZES else None
        if depth and self.align_layer is not None and not 1 <= self.align_layer <= depth:
            problems.append(
                Message(
                    named("align_layer"),
                    f" must be in 1..{depth} for ",
                    named("model_size"),
                    f" {self.model_size} (default {round(depth * 3 / 4)}), got {self.align_layer}",
                )
            )
        try:
            check_device(self.device, named("device"))
        except SfcacheError as problem:
            problems.append(problem.message)
        raise_problems(problems)

    def warnings(self) -> list[str]:
        """Settings that run but likely not as meant: what `sf train` prints before it starts."""
        if self.steps < self.warmup_steps:
            named = partial(field_of, TrainConfig)
            return [
                Message(
                    named("steps"),
                    f" {self.steps} is below ",
                    named("warmup_steps"),
                    f" {self.warmup_steps}: the learning rate never reaches ",
                    named("lr"),
                    " (the run ends in warm-up); lower ",
                    named("warmup_steps"),
                    " or raise ",
                    named("steps"),
                )
            ]
        return []


@dataclass(frozen=True)
class TrainResult:
    """Where a training run's outputs are, and its last validation (None when it held out no episode)."""

    out: Path
    checkpoint: Path
    metrics: Path
    plot: Path
    weights_id: str | None  # the VGGT the targets came from; None for the baseline without SF
    steps: int
    resumed_from: int | None  # the checkpoint's step when the run resumed
    mean_step_time_s: float | None  # median seconds per step of this process's steps
    val_action_l1: float | None = None
    val_mean_action_l1: float | None = None


class StepBatches(Sampler):
    """Batch indices of steps [start, stop): positions s*B.. of an endless stream of per-epoch permutations."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int, stop: int):
        self.num_samples, self.batch_size, self.seed, self.start, self.stop = num_samples, batch_size, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        epoch, order = -1, None
        for step in range(self.start, self.stop):
            batch = []
            for position in range(step * self.batch_size, (step + 1) * self.batch_size):
                if position // self.num_samples != epoch:
                    epoch = position // self.num_samples
                    order = torch.randperm(
                        self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                    ).tolist()
                batch.append(order[position % self.num_samples])
            yield batch


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Batch:
    """A batch on the device, augmented: images [B, V, 3, S, S] in [0, 1], targets [B, V, h*w, C] or None."""

    images: torch.Tensor
    text: torch.Tensor
    proprio: torch.Tensor
    actions: torch.Tensor
    targets: torch.Tensor | None


def prepare(
    raw: dict,
    policy: PolicyConfig,
    device: torch.device,
    boxes: torch.Tensor,
    generator: torch.Generator | None,
    targets: CachedTargets | None,
) -> Batch:
    """Crop (+ jitter when `generator`) the frames, and with `targets` decode the batch's stored targets on
    `device` cropped with the same boxes (`CachedTargets.decode`, as a user's loop does)."""
    frames = raw["frames"].to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float() / 255
    images = crop_images(frames, boxes, policy.image_size[0])
    if generator is not None:
        images = colour_jitter(images, generator)
    decoded = None
    if "targets" in raw and targets is not None:
        decoded = targets.decode(raw["targets"], device=device, boxes=boxes)
    return Batch(images, raw["text"].to(device), raw["proprio"].to(device), raw["actions"].to(device), decoded)


def compute_losses(
    model: Policy, sf_loss: SpatialForcingLoss | None, batch: Batch, align_weight: float
) -> dict[str, torch.Tensor]:
    """L = L1(actions in the head's [-1, 1] units) + alpha * L_align (SF's L_SF); L_align only when alpha > 0."""
    predicted, visual = model(batch.images, batch.text, batch.proprio)
    action_l1 = model.action_error(predicted.float(), batch.actions).mean()
    if sf_loss is None or align_weight == 0:
        return {"loss": action_l1, "action_l1": action_l1}
    align = sf_loss(visual, batch.targets)
    return {"loss": action_l1 + align_weight * align, "action_l1": action_l1, "align_loss": align}


def run_identity(config: TrainConfig) -> dict:
    """The settings a resumed run must repeat, as the checkpoint's "config" records them (the fields of TrainConfig
    declared identity; the policy's shape is compared through its own record)."""
    return {name: getattr(config, name) for name in identity_fields(TrainConfig)}


def _run_settings(policy: dict, seed: int, batch_size: int, align_weight: float) -> dict:
    """A run's settings keyed by the flag that sets each (the policy's size as its --model-size name); the policy
    fields no flag sets (views, action and proprio sizes: the data's) by name."""
    dims = (policy["dim"], policy["depth"], policy["heads"])
    size = next(
        (name for name, sized in SIZES.items() if tuple(sized) == dims), "dim {}, depth {}, heads {}".format(*dims)
    )
    flags = {
        "--model-size": size,
        "--align-layer": policy["align_layer"],
        "--grid": policy["grid"][0],
        "--seed": seed,
        "--batch-size": batch_size,
        "--align-weight": align_weight,
    }
    by_flag = ("dim", "depth", "heads", "align_layer", "grid")
    return {**flags, **{f"policy {k}": v for k, v in policy.items() if k not in by_flag}}


class Trainer:
    """Holds the run's state; `run()` trains to `config.steps`, resuming from OUT/checkpoint.pt if asked."""

    def __init__(self, config: TrainConfig):
        self.config = c = config
        self.device = resolve_device(c.device, name=field_of(TrainConfig, "device"))
        if c.deterministic:
            torch.use_deterministic_algorithms(True)
        _writable_folder(c.out)
        self.checkpoint_path, self.metrics_path, self.plot_path = c.out / CHECKPOINT, c.out / METRICS, c.out / PLOT
        saved = load_checkpoint(self.checkpoint_path) if c.resume and self.checkpoint_path.exists() else None
        self.data: TrainingData = open_training_data(  # the baseline (alpha = 0) reads no targets
            c.source,
            c.cache if c.align_weight > 0 else None,
            c.views,
            (c.grid, c.grid),
            chunk=PolicyConfig.chunk,
            text_len=PolicyConfig.text_len,
            val_episodes=c.val_episodes,
            cache_layer=c.cache_layer,
        )
        self.policy_config = PolicyConfig.sized(
            c.model_size,
            c.align_layer,
            views=len(self.data.views),
            grid=(c.grid, c.grid),
            proprio_dim=len(self.data.proprio_mean),
            action_dim=self.data.action_dim,
        )
        torch.manual_seed(c.seed)
        self.model = Policy(
            self.policy_config, self.data.proprio_mean, self.data.proprio_std, self.data.action_bounds
        ).to(self.device)
        self.online = (
            OnlineTargets(c.online_vggt, self.device, c.cache_layer, self.policy_config.grid) if c.online_vggt else None
        )
        if self.online and self.data.targets:  # both: online targets train, the cache is compared with them
            stored = {"weights_id": self.data.identity["weights_id"], "channels": self.data.targets.channels}
            online = {"weights_id": self.online.weights_id, "channels": self.online.channels}
            differ = differences(stored, online, ("weights_id", "channels"))
            if differ:
                raise ConfigMismatch(
                    c.cache,
                    {f"{name} (vs --online-vggt)": pair for name, pair in differ.items()},
                    fix=Message(
                        "give ",
                        field_of(TrainConfig, "online_vggt"),
                        " the weights the cache was extracted with, or leave out ",
                        field_of(TrainConfig, "cache"),
                    ),
                )
        if self.online:
            self.data.identity["online_vggt"] = self.online.weights_id
        if saved is not None:  # the run's own settings first: they explain a different identity too
            self._check_same_run(saved)
            check_resume(saved["identity"], self.data.identity, c.out)
        target_width = self.online.channels if self.online else self.data.targets.channels if self.data.targets else 0
        self.sf_loss = (
            SpatialForcingLoss(self.policy_config.dim, target_width).to(self.device) if c.align_weight > 0 else None
        )
        parameters = [p for m in (self.model, self.sf_loss) if m is not None for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": c.weight_decay},
                {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=c.lr,
            betas=(0.9, 0.95),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, c.warmup_steps, c.steps)
        )
        self.step = 0
        self.action_sum = torch.zeros(self.data.action_dim, dtype=torch.float64)
        self.action_count = 0
        self.resumed_from = None
        if saved is not None:
            self._restore(saved)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()

    # -- checkpoints

    def _state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "sf_loss": self.sf_loss.state_dict() if self.sf_loss else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "action_sum": self.action_sum,
            "action_count": self.action_count,
            "policy": self.policy_config.to_dict(),
            "identity": self.data.identity,
            "frames": self._frames(),
            "config": {**run_identity(self.config), "steps": self.config.steps},
        }

    def _frames(self) -> dict:
        """How the policy's input frames were made, so that `sf eval-libero` renders and prepares them alike."""
        source, first = self.data.train.source, self.data.train.episodes[0]
        height, width = source.read(first.key, 0, 1).frames.shape[2:4]
        return {
            "size": [int(height), int(width)],  # the source's frames, before the crop
            "rotate_180": bool(source.rotate),
            "jpeg_fast_dct": bool(source.jpeg_fast_dct),
            "crop_area": CROP_AREA,  # training: a random box of this area (with --augment), evaluation: the centre
            "augment": bool(self.config.augment),
            "resize": f"bilinear to {self.policy_config.image_size[0]} px",
        }

    def save(self) -> None:
        """Write the checkpoint atomically: a kill at any moment leaves the old or the new one."""
        partial = self.checkpoint_path.with_suffix(".pt.partial")
        torch.save(self._state(), partial)
        os.replace(partial, self.checkpoint_path)

    def _check_same_run(self, saved: dict) -> None:
        """ResumeMismatch naming each run setting (model size, seed, batch size, alpha, ...) by its flag, when it
        differs from the checkpoint's."""
        saved_config = saved["config"]
        had = _run_settings(_jsonable(saved["policy"]), **{k: saved_config[k] for k in identity_fields(TrainConfig)})
        c = self.config
        asked = _run_settings(_jsonable(self.policy_config.to_dict()), **run_identity(c))
        diff = differences(had, asked, list(had))
        if "--model-size" in diff and c.align_layer is None:
            diff.pop("--align-layer", None)  # the default layer follows the size: one difference, not two
        if diff:
            raise ResumeMismatch(c.out, diff)

    def _restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        if self.sf_loss is not None:
            self.sf_loss.load_state_dict(saved["sf_loss"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.step, self.resumed_from = saved["step"], saved["step"]
        self.action_sum, self.action_count = saved["action_sum"], saved["action_count"]
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint, so a resumed run's log reads like an uninterrupted one."""
        if self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        """One JSON line; a non-finite number (an overflowing gradient norm) is written as null, never NaN."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    # -- training

    def _loader(self, dataset: StepDataset, batches) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=dataset.collate,
            num_workers=self.config.loader_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _online_targets(self, batch: Batch) -> dict[str, float]:
        """Replace cached targets with online VGGT ones; log how closely the cached crop matched them."""
        online = self.online(batch.images)
        stats = {}
        if batch.targets is not None:
            stats["online_vs_cached_cos"] = (
                torch.nn.functional.cosine_similarity(online.float(), batch.targets.float(), dim=-1).mean().item()
            )
        batch.targets = online
        return stats

    def train_step(self, raw: dict) -> dict[str, float]:
        c = self.config
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + self.step)
        boxes = random_boxes(len(raw["frames"]), generator) if c.augment else center_boxes(len(raw["frames"]))
        batch = prepare(
            raw, self.policy_config, self.device, boxes, generator if c.augment else None, self.data.targets
        )
        stats = self._online_targets(batch) if self.online is not None and c.align_weight > 0 else {}
        self.action_sum += batch.actions.detach().double().cpu().sum(dim=(0, 1))
        self.action_count += batch.actions.shape[0] * batch.actions.shape[1]
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            losses = compute_losses(self.model, self.sf_loss, batch, c.align_weight)
        if not torch.isfinite(losses["loss"]):
            parts = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
            kept = f"{self.checkpoint_path} is kept as it was" if self.checkpoint_path.exists() else "nothing was saved"
            raise SfcacheError(
                f"step {self.step + 1}: the loss is not finite ({parts}); {kept}. "
                "Lower --lr, or check the data's actions and proprio for extreme values"
            )
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]], c.grad_clip
        )
        self.optimizer.step()
        self.scheduler.step()
        return {**{k: v.item() for k, v in losses.items()}, "grad_norm": grad_norm.item(), **stats}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Action L1 on held-out episodes (centre crop, no jitter) and the mean-action baseline's L1."""
        val = self.data.val
        if len(val) == 0:
            return {}
        rows = np.unique(np.linspace(0, len(val) - 1, min(self.config.val_samples, len(val))).round().astype(int))
        batches = [rows[i : i + self.config.batch_size].tolist() for i in range(0, len(rows), self.config.batch_size)]
        mean_action = (self.action_sum / max(1, self.action_count)).float().to(self.device)
        self.model.eval()
        error = baseline = count = 0.0
        for raw in self._loader(val, batches):
            batch = prepare(raw, self.policy_config, self.device, center_boxes(len(raw["frames"])), None, None)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                predicted, _ = self.model(batch.images, batch.text, batch.proprio)
            error += (predicted.float() - batch.actions).abs().sum().item()
            baseline += (mean_action - batch.actions).abs().sum().item()
            count += batch.actions.numel()
        return {"val_action_l1": error / count, "val_mean_action_l1": baseline / count}

    def run(self) -> TrainResult:
        c = self.config
        step_times: list[float] = []
        val_metrics: dict[str, float] = {}
        batches = StepBatches(len(self.data.train), c.batch_size, c.seed, self.step, c.steps)
        with progress_bar(unit="steps") as bar:
            task = bar.add_task("train", total=c.steps, completed=self.step)
            for raw in self._loader(self.data.train, batches):
                began = time.perf_counter()
                metrics = self.train_step(raw)
                step_times.append(time.perf_counter() - began)
                self.step += 1
                bar.update(task, advance=1, loss=metrics["loss"])  # plain lines (logs) carry it too
                if self.step % c.log_every == 0 or self.step == c.steps:
                    self.log(
                        {
                            "step": self.step,
                            "split": "train",
                            "lr": self.scheduler.get_last_lr()[0],
                            "step_time_s": step_times[-1],
                            **metrics,
                        }
                    )
                if self.step % c.val_every == 0 or self.step == c.steps:
                    val_metrics = self.validate()
                    if val_metrics:
                        self.log({"step": self.step, "split": "val", **val_metrics})
                if self.step % c.save_every == 0 or self.step == c.steps:
                    self.save()
        plot_metrics(
            self.metrics_path,
            self.plot_path,
            self.data.identity.get("online_vggt") or self.data.identity.get("weights_id"),
        )
        return TrainResult(
            out=c.out,
            checkpoint=self.checkpoint_path,
            metrics=self.metrics_path,
            plot=self.plot_path,
            weights_id=self.data.identity.get("online_vggt") or self.data.identity.get("weights_id"),
            steps=self.step,
            resumed_from=self.resumed_from,
            mean_step_time_s=float(np.median(step_times)) if step_times else None,
            **val_metrics,
        )


OUT = field_of(TrainConfig, "out")


def _writable_folder(out: Path) -> None:
    """Create the run folder and prove it takes files now, before any data is read."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        raise SfcacheError(
            Message(OUT, f" {out}: is a file; expected a run folder (new or from an earlier sf train)")
        ) from None
    except OSError as error:
        raise SfcacheError(
            Message(OUT, f" {out}: cannot write there ({error.strerror or error}); choose a writable folder")
        ) from None


def train(config: TrainConfig) -> TrainResult:
    """Train a policy with (or without) the SF loss; returns where results are and the last validation."""
    return Trainer(config).run()


def _jsonable(value):
    return json.loads(json.dumps(value))
