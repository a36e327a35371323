"""`sf probe` end to end on a small LIBERO HDF5 dataset with depth and a short-trained tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sfcache.cli.main import main
from sfcache.probe import MEAN_DEPTH, SourceRows
from sfcache.rows import RowIndex
from sfcache.sources import open_source
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.store import open_cache
from sfcache.train.augment import center_boxes, crop_images
from sfcache.train.libero_policy import CheckpointPolicy
from sfcache.train.model import encode_instructions
from sfcache.train.reproduce_report import SuiteResult, _probe_lines
from tests._cli_helpers import kill_9_then_resume, run_main

SMALL = ["--batch-size", "4", "--width", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe")
    data = write_libero_hdf5(root / "data", tasks=2, demos=3, steps=6, size=32, depth=True).path
    other = write_libero_hdf5(root / "other", suite="libero_object", tasks=1, demos=2, steps=5, size=32, depth=True)
    plain = write_libero_hdf5(root / "plain", tasks=1, demos=2, steps=4, size=32).path
    run = root / "run"
    train = ["train", "--source", data, "--align-weight", "0", "--out", run, "--steps", "2", "--batch-size", "2"]
    train += ["--val-episodes", "0", "--model-size", "tiny", "--grid", "4", "--loader-workers", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in train])
    assert exit_info.value.code == 0
    return {"data": data, "other": other.path, "plain": plain, "run": run}


def test_sf_probe_writes_the_report_metrics_and_pictures_from_the_policys_own_tokens(setup, tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", setup["run"], "--data", setup["data"], "--test-data", setup["other"], "--out", out]
    status, printed = run_main(main, capsys, *args, "--steps", "6", "--save-every", "3", "--every", "2", *SMALL)
    assert status == 0, printed
    assert "depth probe, test" in printed and "policy blocks 1,1,2,3" in printed and "mean depth image" in printed
    report = json.loads((out / "probe.json").read_text())
    assert report["about"]["layers"] == [1, 1, 2, 3]  # tiny: 4 blocks, SF at 3, the 3 before it from block 1
    assert report["about"]["sf_targets"] is None and report["about"]["warning"] is None  # trained without SF
    assert report["heads"] == {"policy": ["1", "1", "2", "3"], "patch_embedding": ["0", "0", "0", "0"]}
    assert report["data"]["rows"] == 18 and report["data"]["image_size"] == [56, 56]  # every 2nd of 6 x 6 steps
    assert report["split"]["test_rows"] == 3 and len(report["split"]["test_episodes"]) == 1  # 20% of 6 episodes
    for set_name, rows in (("test", 3), ("test_data", 6)):
        for name in ("policy", "patch_embedding", MEAN_DEPTH):
            for view in ("primary", "wrist"):
                metrics = report["results"][set_name][name][view]
                assert metrics["pixels"] == rows * 56 * 56  # every synthetic pixel is valid
                assert 0 < metrics["abs_rel"] < 50 and metrics["rmse_m"] > 0 and 0 <= metrics["delta1"] <= 1
    results, ratios = report["results"]["test_data"], report["comparison"]["test_data"]
    assert set(ratios) == {"policy"}  # the policy's layers against both controls
    assert ratios["policy"]["wrist"] == pytest.approx(
        {
            "abs_rel_over_mean_depth": results["policy"]["wrist"]["abs_rel"] / results[MEAN_DEPTH]["wrist"]["abs_rel"],
            "abs_rel_over_patch_embedding": results["policy"]["wrist"]["abs_rel"]
            / results["patch_embedding"]["wrist"]["abs_rel"],
        }
    )
    assert "test_data, wrist: the policy's AbsRel is" in printed
    mean = report["results"]["test"][MEAN_DEPTH]
    assert mean["primary"]["rmse_m"] > 10 * mean["wrist"]["rmse_m"]  # metres vs centimetres, reported apart
    for picture in ("test_primary.png", "test_wrist.png", "test_data_primary.png", "test_data_wrist.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["probe"], r["step"]) for r in logged if r["split"] == "train"] == [
        (name, step) for name in ("policy", "patch_embedding") for step in range(1, 7) if step % 10 == 0 or step == 6
    ]
    # the stored tokens are the frozen policy's hidden states of every 2nd frame as validation crops them
    tokens = open_cache(out / "tokens")
    assert tokens.layers == (0, 1, 2, 3) and tokens.views == ("primary", "wrist") and tokens.grid == (4, 4)
    source, policy = open_source(setup["data"]), CheckpointPolicy(setup["run"], device="cpu")
    info = source.episodes()[4]
    steps = source.read(info.key, 2, 5)
    steps.frames, steps.proprio = steps.frames[::2], steps.proprio[::2]  # stored steps 1 and 2
    images = crop_images(torch.from_numpy(steps.frames).permute(0, 1, 4, 2, 3).float() / 255, center_boxes(2), 56)
    with torch.no_grad():
        expected = policy.model.hidden_states(
            images, encode_instructions([info.instruction] * 2, 48), torch.from_numpy(steps.proprio), [0, 2]
        )
    for i, layer in enumerate((0, 2)):
        stored = tokens.read(info.key, slice(1, 3), layer=layer).reshape(2, 32, -1)
        np.testing.assert_allclose(stored, expected[:, i].numpy(), rtol=1e-2, atol=1e-2)


def test_a_view_without_a_valid_depth_pixel_is_reported_as_a_dash_not_a_traceback(setup, tmp_path, capsys):
    out = tmp_path / "probe"  # the scene camera is >= 0.78 m away, the wrist camera <= 0.15 m: only wrist counts
    args = ["probe", setup["run"], "--data", setup["data"], "--out", out, "--max-depth", "0.5", "--steps", "2"]
    status, printed = run_main(main, capsys, *args, *SMALL)
    assert status == 0 and "Traceback" not in printed, printed
    report = json.loads((out / "probe.json").read_text())
    test = report["results"]["test"]
    assert test["policy"]["primary"] == {"abs_rel": None, "rmse_m": None, "delta1": None, "pixels": 0}
    assert test["policy"]["wrist"]["pixels"] > 0
    words = " ".join(printed.split())  # rich wraps lines
    assert "test, primary: the policy's AbsRel is -x the patch embedding's and -x the mean depth image's" in words
    wrist = report["comparison"]["test"]["policy"]["wrist"]["abs_rel_over_patch_embedding"]
    assert f"test, wrist: the policy's AbsRel is {wrist:.2f}x" in words
    probe = {run: {"test": test} for run in ("sf", "baseline")}
    result = SuiteResult("", "libero_hdf5", {}, {}, None, "", [], probe=probe)
    row = next(line for line in _probe_lines({"goal": result}, False) if line.startswith("| goal | primary |"))
    assert row == "| goal | primary | - | - | - | - | - |"


def test_resuming_with_other_token_settings_names_the_way_out(setup, tmp_path, capsys):
    args = ["probe", setup["run"], "--data", setup["data"], "--out", tmp_path / "probe", "--steps", "1", *SMALL]
    assert run_main(main, capsys, *args)[0] == 0
    status, printed = run_main(main, capsys, *args, "--every", "2")
    assert status == 2 and "Traceback" not in printed
    assert "configuration differs" in printed and "use --no-resume to start over, or another --out" in printed
    assert run_main(main, capsys, *args, "--every", "2", "--no-resume")[0] == 0


def test_source_rows_read_the_depth_of_every_nth_step_cropped_as_asked(setup):
    source = open_source(setup["data"])
    cache_index = RowIndex.packed({info.key: -(-info.num_steps // 2) for info in source.episodes()})
    whole = SourceRows(source, cache_index, 32, every=2)  # the whole frame at its own size: the depth as stored
    info = source.episodes()[1]
    np.testing.assert_array_equal(whole.depth(np.array([4, 5])), source.read(info.key, 2, 5, depth=True).depth[::2])
    np.testing.assert_array_equal(whole.frames(np.array([5])), source.read(info.key, 4, 5).frames)
    quarter = SourceRows(source, cache_index, 16, box=(0.0, 0.5, 0.5, 1.0), every=2).depth(np.array([5]))
    np.testing.assert_array_equal(quarter, source.read(info.key, 4, 5, depth=True).depth[:, :, :16, 16:])


def test_a_dataset_without_depth_and_bad_layers_are_one_line_errors(setup, tmp_path, capsys):
    base = ["probe", setup["run"], "--out", tmp_path / "probe", "--steps", "1", *SMALL]
    status, printed = run_main(main, capsys, *base, "--data", setup["plain"])
    assert status == 2 and "Traceback" not in printed
    assert "has no obs/agentview_depth: record it with `sf collect-libero --depth` or `sf render-depth`" in printed
    status, printed = run_main(main, capsys, *base, "--data", setup["data"], "--layers", "1,2")
    assert status == 2 and "--layers needs 4 blocks (a DPT pyramid), got 1,2" in printed
    status, printed = run_main(main, capsys, *base, "--data", setup["data"], "--lr", "-1", "--max-depth", "0")
    assert status == 2 and "Traceback" not in printed  # the head's settings' own checks, in sf probe's flags
    assert "--lr must be a positive finite number, got -1.0; --max-depth must be > 0 metres, got 0.0" in printed
    status, printed = run_main(main, capsys, *base, "--data", setup["data"], "--layers", "1,2,3,9")
    assert status == 2 and "--layers 1,2,3,9: this policy has blocks 1..4 (0 = patch embedding)" in printed


def test_kill_9_then_resume_equals_an_uninterrupted_probe(setup, tmp_path):
    common = ["--data", setup["data"], "--steps", "40", "--save-every", "2", "--layers", "1,2,3,4", *SMALL]
    killed = tmp_path / "killed"
    killed_at = kill_9_then_resume(
        ["probe", setup["run"], "--out", tmp_path / "reference", *common],
        ["probe", setup["run"], "--out", killed, *common],
        killed / "heads" / "policy.pt",
    )
    assert 2 <= killed_at < 40
    a, b = (json.loads((folder / "probe.json").read_text()) for folder in (killed, tmp_path / "reference"))
    assert a["results"] == b["results"]
    for head in ("policy", "patch_embedding"):
        saved = [
            torch.load(folder / "heads" / f"{head}.pt", weights_only=False)
            for folder in (killed, tmp_path / "reference")
        ]
        assert saved[0]["step"] == saved[1]["step"] == 40
        for name, value in saved[1]["head"].items():
            assert torch.equal(saved[0]["head"][name], value), name
    assert (killed / "metrics.jsonl").read_text() == (tmp_path / "reference" / "metrics.jsonl").read_text()
