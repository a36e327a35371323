"""`make bench-closed-loop`: does a policy trained by `sf train` succeed in the simulator, with and without SF?

Stages, each a real `sf` command that resumes where it stopped (so the run can be done in pieces across
sessions; re-run the same command line):

1. collect  `sf collect-libero --depth --action-noise S`: N scripted demonstrations per task (fresh
            placements) at 128 px, with metric depth for the probe (noise-injected recoveries with S > 0)
2. extract  `sf extract --vggt random:tiny`: the SF arm's targets (random weights: this measures the
            pipeline, not what Spatial Forcing does with real VGGT features)
3. train    `sf train` twice: SF (`--align-weight 0.5`, the cache) and the baseline (`--align-weight 0`)
4. eval     `sf eval-libero` of each on the benchmark's init states (trials 0..T-1 per task)
5. probe    `sf probe` of each (SF's depth probe on held-out episodes of the same demonstrations), beside
            its two controls: the policy's patch embedding and the mean-depth image

OUT/timings.json accumulates each stage's wall time over all pieces; OUT/results.md is the table
(success rate with its 95% Wilson interval per task and arm, and the wall times), rewritten at the end of
every piece with whatever exists.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sfcache.libero_results import wilson_interval
from sfcache.libero_sim import SUITES
from sfcache.probe import MEAN_DEPTH
from sfcache.probe.metrics import figure
from sfcache.train.probe import PATCH_EMBEDDING, POLICY

ARMS = {"sf": ["--align-weight", "0.5"], "baseline": ["--align-weight", "0"]}


def sf(out: Path, stage: str, *args: str) -> None:
    """Run `sf ARGS`, adding its wall time to OUT/timings.json[stage]; stop the driver if it fails."""
    print(f"$ sf {shlex.join(args)}", flush=True)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sfcache.cli.main", *args])
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - began, 1)
    path.write_text(json.dumps(timings, indent=1))
    if done.returncode != 0:
        raise SystemExit(f"`sf {args[0]}` failed (exit {done.returncode}); fix it and run the same command again")


def eval_folder(out: Path, arm: str, args: argparse.Namespace) -> Path:
    """Each arm's evaluation, one folder per replanning setting (a folder refuses results of another)."""
    return out / (f"eval-{arm}" + (f"-replan{args.replan_steps}" if args.replan_steps else ""))


def table(out: Path, args: argparse.Namespace) -> str:
    """results.md: success per task and arm (95% Wilson interval), and the wall time of each stage."""
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    lines = [
        f"# closed loop: {SUITES[args.suite]} tasks {args.tasks}, {args.episodes} demos/task "
        f"(action noise {args.action_noise}), "
        f"{args.steps} train steps ({args.model_size}, grid {args.grid}), {args.trials} trials/task, "
        f"{'replanning every ' + str(args.replan_steps) if args.replan_steps else 'whole'} chunks",
        "",
        "| arm | task | successes / trials | success | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        results = eval_folder(out, arm, args) / "results.jsonl"
        records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        by_task: dict[int, list[bool]] = {}
        for record in records:
            by_task.setdefault(record["task_id"], []).append(bool(record["success"]))
        for task, outcomes in sorted(by_task.items()):
            low, high = wilson_interval(sum(outcomes), len(outcomes))
            lines.append(
                f"| {arm} | {task} | {sum(outcomes)} / {len(outcomes)} | {100 * sum(outcomes) / len(outcomes):.0f}% "
                f"| {100 * low:.0f}-{100 * high:.0f}% |"
            )
    lines += [
        "",
        "| arm | camera | AbsRel: policy layers | patch embedding | mean-depth image |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        report = out / f"probe-{arm}" / "probe.json"
        results = json.loads(report.read_text())["results"]["test"] if report.exists() else {}
        for view in results.get(POLICY, {}):
            figures = [results[name][view]["abs_rel"] for name in (POLICY, PATCH_EMBEDDING, MEAN_DEPTH)]
            lines.append(f"| {arm} | {view} | " + " | ".join(map(figure, figures)) + " |")
    lines += ["", "| stage | wall time (s, all pieces) |", "|---|---|"]
    lines += [f"| {stage} | {seconds} |" for stage, seconds in timings.items()]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench-closed-loop"))
    parser.add_argument("--suite", default="spatial")
    parser.add_argument("--tasks", default="0,2,5", help="tasks the controller solves (README's table)")
    parser.add_argument("--episodes", type=int, default=50, help="demonstrations per task")
    parser.add_argument(
        "--action-noise", type=float, default=0.0, help="collect-libero --action-noise (README: 0.3 hurt task 5)"
    )
    parser.add_argument("--trials", type=int, default=20, help="evaluation episodes per task (protocol: 50)")
    parser.add_argument("--steps", type=int, default=28000, help="training steps per arm")
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--replan-steps", type=int, default=None, help="eval-libero --replan-steps (default: none)")
    parser.add_argument("--grid", type=int, default=8, help="visual tokens per side (8 -> 112 px: CPU-sized)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--probe-steps", type=int, default=2000, help="training steps of each probe head")
    parser.add_argument("--probe-every", type=int, default=4, help="probe every N-th step of each episode")
    parser.add_argument("--stages", default="collect,extract,train,eval,probe", help="the stages to run now")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, cache, stages = out / "data", out / "cache", args.stages.split(",")
    if "collect" in stages:
        sf(out, "collect", "collect-libero", "--suite", args.suite, "--tasks", args.tasks, "--episodes",
           str(args.episodes), "--resolution", "128", "--depth", "--action-noise", str(args.action_noise), "--out",
           str(data))  # fmt: skip
    if "extract" in stages:
        sf(out, "extract", "extract", str(data), "--out", str(cache), "--vggt", "random:tiny", "--grid",
           f"{args.grid}x{args.grid}", "--device", args.device)  # fmt: skip
    for arm, weight in ARMS.items():
        if "train" in stages:
            sf(out, f"train-{arm}", "train", "--source", str(data), "--out", str(out / f"train-{arm}"),
               *(["--cache", str(cache)] if arm == "sf" else []), *weight, "--steps", str(args.steps),
               "--model-size", args.model_size, "--grid", str(args.grid), "--device", args.device, "--warmup-steps",
               "200", "--val-episodes", "3", "--val-every", "2000", "--save-every", "500")  # fmt: skip
    for arm in ARMS:
        if "eval" in stages:
            sf(out, f"eval-{arm}", "eval-libero", str(out / f"train-{arm}"), "--suite", args.suite, "--tasks",
               args.tasks, "--trials-per-task", str(args.trials), "--video", "1", "--out",
               str(eval_folder(out, arm, args)), "--device", args.device,
               *(["--replan-steps", str(args.replan_steps)] if args.replan_steps else []))  # fmt: skip
    for arm in ARMS:
        if "probe" in stages:
            sf(out, f"probe-{arm}", "probe", str(out / f"train-{arm}"), "--data", str(data / SUITES[args.suite]),
               "--steps", str(args.probe_steps), "--every", str(args.probe_every), "--device", args.device,
               "--out", str(out / f"probe-{arm}"))  # fmt: skip
    print(table(out, args))


if __name__ == "__main__":
    main()
