"""`sf train` end to end on fixture data: learning, exact resume (also after kill -9), refusing wrong caches."""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from sfcache.cli.main import main
from sfcache.errors import Field, SfcacheError
from sfcache.libero_eval import EvalConfig
from sfcache.libero_results import results_table, success_summary
from sfcache.options import default_of
from sfcache.train.data import open_training_data
from sfcache.train.libero_policy import CheckpointPolicy
from sfcache.train.loop import CHECKPOINT, METRICS, TrainConfig, Trainer
from tests._cli_helpers import kill_9_then_resume
from tests._train_helpers import GRID, tree_digest, write_dataset, write_store

TINY = ["--model-size", "tiny", "--grid", str(GRID), "--loader-workers", "0", "--warmup-steps", "5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    source = write_dataset(root / "data")
    return source, write_store(root / "store", source)


def sf(*args: str) -> int:
    """Run `sf ...` in-process; its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def records(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / METRICS).read_text().splitlines()) if r["split"] == split]


def test_sf_train_beats_mean_action_baseline_and_leaves_cache_untouched(data, tmp_path, capsys):
    source, store = data
    before = tree_digest(store)
    out = tmp_path / "run"
    status = sf(
        "train",
        "--source",
        str(source),
        "--cache",
        str(store),
        "--out",
        str(out),
        "--steps",
        "24",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--val-every",
        "24",
        *TINY,
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert status == 0
    assert f"checkpoint: {out / CHECKPOINT}" in printed and "loss_curves.png" in printed
    assert "RANDOM WEIGHTS (random:tiny+seed0): these targets carry no geometry" in captured.err
    final = records(out, "val")[-1]
    assert final["step"] == 24
    assert final["val_action_l1"] < final["val_mean_action_l1"], final
    train = records(out, "train")
    assert train[-1]["align_loss"] < train[0]["align_loss"]  # the policy learns the targets too
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tree_digest(store) == before  # training never writes the cache
    # its evaluation says where its targets came from: summary.json's policy and the table's caption
    described = CheckpointPolicy(out, device="cpu").describe()
    assert described["random_weights"].startswith("RANDOM WEIGHTS (random:tiny+seed0): these targets carry no")
    record = {"task": "t", "task_id": 0, "trial": 0, "success": True, "steps": 5, "seconds": 1.0, "sim_steps": 15}
    summary = success_summary(
        [record], EvalConfig("spatial", tmp_path / "eval", tasks=(0,), trials_per_task=1), described
    )
    assert json.loads(json.dumps(asdict(summary)))["policy"]["random_weights"] == described["random_weights"]
    table = Console(file=io.StringIO(), width=300)
    table.print(results_table(summary))
    assert described["random_weights"] in " ".join(table.file.getvalue().split())  # the caption, wrapped


def small_config(source: Path, store: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        source=source,
        cache=store,
        out=out,
        steps=6,
        batch_size=8,
        model_size="tiny",
        grid=GRID,
        loader_workers=0,
        warmup_steps=2,
        save_every=3,
        val_every=3,
        log_every=1,
        val_samples=16,
    )


def test_resume_continues_from_the_same_step_and_optimizer_state(data, tmp_path, monkeypatch):
    source, store = data
    reference = Trainer(small_config(source, store, tmp_path / "reference"))
    reference.run()

    interrupted = tmp_path / "interrupted"
    original_step = Trainer.train_step

    def crash_at_step_5(self, raw):
        if self.step == 5:
            raise KeyboardInterrupt
        return original_step(self, raw)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        Trainer(small_config(source, store, interrupted)).run()
    monkeypatch.setattr(Trainer, "train_step", original_step)

    resumed = Trainer(small_config(source, store, interrupted))
    assert resumed.step == 3
    assert all(state["step"].item() == 3 for state in resumed.optimizer.state_dict()["state"].values())
    assert [r["step"] for r in records(interrupted, "train")] == [1, 2, 3]  # the log is cut back too
    resumed.run()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert records(interrupted, "val") == records(tmp_path / "reference", "val")


def test_kill_9_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    source, store = data
    common = [
        "--source",
        str(source),
        "--cache",
        str(store),
        "--steps",
        "16",
        "--batch-size",
        "8",
        "--save-every",
        "2",
        "--val-every",
        "8",
        "--deterministic",
        *TINY,
    ]
    killed_out = tmp_path / "killed"
    killed_at = kill_9_then_resume(
        ["train", "--out", tmp_path / "reference", *common],
        ["train", "--out", killed_out, *common],
        killed_out / CHECKPOINT,
    )
    assert 2 <= killed_at < 16
    a = torch.load(killed_out / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "reference" / CHECKPOINT, weights_only=False)
    assert a["step"] == b["step"] == 16
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
    assert records(killed_out, "val") == records(tmp_path / "reference", "val")


def test_a_store_of_other_views_grid_and_dataset_is_refused_with_each_difference(data, tmp_path, capsys):
    source, _ = data
    other_source = write_dataset(tmp_path / "other", seed=1)
    other_store = write_store(tmp_path / "other_store", other_source, views=("wrist", "primary"))
    status = sf(
        "train",
        "--source",
        str(source),
        "--cache",
        str(other_store),
        "--out",
        str(tmp_path / "run"),
        "--views",
        "primary,wrist",
        "--steps",
        "1",
        *TINY[:2],
        "--grid",
        "8",
    )
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error
    assert "configuration differs" in error
    assert "views: store has ['wrist', 'primary'], asked ['primary', 'wrist']" in error
    assert "grid: store has [4, 4], asked [8, 8]" in error
    assert "source.fingerprint: store has 'sha256:" in error
    assert "give the store's --views and --grid and the dataset it was extracted from as --source" in error
    assert f"source.path: store has '{other_source.resolve()}', asked '{source.resolve()}'" in error


def test_resuming_against_a_store_of_other_width_is_refused(data, tmp_path, capsys):
    source, store = data
    out = tmp_path / "run"
    assert (
        sf(
            "train",
            "--source",
            str(source),
            "--cache",
            str(store),
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--val-episodes",
            "0",
            *TINY,
        )
        == 0
    )
    narrow = write_store(tmp_path / "narrow", source, channels=16)
    status = sf(
        "train",
        "--source",
        str(source),
        "--cache",
        str(narrow),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--val-episodes",
        "0",
        *TINY,
    )
    error = capsys.readouterr().err
    assert status == 2
    assert (
        f"the checkpoint in {out} was trained with --cache (target channels) 32, you asked 16; use --no-resume" in error
    )


def test_an_unfinished_store_is_a_clear_error(data, tmp_path, capsys):
    source, _ = data
    partial = write_store(tmp_path / "partial", source, unfinished_shards=1)
    status = sf(
        "train", "--source", str(source), "--cache", str(partial), "--out", str(tmp_path / "run"), "--steps", "1", *TINY
    )
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error
    assert "1 episodes are not fully extracted" in error and "demo_7" in error and "sf extract" in error


def test_online_vggt_targets_train_inside_the_step(data, tmp_path):
    source, _ = data
    out = tmp_path / "online"
    assert (
        sf(
            "train",
            "--source",
            str(source),
            "--online-vggt",
            "random:tiny",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--val-episodes",
            "0",
            *TINY,
        )
        == 0
    )
    logged = records(out, "train")
    assert [r["step"] for r in logged] == [2]
    assert 0.0 < logged[0]["align_loss"] < 2.0


def test_samples_decode_only_their_own_frames_and_pad_the_action_chunk(data, monkeypatch):
    source_path, store = data
    training = open_training_data(source_path, store, None, (GRID, GRID), chunk=8, text_len=16, val_episodes=1)
    dataset, source = training.train, training.train.source
    episode = dataset.episodes[1]
    full = source.read(episode.key)
    decoded = []
    original = type(source)._read_frames
    monkeypatch.setattr(
        type(source),
        "_read_frames",
        lambda self, episode, start, stop: decoded.append(stop - start) or original(self, episode, start, stop),
    )
    for step in (0, episode.length - 3, episode.length - 1):  # a full chunk, then chunks past the end
        sample = dataset[dataset.rows.starts[1] + step]
        padded = np.minimum(np.arange(step, step + 8), episode.length - 1)
        np.testing.assert_array_equal(sample["actions"].numpy(), full.actions[padded])
        np.testing.assert_array_equal(sample["frames"].numpy(), full.frames[step])
        np.testing.assert_array_equal(sample["proprio"].numpy(), full.proprio[step])
        assert sample["row"] == training.targets.cache.episode(episode.key).start + step
    assert decoded == [1, 1, 1]  # one step's frames per sample, none for the chunk


@pytest.mark.parametrize(
    "option, message",
    [
        (["--align-weight", "0", "--align-layer", "99"], "--align-layer must be in 1..4 for --model-size tiny"),
        (["--align-weight", "0", "--align-layer", "0"], "--align-layer must be in 1..4"),
        (["--align-weight", "0", "--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
        (["--align-weight", "0", "--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["--align-weight", "0", "--loader-workers", "-1"], "these must be >= 0: --loader-workers -1"),
        (["--align-weight", "0", "--val-episodes", "-1"], "--val-episodes -1"),
        (["--align-weight", "0", "--device", "tpu"], "--device 'tpu': expected auto | cpu | cuda | cuda:N"),
        (
            ["--align-weight", "-1", "--lr", "0", "--device", "gpu"],  # every problem, in one line
            "--align-weight must be >= 0, got -1.0; --lr must be a positive finite number, got 0.0; --device 'gpu'",
        ),
        (["--online-vggt", "random:tiny", "--cache-layer", "99"], "--cache-layer 99: this VGGT has layers 0..3"),
    ],
)
def test_bad_options_are_one_line_errors(data, tmp_path, capsys, option, message):
    source, _ = data
    status = sf("train", "--source", str(source), "--out", str(tmp_path / "run"), "--steps", "1", *TINY, *option)
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error
    assert message in error


def test_an_unusable_out_or_checkpoint_is_a_one_line_error(data, tmp_path, capsys):
    source, store = data
    args = ["train", "--source", str(source), "--cache", str(store), "--steps", "1", *TINY]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert sf(*args, "--out", str(a_file)) == 2
    assert f"--out {a_file}: is a file" in capsys.readouterr().err
    out = tmp_path / "run"
    out.mkdir()
    for damaged, expected in [(b"garbage", "not a readable sf train checkpoint"), (None, "missing step, model")]:
        if damaged is None:
            torch.save({"weights": 1}, out / CHECKPOINT)
        else:
            (out / CHECKPOINT).write_bytes(damaged)
        assert sf(*args, "--out", str(out)) == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error and expected in error and "--no-resume" in error
    assert sf(*args, "--out", str(out), "--no-resume", "--val-episodes", "0") == 0  # the way out it names works


def test_a_non_finite_loss_stops_with_the_step_and_metrics_stay_json(data, tmp_path, monkeypatch):
    import sfcache.train.loop as loop

    source, store = data
    real, calls = loop.compute_losses, []

    def turns_nan_at_step_3(model, sf_loss, batch, align_weight):
        losses = real(model, sf_loss, batch, align_weight)
        calls.append(1)
        if len(calls) == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(loop, "compute_losses", turns_nan_at_step_3)
    out = tmp_path / "run"
    config = replace(
        small_config(source, store, out),
        batch_size=4,
        save_every=1,
        val_every=100,
        val_episodes=0,
        val_samples=default_of(TrainConfig, "val_samples"),
    )
    with pytest.raises(loop.SfcacheError, match="step 3: the loss is not finite .*is kept as it was"):
        Trainer(config).run()
    logged = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]  # strict JSON, no NaN
    assert [r["step"] for r in logged] == [1, 2]
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == 2


def test_resuming_with_another_align_weight_names_that_setting(data, tmp_path, capsys):
    source, store = data
    out = tmp_path / "run"
    args = [
        "train",
        "--source",
        str(source),
        "--cache",
        str(store),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--val-episodes",
        "0",
        *TINY,
    ]
    assert sf(*args) == 0
    trained = capsys.readouterr().err  # off a terminal: plain progress lines, the last with the step's loss
    assert re.search(r"^train: 1/1 steps, .* ETA 0:00, loss \d", trained, re.MULTILINE), trained
    assert sf(*args) == 0
    assert f"{out} is already complete: 1 of 1 steps trained; nothing to do" in capsys.readouterr().out
    assert sf(*args[: -len(TINY)], "--steps", "2", "--align-weight", "0", *TINY) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == (
        f"error: the checkpoint in {out} was trained with --align-weight 0.5, you asked 0.0; use --no-resume (or "
        "another --out) to start over"
    ), error


def test_the_head_regresses_actions_in_training_bounds_and_old_checkpoints_load_as_raw(data, monkeypatch):
    """Actions are scaled per dimension to [-1, 1] by the training set's 1st-99th percentiles (OpenVLA-OFT), so a
    small dimension (LIBERO's rotation deltas) weighs as much in the loss as a large one; outputs stay raw.
    Those bounds and the proprio statistics come from one pass over the training episodes' vectors."""
    from sfcache.sources import Source, open_source
    from sfcache.train.model import Policy, PolicyConfig

    source_path, _ = data
    reads, read = [], Source.read

    def counted(self, key, start=0, stop=None, **kwargs):
        reads.append((key, start, stop, kwargs.get("frames", True)))
        return read(self, key, start, stop, **kwargs)

    monkeypatch.setattr(Source, "read", counted)
    training = open_training_data(source_path, None, None, (GRID, GRID), chunk=2, text_len=8, val_episodes=1)
    monkeypatch.setattr(Source, "read", read)
    whole = [(e.key, 0, e.length, False) for e in training.train.episodes]
    assert [r for r in reads if r[3] is False] == whole  # each training episode's vectors read once, no frames
    source = open_source(source_path)
    steps = [source.read(e.key, 0, e.length, frames=False) for e in training.train.episodes]
    actions, proprio = np.concatenate([s.actions for s in steps]), np.concatenate([s.proprio for s in steps])
    low, high = training.action_bounds
    np.testing.assert_allclose(low.numpy(), np.quantile(actions, 0.01, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(high.numpy(), np.quantile(actions, 0.99, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(training.proprio_mean.numpy(), proprio.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(training.proprio_std.numpy(), proprio.std(0, ddof=1).clip(min=1e-3), rtol=1e-5)

    config = PolicyConfig.sized("tiny", grid=(2, 2), action_dim=2, proprio_dim=3, chunk=1)
    bounds = (torch.tensor([-0.5, 0.0]), torch.tensor([1.5, 0.1]))
    model = Policy(config, action_bounds=bounds)
    torch.nn.init.zeros_(model.action_head.weight), torch.nn.init.zeros_(model.action_head.bias)
    images, text, proprio = (
        torch.rand(1, 2, 3, 28, 28),
        torch.ones(1, config.text_len, dtype=torch.long),
        torch.zeros(1, 3),
    )
    predicted, _ = model(images, text, proprio)
    assert predicted[0, 0].tolist() == pytest.approx([0.5, 0.05])  # the head's 0 is the middle of the bounds
    error = model.action_error(predicted, predicted + torch.tensor([0.1, 0.01]))
    assert error[0, 0].tolist() == pytest.approx([0.1, 0.2])  # a 0.01 miss in a 0.1-wide dimension counts double

    old = {k: v for k, v in model.state_dict().items() if k not in ("action_low", "action_high")}
    loaded = Policy(config, action_bounds=bounds)
    loaded.load_state_dict(old)
    assert loaded.action_low.tolist() == [-1, -1] and loaded.action_high.tolist() == [1, 1]


def test_a_train_config_problem_names_the_field_and_sf_train_prints_its_flag(data, tmp_path, capsys):
    source, _ = data
    with pytest.raises(SfcacheError) as raised:
        TrainConfig(source=source, out=tmp_path / "run", align_weight=0, steps=0, lr=-1)
    assert str(raised.value) == (
        "these must be >= 1: TrainConfig.steps 0; TrainConfig.lr must be a positive finite number, got -1"
    )
    assert Field("TrainConfig", "lr") in raised.value.message.fields
    assert sf("train", "--source", str(source), "--out", str(tmp_path / "run"), "--align-weight", "0",
              "--steps", "0", "--lr", "-1") == 2  # fmt: skip
    error = capsys.readouterr().err
    assert "these must be >= 1: --steps 0; --lr must be a positive finite number, got -1" in error
    assert "TrainConfig" not in error
    (warning,) = TrainConfig(source=source, out=tmp_path / "run", steps=1, align_weight=0).warnings()
    assert str(warning).startswith("TrainConfig.steps 1 is below TrainConfig.warmup_steps 100")
