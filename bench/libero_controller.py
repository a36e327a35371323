"""How often the scripted controller of `sf collect-libero` solves each LIBERO task (no rendering).

Runs `sfcache.libero_collect.search` (the collector's own attempt, cameras off) N times per task from
fresh placements seeded as the collector seeds them, and prints a markdown table: successes / attempts,
mean steps of the successes, seconds per attempt, and why attempts failed.

    MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa python -m bench.libero_controller --attempts 10 \
        --suites spatial,object,goal,10 --out bench-out/libero_controller.md
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from sfcache.libero_collect import CollectConfig, _seed, search
from sfcache.libero_control import UnsupportedTask, goal_of
from sfcache.libero_sim import SUITES, make_env, suite_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default="spatial,object,goal,10")
    parser.add_argument("--attempts", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = ["| suite | task | instruction | solved | steps | s/attempt | failures |", "|---|---|---|---|---|---|---|"]
    for suite in args.suites.split(","):
        config = CollectConfig(suite=suite, out=Path("unused"))
        for task in suite_tasks(suite):
            env = make_env(task, 128)
            try:
                goal_of(env)
            except UnsupportedTask as error:
                lines.append(f"| {SUITES[suite]} | {task.index} | {task.instruction} | no script | - | - | {error} |")
                env.close()
                print(lines[-1], flush=True)
                continue
            results = []
            for attempt in range(args.attempts):
                _seed(config, task, attempt)
                results.append(search(env, args.max_steps))
            env.close()
            wins = [r for r in results if r.success]
            failures = Counter(r.reason for r in results if not r.success)
            lines.append(
                f"| {SUITES[suite]} | {task.index} | {task.instruction} | {len(wins)}/{len(results)} "
                f"| {np.mean([r.steps for r in wins]) if wins else 0:.0f} "
                f"| {np.mean([r.seconds for r in results]):.1f} "
                f"| {'; '.join(f'{n}x {why}' for why, n in failures.most_common()) or '-'} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
