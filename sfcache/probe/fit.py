"""Train DPT heads on frozen tokens and report depth metrics on held-out episodes, with the mean-depth baseline.

Every random choice is a function of (seed, step): the held-out episodes come from a permutation seeded
with `seed`, each step's batch from a generator seeded with (seed, step), every head starts from the same
initialisation. A head's checkpoint (head, optimizer, schedule, step) is written atomically every
`save_every` steps, so a run resumed after a kill takes exactly the steps an uninterrupted one takes.
OUT/metrics.jsonl logs the training (one line per `log_every` steps and head) and each evaluation;
OUT/probe.json is the report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sfcache.device import check_device, resolve_device
from sfcache.errors import ConfigMismatch, Message, SfcacheError, differences, field_of, raise_problems
from sfcache.probe.data import ProbeData
from sfcache.probe.head import SCALES, DPTHead
from sfcache.probe.metrics import DepthMetrics, valid_pixels
from sfcache.probe.picture import depth_picture
from sfcache.progress import progress_bar

REPORT, METRICS, HEADS = "probe.json", "metrics.jsonl", "heads"
MEAN_DEPTH = "mean_depth"  # the baseline's name in reports
IDENTITY = ("steps", "batch_size", "lr", "width", "seed", "test_fraction", "max_depth")  # decide the numbers


@dataclass(frozen=True)
class FitSettings:
    """How the heads are trained and evaluated; the fields of IDENTITY must match to resume."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    width: int = 64  # the head's channels
    seed: int = 0
    test_fraction: float = 0.2  # of the episodes, held out whole
    max_depth: float = 10.0  # metres; farther ground truth is not a valid pixel
    device: str = "auto"
    save_every: int = 200
    log_every: int = 10
    eval_batch: int = 16

    def __post_init__(self):
        counts = {"steps": self.steps, "batch_size": self.batch_size, "width": self.width}
        counts.update(save_every=self.save_every, log_every=self.log_every, eval_batch=self.eval_batch)
        named = partial(field_of, FitSettings)
        problems = [Message(named(name), f" must be >= 1, got {value}") for name, value in counts.items() if value < 1]
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(Message(named("lr"), f" must be a positive finite number, got {self.lr}"))
        if not 0 < self.test_fraction < 1:
            problems.append(Message(named("test_fraction"), f" must be in (0, 1), got {self.test_fraction}"))
        if not self.max_depth > 0:
            problems.append(Message(named("max_depth"), f" must be > 0 metres, got {self.max_depth}"))
        try:
            check_device(self.device, named("device"))
        except SfcacheError as problem:
            problems.append(problem.message)
        raise_problems(problems)


def split_episodes(episodes: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a seeded `fraction` of the episodes (at least one, never all) held out whole."""
    ids = np.unique(episodes)
    if len(ids) < 2:
        raise SfcacheError(f"the probe needs at least 2 episodes to hold one out, got {len(ids)}")
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    held_out = np.random.default_rng(seed).permutation(ids)[:count]
    test = np.isin(episodes, held_out)
    return np.flatnonzero(~test), np.flatnonzero(test)


def batches(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def mean_depth_image(data: ProbeData, rows: np.ndarray, settings: FitSettings) -> tuple[np.ndarray, float]:
    """The baseline: each pixel's mean valid training depth [V, H, W] (a pixel never valid: its view's mean),
    and the mean log depth (where heads start)."""
    total = count = None
    log_sum = log_count = 0.0
    for chunk in batches(rows, settings.eval_batch):
        depth = data.depth(chunk).astype(np.float64)
        valid = valid_pixels(depth, settings.max_depth)
        values = np.where(valid, depth, 0.0)
        total = values.sum(0) if total is None else total + values.sum(0)
        count = valid.sum(0) if count is None else count + valid.sum(0)
        log_sum += float(np.log(depth[valid]).sum())
        log_count += float(valid.sum())
    if log_count == 0:
        raise SfcacheError(f"no valid depth pixel (finite, > 0, < {settings.max_depth} m) in the training rows")
    per_view = total.sum(axis=(1, 2)) / np.maximum(count.sum(axis=(1, 2)), 1)
    image = np.where(count > 0, total / np.maximum(count, 1), per_view[:, None, None])
    return image.astype(np.float32), log_sum / log_count


def _log_loss(log_predicted: torch.Tensor, truth: torch.Tensor, max_depth: float) -> torch.Tensor:
    """L1 on log depth over valid pixels: scale-aware, and the same weight for a wrist (cm) and a scene (m) pixel."""
    valid = torch.isfinite(truth) & (truth > 0) & (truth < max_depth)
    if not valid.any():
        return log_predicted.sum() * 0.0
    return (log_predicted[valid] - truth[valid].log()).abs().mean()


class HeadRun:
    """One DPT head trained on `inputs` (indices into the data's token layers), resumable from OUT/heads/NAME.pt."""

    def __init__(self, data: ProbeData, rows: np.ndarray, inputs: tuple[int, ...], name: str, out: Path,
                 settings: FitSettings, log_bias: float, identity: dict, resume: bool):  # fmt: skip
        if len(inputs) != len(SCALES):
            raise SfcacheError(f"probe {name!r}: a DPT head reads {len(SCALES)} layers, got {len(inputs)}")
        self.data, self.rows, self.inputs, self.name, self.settings = data, rows, tuple(inputs), name, settings
        self.device = resolve_device(settings.device)
        self.path, self.metrics = out / HEADS / f"{name}.pt", out / METRICS
        self.identity = {**identity, "inputs": [data.layers[i] for i in inputs]}
        described = identity["data"]
        torch.manual_seed(settings.seed)  # every head starts alike: only its tokens differ
        self.head = DPTHead(described["dim"], data.grid, described["image_size"], len(data.views), settings.width)
        self.head.set_log_depth_bias(log_bias)
        self.head.to(self.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=settings.lr, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=settings.steps, eta_min=settings.lr * 0.05
        )
        self.step = 0
        if resume and self.path.exists():
            self._restore()
        self._truncate_metrics()

    def _restore(self) -> None:
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
            recorded = saved["identity"]
        except Exception as error:  # torch.load raises many kinds for a damaged file
            raise SfcacheError(
                f"{self.path}: not a readable probe checkpoint ({type(error).__name__}); delete it or use --no-resume"
            ) from None
        diff = differences(recorded, self.identity, sorted(set(recorded) | set(self.identity)))
        if diff:
            raise ConfigMismatch(
                f"{self.path} (resuming a probe made otherwise)",
                diff,
                fix="use --no-resume to start over, or another --out",
                holder="checkpoint",
            )
        self.head.load_state_dict(saved["head"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step = int(saved["step"])

    def _truncate_metrics(self) -> None:
        """Drop this head's training lines after its checkpoint, so a resumed log reads like an uninterrupted one."""
        if self.metrics.exists():
            records = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
            later = [r["probe"] == self.name and r["split"] == "train" and r["step"] > self.step for r in records]
            kept = [json.dumps(r) + "\n" for r, drop in zip(records, later) if not drop]
            self.metrics.write_text("".join(kept))

    def save(self) -> None:
        """Atomically: a kill leaves the old checkpoint or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".pt.partial")
        torch.save(
            {
                "step": self.step,
                "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "identity": self.identity,
            },
            partial,
        )
        os.replace(partial, self.path)

    def train(self) -> DPTHead:
        s = self.settings
        with progress_bar(unit="steps") as bar:
            task = bar.add_task(f"probe {self.name}", total=s.steps, completed=self.step)
            while self.step < s.steps:
                chosen = np.random.default_rng([s.seed, self.step]).choice(
                    self.rows, size=min(s.batch_size, len(self.rows)), replace=False
                )
                tokens = torch.from_numpy(self.data.tokens(chosen)[:, list(self.inputs)]).to(self.device)
                truth = torch.from_numpy(self.data.depth(chosen)).to(self.device)
                self.head.train()
                loss = _log_loss(self.head(tokens), truth, s.max_depth)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                bar.advance(task)
                if self.step % s.log_every == 0 or self.step == s.steps:
                    record = {"probe": self.name, "step": self.step, "split": "train", "log_l1": loss.item()}
                    append_metrics(self.metrics, {**record, "lr": self.scheduler.get_last_lr()[0]})
                if self.step % s.save_every == 0 or self.step == s.steps:
                    self.save()
        if not self.path.exists():  # resumed at the end: nothing left to train, the checkpoint is there
            self.save()
        return self.head.eval()


def append_metrics(path: Path, record: dict) -> None:
    """One JSON line; a non-finite number is written as null, never NaN."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with path.open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


@torch.no_grad()
def predict(head: DPTHead | None, inputs: tuple[int, ...], data: ProbeData, rows: np.ndarray,
            settings: FitSettings, mean_image: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """(rows, predicted depth [B, V, H, W]) batch by batch; `head` None is the mean-depth baseline."""
    for chunk in batches(rows, settings.eval_batch):
        if head is None:
            yield chunk, np.broadcast_to(mean_image, (len(chunk), *mean_image.shape))
            continue
        device = next(head.parameters()).device
        tokens = torch.from_numpy(data.tokens(chunk)[:, list(inputs)]).to(device)
        yield chunk, head.depth(tokens).float().cpu().numpy()


def evaluate(head: DPTHead | None, inputs: tuple[int, ...], data: ProbeData, rows: np.ndarray,
             settings: FitSettings, mean_image: np.ndarray) -> dict:  # fmt: skip
    """{view: {abs_rel, rmse_m, delta1, pixels}} over `rows`."""
    metrics = DepthMetrics(data.views, settings.max_depth)
    for chunk, predicted in predict(head, inputs, data, rows, settings, mean_image):
        metrics.update(predicted, data.depth(chunk))
    return metrics.result()


def _check_same_kind(data: ProbeData, other: ProbeData, name: str) -> None:
    fields = ("views", "grid", "layers", "dim", "image_size")
    diff = differences(data.describe(), other.describe(), fields)
    if diff:
        listed = "; ".join(f"{k}: training data has {a!r}, {name} has {b!r}" for k, (a, b) in diff.items())
        raise SfcacheError(f"test set {name!r} does not fit the probe's heads ({listed})")


def probe(
    data: ProbeData,
    out: str | Path,
    settings: FitSettings = FitSettings(),
    heads: dict[str, tuple[int, ...]] | None = None,
    test: dict[str, ProbeData] | None = None,
    about: dict | None = None,
    resume: bool = True,
    control: str | None = None,
) -> dict:
    """Train one DPT head per entry of `heads` ({name: 4 indices into data.layers}; default {"probe": (0, 1, 2,
    3)}) on the training episodes, and report AbsRel, RMSE (m) and delta1 per view of each head and of the
    mean-depth baseline on the held-out episodes ("test") and on every `test` set (all its rows). Writes
    OUT/probe.json (returned), OUT/metrics.jsonl, OUT/heads/*.pt and a picture per set and view; `about` is
    recorded in probe.json as given. `comparison[set][head][view]` is each head's AbsRel over the mean-depth
    baseline's and over the `control` head's (a name in `heads`): below 1, the head beats it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    heads = heads or {"probe": tuple(range(len(SCALES)))}
    test = test or {}
    for name, other in test.items():
        _check_same_kind(data, other, name)
    metrics_path = out / METRICS
    if not resume:
        for stale in [metrics_path, *(out / HEADS).glob("*.pt")]:
            stale.unlink(missing_ok=True)
    train_rows, test_rows = split_episodes(data.episodes, settings.test_fraction, settings.seed)
    mean_image, log_bias = mean_depth_image(data, train_rows, settings)
    identity = {
        **{name: getattr(settings, name) for name in IDENTITY},
        "data": data.describe(),
        "test_episodes": np.unique(data.episodes[test_rows]).tolist(),
    }
    if metrics_path.exists():  # evaluations are redone below; training lines stay for the heads to resume
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records if r["split"] == "train"))
    trained = {
        name: HeadRun(data, train_rows, inputs, name, out, settings, log_bias, identity, resume).train()
        for name, inputs in heads.items()
    }
    predictors = {**{name: (trained[name], heads[name]) for name in heads}, MEAN_DEPTH: (None, ())}
    sets = {"test": (data, test_rows), **{name: (other, np.arange(len(other))) for name, other in test.items()}}
    results, pictures = {}, []
    for set_name, (rows_data, rows) in sets.items():
        results[set_name] = {}
        for name, (head, inputs) in predictors.items():
            results[set_name][name] = evaluate(head, inputs, rows_data, rows, settings, mean_image)
            append_metrics(
                metrics_path, {"probe": name, "step": settings.steps, "split": set_name, **results[set_name][name]}
            )
        pictures += _pictures(out, set_name, rows_data, rows, predictors, settings, mean_image)
    report = {
        "about": about or {},
        "settings": asdict(settings),
        "data": identity["data"],
        "heads": {name: [data.layers[i] for i in inputs] for name, inputs in heads.items()},
        "baseline": f"{MEAN_DEPTH}: each pixel's mean training depth",
        "split": {
            "train_rows": len(train_rows),
            "test_rows": len(test_rows),
            "test_episodes": identity["test_episodes"],
        },
        "test_sets": {name: other.describe() for name, other in test.items()},
        "results": results,
        "comparison": {
            set_name: {
                name: {view: _ratios(by_set, name, view, control) for view in data.views}
                for name in heads
                if name != control
            }
            for set_name, by_set in results.items()
        },
        "pictures": [str(p.relative_to(out)) for p in pictures],
    }
    partial = out / (REPORT + ".partial")
    partial.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    os.replace(partial, out / REPORT)
    return report


def _ratios(results: dict, name: str, view: str, control: str | None) -> dict[str, float | None]:
    """AbsRel of head `name` over the baseline's and the control head's on one view (None without pixels)."""
    mine = results[name][view]["abs_rel"]
    ratios = {}
    for other in (MEAN_DEPTH, control) if control else (MEAN_DEPTH,):
        theirs = results[other][view]["abs_rel"]
        ratios[f"abs_rel_over_{other}"] = None if mine is None or not theirs else mine / theirs
    return ratios


def _pictures(out: Path, set_name: str, data: ProbeData, rows: np.ndarray, predictors: dict,
              settings: FitSettings, mean_image: np.ndarray) -> list[Path]:  # fmt: skip
    """One PNG per view of the set's middle row: frame | ground truth | prediction | error per predictor."""
    row = rows[len(rows) // 2 : len(rows) // 2 + 1]
    truth = data.depth(row)[0]
    frames = data.frames(row)
    predicted = {
        name: next(predict(head, inputs, data, row, settings, mean_image))[1][0]
        for name, (head, inputs) in predictors.items()
    }
    paths = []
    for v, view in enumerate(data.views):
        paths.append(
            depth_picture(
                out / f"{set_name}_{view}.png",
                f"{set_name}, view {view}, row {int(row[0])}",
                None if frames is None else frames[0, v],
                truth[v],
                {name: p[v] for name, p in predicted.items()},
                settings.max_depth,
            )
        )
    return paths
