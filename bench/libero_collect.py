"""`sf collect-libero`'s search-then-replay against recording live with the cameras on (same episode).

Baseline: the scripted episode with both cameras (RGB + depth) rendered at every control step, as a
recorder that keeps every frame would run it. Measured: the same episode with the cameras off, then only
its states rendered by `sfcache.libero_replay` (what collect-libero does for a successful episode). It
prints the times, their ratio, and how far the replayed frames are from the live ones (expected: equal).

    MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa python -m bench.libero_collect [--suite spatial --task 0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sfcache.libero_collect import search
from sfcache.libero_control import PickPlace
from sfcache.libero_eval import NOOP, WAIT_STEPS
from sfcache.libero_replay import (
    CAMERAS,
    forget_model,
    frames_of,
    load_model,
    model_xml,
    observe,
    observed_state,
    render_states,
    set_cameras,
    track_observed_state,
)
from sfcache.libero_sim import make_env, suite_tasks


def live(env, max_steps: int, from_xml: bool) -> tuple[dict, dict, np.ndarray, str, float]:
    """The controller's episode with cameras on: the live frames before each action with the observed states
    collect-libero records, the model XML
    and the seconds of the episode. `from_xml`: run it in the model loaded from its XML, as replays are."""
    set_cameras(env, True, depth=True)
    track_observed_state(env)  # before the reset, as collect-libero does: its clock runs with the cameras'
    env.reset()
    forget_model(env)
    xml, state = model_xml(env), env.env.sim.get_state().flatten()
    if from_xml:
        load_model(env, xml)
        env.env.sim.set_state_from_flattened(state)
    obs = observe(env)
    began = time.perf_counter()
    for _ in range(WAIT_STEPS):
        obs, _, _, _ = env.step(NOOP.tolist())
    controller, states = PickPlace(env), []
    rgb: dict[str, list] = {v: [] for v in CAMERAS}
    depth: dict[str, list] = {v: [] for v in CAMERAS}
    for _ in range(max_steps):
        states.append(observed_state(obs))
        images, metres = frames_of(env, obs, depth=True)
        for view in CAMERAS:
            rgb[view].append(images[view])
            depth[view].append(metres[view].astype(np.float16))
        obs, _, done, _ = env.step(controller(obs).tolist())
        if (done and controller.released) or controller.finished:
            break
    return (
        {v: np.stack(f) for v, f in rgb.items()},
        {v: np.stack(f) for v, f in depth.items()},
        np.stack(states),
        xml,
        time.perf_counter() - began,
    )


def compare(report: dict, label: str, frames, rgb: dict, depth: dict) -> None:
    for view in CAMERAS:
        report[f"{label}: {view} rgb pixels differing"] = float((frames.rgb[view] != rgb[view]).any(axis=-1).mean())
        report[f"{label}: {view} depth max abs diff m"] = float(
            np.abs(frames.depth[view].astype(np.float32) - depth[view].astype(np.float32)).max()
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", default="spatial")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    env = make_env(suite_tasks(args.suite)[args.task], args.resolution, depth=True)
    np.random.seed(0)
    rgb, depth, states, xml, live_s = live(env, 300, from_xml=True)
    began = time.perf_counter()
    frames = render_states(env, states, depth=True, xml=xml)  # the XML is still loaded: the frames alone
    replay_s = time.perf_counter() - began
    began = time.perf_counter()
    attempt = search(env, 300)  # another fresh placement, searched with the cameras off
    search_s = time.perf_counter() - began
    reloaded = render_states(env, states, depth=True, xml=xml)  # after a reset: the XML loaded again
    report = {
        "task": f"{args.suite} {args.task}",
        "resolution": args.resolution,
        "steps": len(states),
        "live_s_per_step": round(live_s / len(states), 4),
        "search_s_per_step": round(search_s / max(attempt.steps, 1), 4),
        "replay_s_per_frame": round(replay_s / len(states), 4),
        "speedup (live / (search + replay), per step)": round(
            (live_s / len(states)) / (search_s / max(attempt.steps, 1) + replay_s / len(states)), 2
        ),
    }
    compare(report, "live in the XML model vs replay", frames, rgb, depth)
    compare(report, "live in the XML model vs replay after reloading the XML", reloaded, rgb, depth)
    np.random.seed(1)
    rgb, depth, states, xml, _ = live(env, 300, from_xml=False)
    compare(report, "live in the built model vs replay", render_states(env, states, True, xml=xml), rgb, depth)
    print(json.dumps(report, indent=1))
    env.close()


if __name__ == "__main__":
    main()
