"""`make reproduce-libero` end to end on tiny LIBERO folders (RLDS and HDF5 layouts), resume, and fail-fast checks.

Extraction runs on an in-process Dask cluster (given as --scheduler, like a user's cluster) with random:tiny
VGGT; the policy is the tiny one at a 4x4 grid for 4 steps, so a whole suite takes seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import zarr
from distributed import LocalCluster
from PIL import Image

from sfcache.cli.main import main
from sfcache.libero_results import EvalSummary, wilson_interval
from sfcache.sources import open_source
from sfcache.sources.synthetic import write_libero_hdf5, write_libero_rlds
from sfcache.store import open_cache
from sfcache.train.loop import CHECKPOINT, METRICS, Trainer
from sfcache.train.reproduce_config import SUITES, ReproduceConfig, find_suites
from sfcache.train.reproduce_report import RUNS, plot_success, plot_suite
from sfcache.vggt import random_weights_warning
from tests._cli_helpers import run_main

TINY = [
    "--vggt",
    "random:tiny",
    "--device",
    "cpu",
    "--steps",
    "4",
    "--model-size",
    "tiny",
    "--batch-size",
    "4",
    "--grid",
    "4",
    "--val-episodes",
    "1",
    "--val-every",
    "2",
    "--loader-workers",
    "0",
    "--steps-per-shard",
    "4",
    "--extract-batch-size",
    "4",
]


@pytest.fixture(scope="module")
def scheduler():
    with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster:
        yield cluster.scheduler_address


def run(capsys, *args) -> tuple[int, str]:
    return run_main(main, capsys, "reproduce-libero", *args)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def checkpoint_step(run_dir: Path) -> int:
    import torch

    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["step"]


def assert_report_matches_outputs(out: Path, suite: str, source_path: Path) -> dict:
    """Every number the report gives for `suite` equals what the store, the source and the metrics files hold."""
    report = json.loads((out / "report.json").read_text())
    entry = report["suites"][suite]
    cache = open_cache(out / suite / "cache")
    source = open_source(source_path)
    assert entry["cache"]["steps"] == cache.num_steps == sum(e.num_steps for e in source.episodes())
    assert entry["cache"]["episodes"] == len(cache.episodes) == len(source.episodes())
    assert cache.done_shards().all()
    on_disk = sum(f.stat().st_size for f in cache.path.rglob("*") if f.is_file())
    assert entry["cache"]["bytes_on_disk"] == on_disk
    assert entry["cache"]["bytes_per_step"] == pytest.approx(on_disk / cache.num_steps)
    runs = entry["cache"]["extract_runs"]
    assert entry["cache"]["extract_steps_per_s"] == pytest.approx(
        sum(r["extracted_steps"] for r in runs) / sum(r["extract_s"] for r in runs), rel=1e-3
    )
    for name, alpha in (("sf", 0.5), ("baseline", 0.0)):
        records = metrics(out / suite / name)
        val = [r for r in records if r["split"] == "val"]
        assert entry["runs"][name]["align_weight"] == alpha
        assert entry["runs"][name]["val_action_l1"] == val[-1]["val_action_l1"] and val[-1]["step"] == 4
        assert [r["step"] for r in entry["runs"][name]["val"]] == [2, 4]
        assert checkpoint_step(out / suite / name) == 4
        assert any("align_loss" in r for r in records) == (alpha > 0)
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {suite} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == str(cache.num_steps) and cells[4] == str(on_disk)
    assert float(cells[7]) == pytest.approx(entry["runs"]["sf"]["val_action_l1"], abs=1e-4)
    assert float(cells[8]) == pytest.approx(entry["runs"]["baseline"]["val_action_l1"], abs=1e-4)
    assert (out / "plots" / f"{suite}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "NOT a reproduction" in md and report["is_reproduction"] is False
    return report


@pytest.fixture(scope="module")
def rlds_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("libero_rlds")
    write_libero_rlds(root, suite="libero_spatial", episodes=3, steps=6, size=64)
    return root


def test_rlds_interrupted_then_resumed_then_skipped(tmp_path, rlds_root, scheduler, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["--libero-dir", rlds_root, "--scheduler", scheduler, "--out", out, *TINY, "--eval-trials", "0"]

    save = Trainer.save

    def save_then_interrupt(self):
        save(self)
        if self.config.align_weight == 0 and self.step == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", save_then_interrupt)
        code, output = run(capsys, *args)
    assert code == 130 and "run the same command again" in output
    assert not (out / "report.md").exists()
    assert checkpoint_step(out / "libero_spatial" / "sf") == 4
    assert checkpoint_step(out / "libero_spatial" / "baseline") == 2

    # an extractor killed before marking its last shard: the shard is redone, the rest kept
    zarr.open_array(str(out / "libero_spatial" / "cache" / "done"), mode="r+")[-1] = 0
    sf_checkpoint = (out / "libero_spatial" / "sf" / CHECKPOINT).stat().st_mtime_ns
    code, output = run(capsys, *args)
    assert code == 0, output
    assert "extract: 2 steps" in output and "16 were already done" in output
    assert "with SF: " in output and "finished 4 steps, skipped" in output
    assert "without SF (alpha 0.0): 4 steps (resumed from step 2)" in output
    assert (out / "libero_spatial" / "sf" / CHECKPOINT).stat().st_mtime_ns == sf_checkpoint
    assert [r["step"] for r in metrics(out / "libero_spatial" / "baseline") if r["split"] == "val"] == [2, 4]
    report = assert_report_matches_outputs(out, "libero_spatial", rlds_root / "libero_spatial_no_noops")
    assert list(report["suites"]) == ["libero_spatial"]
    assert report["suites_missing"] == ["libero_object", "libero_goal", "libero_10"]
    assert report["suites"]["libero_spatial"]["format"] == "libero_rlds"
    assert [r["extracted_steps"] for r in report["suites"]["libero_spatial"]["cache"]["extract_runs"]] == [18, 2]
    assert "RANDOM VGGT WEIGHTS" in output and "simulator evaluation off (--eval-trials 0): evaluated offline" in output
    assert report["suites"]["libero_spatial"]["evaluation"] is None
    printed = [line for line in output.rstrip().splitlines() if not line.startswith("train: ")]  # stderr's last
    assert printed[-3] == f"report: {out / 'report.md'}"

    # finished: nothing is extracted or trained again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "plots" not in p.parts}
    monkeypatch.setattr("sfcache.train.reproduce.extract", lambda *a, **k: pytest.fail("extracted again"))
    monkeypatch.setattr("sfcache.train.reproduce.train_keeping_snapshots", lambda *a, **k: pytest.fail("trained again"))
    code, output = run(capsys, *args)
    assert code == 0, output
    assert output.count("skipped") == 3
    changed = [p for p, t in before.items() if p.stat().st_mtime_ns != t and p.name not in ("report.md", "report.json")]
    assert changed == []
    assert json.loads((out / "report.json").read_text())["suites"] == report["suites"]


def test_hdf5_layout_end_to_end_with_simulator_evaluation(tmp_path, scheduler, capsys, monkeypatch):
    """The simulator stage is wired to every run and checkpoint; its loop is tested in test_libero_eval.py,
    so here `evaluate` reports a success rate that grows with the checkpoint's step."""
    calls = []

    def fake_evaluate(policy, config, policy_info):
        calls.append(
            (
                policy.path.parent.name if policy.path.name == CHECKPOINT else policy.path.parent.parent.name,
                policy.step,
                config.suite,
                config.trials_per_task,
                config.max_steps,
                policy_info["step"],
            )
        )
        episodes = 10 * config.trials_per_task
        successes = episodes * policy.step // 4
        rate = {
            "episodes": episodes,
            "successes": successes,
            "success_rate": successes / episodes,
            "ci95": list(wilson_interval(successes, episodes)),
            "mean_steps": 5.0,
            "seconds_per_episode": 1.0,
            "sim_steps_per_s": 15.0,
        }
        return EvalSummary(
            suite="libero_goal", config={}, policy=policy_info, protocol="shortened", tasks=[], videos=[], **rate
        )

    monkeypatch.setattr("sfcache.train.reproduce.simulator_available", lambda: None)
    monkeypatch.setattr("sfcache.train.reproduce.evaluate", fake_evaluate)
    root = tmp_path / "libero"
    written = write_libero_hdf5(root, suite="libero_goal", tasks=1, demos=3, steps=6, size=64, depth=True)
    out = tmp_path / "out"
    code, output = run(
        capsys,
        "--libero-dir",
        root,
        "--probe-dir",  # the same files carry depth: both policies are probed side by side
        root,
        "--probe-steps",
        "2",
        "--scheduler",
        scheduler,
        "--out",
        out,
        *TINY,
        "--eval-trials",
        "2",
        "--eval-checkpoints",
        "2",
        "--eval-max-steps",
        "5",
    )
    assert code == 0, output
    report = assert_report_matches_outputs(out, "libero_goal", written.path)
    assert report["suites"]["libero_goal"]["format"] == "libero_hdf5"
    assert report["suites_missing"] == ["libero_spatial", "libero_object", "libero_10"]
    # snapshot at step 2 and the final checkpoint (step 4) of each run, on the suite's own tasks
    assert calls == [(run, step, "goal", 2, 5, step) for run in ("sf", "baseline") for step in (2, 4)]
    evaluation = report["suites"]["libero_goal"]["evaluation"]
    assert [p["step"] for p in evaluation["sf"]] == [2, 4] and evaluation["baseline"][-1]["success_rate"] == 1.0
    assert evaluation["sf"][0]["success_rate"] == 0.5 and evaluation["sf"][0]["episodes"] == 20
    assert "closed-loop success in the LIBERO simulator" in report["evaluation"]
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| libero_goal |"))
    assert [c.strip() for c in row.strip("|").split("|")][-2:] == ["100.0% (84-100)", "100.0% (84-100)"]
    assert (out / "plots" / "libero_goal_success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "libero_goal_success.png" in (out / "report.md").read_text()
    probe = report["suites"]["libero_goal"]["probe"]
    for run_name in ("sf", "baseline"):
        probed = json.loads(Path(probe[run_name]["report"]).read_text())
        checkpoint = out / "libero_goal" / run_name / CHECKPOINT
        assert probed["about"]["checkpoint"]["checkpoint"] == str(checkpoint.resolve())
        assert probe[run_name]["test"] == probed["results"]["test"] and probed["settings"]["steps"] == 2
    assert probed["about"]["sf_targets"] is None  # the baseline; the SF run's targets are random:tiny's
    assert json.loads(Path(probe["sf"]["report"]).read_text())["about"]["warning"].startswith("RANDOM WEIGHTS")
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| libero_goal | wrist |"))
    cells = [float(c) for c in row.strip("|").split("|")[2:]]
    assert cells[0] == pytest.approx(probe["sf"]["test"]["policy"]["wrist"]["abs_rel"], abs=5e-4)
    assert cells[1] == pytest.approx(probe["baseline"]["test"]["policy"]["wrist"]["abs_rel"], abs=5e-4)
    assert "RANDOM VGGT weights: its tokens carry no geometry" in md


def test_find_suites_prefers_rlds_no_noops_and_reports_missing(tmp_path):
    write_libero_hdf5(tmp_path, suite="libero_object", tasks=1, demos=1, steps=2, size=16, no_noops=True)
    write_libero_hdf5(tmp_path, suite="libero_goal", tasks=1, demos=1, steps=2, size=16)
    write_libero_rlds(tmp_path, suite="libero_goal", episodes=1, steps=2, size=16, shards=1)
    (tmp_path / "libero_10").mkdir()  # an empty folder is not a suite
    found, missing = find_suites(tmp_path, SUITES)
    assert [(s.name, s.path.name, s.format) for s in found] == [
        ("libero_object", "libero_object_no_noops", "libero_hdf5"),
        ("libero_goal", "libero_goal_no_noops", "libero_rlds"),
    ]
    assert missing == ["libero_spatial", "libero_10"]


# (LIBERO_DIR, VGGT, more args, what the message must say); {data} is a valid LIBERO folder, {tmp} a scratch one
FAILS = {
    "no LIBERO_DIR": (
        "",
        "random:tiny",
        [],
        [
            "--libero-dir is not given (LIBERO_DIR= with make)",
            "openvla/modified_libero_rlds",
            "download_libero_datasets.py",
        ],
    ),
    "missing LIBERO_DIR": (
        "{tmp}/nowhere",
        "random:tiny",
        [],
        ["--libero-dir {tmp}/nowhere: no such directory", "openvla/modified_libero_rlds"],
    ),
    "LIBERO_DIR without suites": (
        "{tmp}",
        "random:tiny",
        [],
        ["holds none of the LIBERO suites", "libero_spatial_no_noops/ or libero_spatial/"],
    ),
    "suite folder as LIBERO_DIR": (
        "{tmp}/libero_spatial_no_noops",
        "random:tiny",
        [],
        ["looks like one suite folder: pass its parent"],
    ),
    "require all": (
        "{data}",
        "random:tiny",
        ["--require-all"],
        ["found libero_spatial but not libero_object, libero_goal, libero_10 (--require-all)"],
    ),
    "no VGGT": ("{data}", "", [], ["--vggt is not given (VGGT= with make)", "facebook/VGGT-1B (CC BY-NC 4.0)"]),
    "missing VGGT file": (
        "{data}",
        "{tmp}/model.pt",
        [],
        ["--vggt {tmp}/model.pt: no such file or directory, and not a hub id", "facebook/VGGT-1B"],
    ),
    "hub id not cached": (
        "{data}",
        "nobody-here/not-a-cached-vggt",
        [],
        ["not in the local Hugging Face cache, and this command downloads nothing"],
    ),
    "unknown random preset": ("{data}", "random:huge", [], ["unknown preset 'huge'"]),
    "bad VGGT file": ("{data}", "{tmp}/bad.pt", [], ["not a PyTorch checkpoint", "facebook/VGGT-1B"]),
    "probe suite missing": (
        "{data}",
        "random:tiny",
        ["--probe-dir", "{tmp}"],
        ["--probe-dir {tmp}: no LIBERO HDF5 libero_spatial/ (with depth) to probe"],
    ),
    "probe suite without depth": (
        "{data}",
        "random:tiny",
        ["--probe-dir", "{tmp}/plain"],
        ["has no obs/agentview_depth: record it with `sf collect-libero --depth` or `sf render-depth`"],
    ),
    "bad scheduler address": (
        "{data}",
        "random:tiny",
        ["--scheduler", "nowhere"],
        ["--scheduler nowhere: cannot reach the Dask scheduler (missing port number"],
    ),
}


@pytest.mark.parametrize("case", FAILS)
def test_fails_fast_before_any_work(tmp_path, rlds_root, capsys, monkeypatch, case):
    monkeypatch.setattr("sfcache.train.reproduce.extract", lambda *a, **k: pytest.fail("extraction started"))
    monkeypatch.setattr(
        "sfcache.train.reproduce.train_keeping_snapshots", lambda *a, **k: pytest.fail("training started")
    )
    scratch = tmp_path / "scratch"
    (scratch / "libero_spatial_no_noops").mkdir(parents=True)  # empty: not a suite
    (scratch / "bad.pt").write_bytes(b"not a checkpoint")
    write_libero_hdf5(scratch / "plain", tasks=1, demos=1, steps=2, size=16)  # a suite without depth
    data, vggt, extra, expected = FAILS[case]
    data, vggt, *extra = (text.format(data=rlds_root, tmp=scratch) for text in (data, vggt, *extra))
    out = tmp_path / "out"
    code, output = run(capsys, "--libero-dir", data, "--vggt", vggt, "--device", "cpu", "--out", out, *extra)
    assert code == 2, output
    assert "error: nothing was run" in output and "Traceback" not in output
    for text in expected:
        assert text.format(tmp=scratch) in output
    assert not out.exists()


def test_bad_options_name_each_problem(tmp_path, rlds_root, capsys):
    code, output = run(
        capsys,
        "--libero-dir",
        rlds_root,
        "--vggt",
        "random:tiny",
        "--device",
        "tpu",
        "--suites",
        "spatial,90",
        "--steps",
        "0",
        "--out",
        tmp_path / "out",
    )
    assert code == 2
    assert "--suites spatial,90: choose from spatial,object,goal,10" in output
    assert "these must be >= 1: --steps 0" in output and "--device tpu: expected auto | cpu | cuda | cuda:N" in output
    assert not (tmp_path / "out").exists()


def test_option_data_and_weights_problems_are_listed_in_one_message(tmp_path, capsys):
    """What `make reproduce-libero` with nothing set passes: empty --libero-dir and --vggt, listed with the rest."""
    code, output = run(
        capsys, "--libero-dir", "", "--vggt", "", "--steps", "0", "--device", "cpu", "--out", tmp_path / "o"
    )
    assert code == 2 and "Traceback" not in output and not (tmp_path / "o").exists()
    assert output.startswith("error: nothing was run:"), output
    for problem in ("these must be >= 1: --steps 0", "--libero-dir is not given", "--vggt is not given"):
        assert problem in output, output
    assert "- LIBERO_DIR" not in output and "- VGGT" not in output  # each problem starts with the flag


def test_without_arguments_it_names_the_required_options(capsys):
    code, output = run(capsys)
    assert code == 2 and "Missing option '--libero-dir'" in output and "Traceback" not in output
    code, output = run(capsys, "--libero-dir", "x")
    assert code == 2 and "Missing option '--vggt'" in output


@pytest.mark.parametrize(
    "option, message",
    [
        (["--val-every", "0"], "these must be >= 1: --val-every 0\n"),  # validation and checkpoint interval
        (["--loader-workers", "-1"], "these must be >= 0: --loader-workers -1"),
        (["--extract-batch-size", "0"], "--extract-batch-size must be >= 1, got 0"),
        (["--eval-max-steps", "0"], "--eval-max-steps must be >= 1, got 0"),
        (["--probe-steps", "0"], "--probe-steps must be >= 1, got 0"),  # sf probe's own checks
        (["--probe-every", "0"], "--probe-every must be >= 1, got 0"),
        (["--dtype", "float8"], "--dtype must be one of float16, bfloat16, int8, not 'float8'"),
    ],
)
def test_options_handed_to_a_stage_are_checked_by_its_config_and_named_as_given(
    option, message, tmp_path, rlds_root, capsys
):
    code, output = run(
        capsys,
        "--libero-dir",
        rlds_root,
        "--vggt",
        "random:tiny",
        "--device",
        "cpu",
        "--out",
        tmp_path / "out",
        *option,
    )
    assert code == 2 and message in output, output


def test_grid_is_spelled_as_extract_spells_it(tmp_path, rlds_root, capsys, monkeypatch):
    from sfcache.train.reproduce import ReproduceConfig

    seen = {}
    monkeypatch.setattr("sfcache.cli.reproduce.reproduce", lambda config: seen.setdefault("grid", config.grid))
    for given in ("4x4", "4"):
        seen.clear()
        code, output = run(capsys, "--libero-dir", rlds_root, "--vggt", "random:tiny", "--grid", given)
        assert code == 0 and seen == {"grid": 4}, output
    code, output = run(capsys, "--libero-dir", rlds_root, "--vggt", "random:tiny", "--grid", "4x8")
    assert code == 2 and "--grid 4x8: expected N or NxN (a square grid, e.g. 16 or 16x16)" in output
    assert ReproduceConfig().grid == 16


def _red_pixels(png: Path) -> int:
    """Pure-red pixels in the top tenth of a picture: where the random-weights warning is drawn."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    top = rgb[: rgb.shape[0] // 10]
    return int(((top[..., 0] > 200) & (top[..., 1] < 80) & (top[..., 2] < 80)).sum())


def test_plots_mark_single_points_label_both_axes_and_carry_the_random_weights_warning(tmp_path):
    one = {run: {"train": [{"step": 2, "action_l1": 0.5}], "val": [{"step": 2, "val_action_l1": 0.4}]} for run in RUNS}
    warning = random_weights_warning("random:tiny+seed0")
    figures = []
    real = plt.Figure.savefig

    def kept(fig, *args, **kwargs):
        figures.append(fig)
        return real(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", kept)
        plot_suite("libero_goal", one, tmp_path / "warned.png", warning)
        plot_suite("libero_goal", one, tmp_path / "real.png", None)
    warned, real_weights = figures
    assert warned.texts[0].get_text().replace("\n", " ") == warning and not real_weights.texts
    assert _red_pixels(tmp_path / "warned.png") > 200 and _red_pixels(tmp_path / "real.png") == 0
    for ax in warned.axes:
        assert ax.get_ylabel().startswith("action L1")
        assert all(line.get_marker() == "o" for line in ax.get_lines())  # one point each: drawn as a marker
    evaluation = {run: [{"step": s, "success_rate": 0.5, "ci95": [0.2, 0.8]} for s in (1, 2)] for run in RUNS}
    plot_success("libero_goal", evaluation, tmp_path / "success.png", warning)
    assert _red_pixels(tmp_path / "success.png") > 200


def test_train_and_eval_config_problems_name_reproduce_fields_and_print_its_flags(tmp_path, capsys):
    """TrainConfig's and EvalConfig's checks, renamed to the reproduce options that set them: the library names
    ReproduceConfig's fields (--val-every feeds two TrainConfig fields and is named once), the command its flags."""
    config = ReproduceConfig(val_every=0, steps=0, eval_max_steps=0, out=tmp_path / "o")
    assert [str(problem) for problem in config.problems()] == [
        "these must be >= 1: ReproduceConfig.steps 0, ReproduceConfig.val_every 0",
        "ReproduceConfig.eval_max_steps must be >= 1, got 0",
    ]
    code, output = run(
        capsys, "--libero-dir", tmp_path, "--vggt", "random:tiny", "--device", "cpu", "--out", tmp_path / "o",
        "--val-every", "0", "--steps", "0", "--eval-max-steps", "0",
    )  # fmt: skip
    assert code == 2 and "these must be >= 1: --steps 0, --val-every 0\n" in output, output
    assert "--eval-max-steps must be >= 1, got 0" in output and "Config" not in output
