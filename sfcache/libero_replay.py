"""Render LIBERO camera frames (RGB and metric depth) of recorded simulator states: the one replay code.

A LIBERO demonstration's `states` (flattened MuJoCo state) do not fix the scene by themselves: fixtures
such as the wooden cabinet and the stove are placed into the model at each reset and are not in the state. So
the episode's `model_file` XML is loaded first (`reset_from_xml_string`, ~5 s, skipped when the env runs
that model and has not been reset since), then each state is set and both cameras are rendered. The XML
stores numbers rounded, so a model loaded from it renders up to ~5% of RGB pixels slightly differently
from the model it was written from; a recorder therefore renders its frames here too, from the XML it
stores, and every replay of that XML, in this env or a fresh one, renders the same frames bit for bit.

robosuite takes a control step's observation (cameras and proprio alike) during one physics substep (the
last one, here), from kinematics MuJoCo computed before integrating that substep: what a policy sees is a
state 2 ms before the step's end. `track_observed_state` records that state in each observation
(`observed_state`), so rendering it gives exactly the frame the live observation had.

`sf collect-libero` searches with cameras off and renders the successful episodes here; `sf render-depth`
replays existing datasets here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sfcache.errors import SfcacheError

# dataset view name -> the env's RGB and depth observables
CAMERAS = {
    "agentview": ("agentview_image", "agentview_depth"),
    "eye_in_hand": ("robot0_eye_in_hand_image", "robot0_eye_in_hand_depth"),
}
RGB_KEY, DEPTH_KEY = "obs/{}_rgb", "obs/{}_depth"
DEPTH_DTYPE = np.float16
OBSERVED_STATE = "sfcache_observed_state"


@dataclass
class Frames:
    """Rendered frames per dataset view: rgb uint8 [T, H, W, 3] and (when asked) depth float16 [T, H, W] metres."""

    rgb: dict[str, np.ndarray]
    depth: dict[str, np.ndarray]


def set_cameras(env, on: bool, depth: bool = True) -> None:
    """Switch the camera observables on or off (off: a control step costs ~18 ms instead of ~0.3 s)."""
    for rgb_name, depth_name in CAMERAS.values():
        for name, wanted in ((rgb_name, on), (depth_name, on and depth)):
            if name in env.env._observables:
                env.env.modify_observable(name, "enabled", wanted)
                env.env.modify_observable(name, "active", wanted)


def metric_depth(sim, normalised: np.ndarray) -> np.ndarray:
    """MuJoCo's [0, 1] depth buffer (H, W, 1) -> metres (H, W) float32, robosuite's `get_real_depth_map`."""
    extent = sim.model.stat.extent
    far, near = sim.model.vis.map.zfar * extent, sim.model.vis.map.znear * extent
    return (near / (1.0 - normalised[..., 0].astype(np.float64) * (1.0 - near / far))).astype(np.float32)


def model_xml(env) -> str:
    """The env's current model as XML, what a dataset stores in each demo's `model_file`."""
    return env.env.sim.model.get_xml()


def _keep_state_before_substeps(sim) -> None:
    """Wrap `sim.step` so that `sim._sfcache_before` is the state before the latest physics substep."""
    if getattr(sim, "_sfcache_step", None) is not None:
        return
    step = sim.step

    def tracked(*args, **kwargs):
        sim._sfcache_before = sim.get_state().flatten()
        return step(*args, **kwargs)

    sim._sfcache_step, sim.step = step, tracked
    sim._sfcache_before = sim.get_state().flatten()


def track_observed_state(env) -> None:
    """Add the `OBSERVED_STATE` observation: the state whose kinematics the other observations of the same
    substep read (the state before that substep; robosuite resets all observables' clocks together). A sim
    rebuilt later (a model loaded from XML) is wrapped when first observed."""
    domain = env.env
    _keep_state_before_substeps(domain.sim)
    if OBSERVED_STATE in domain._observables:
        return
    from robosuite.utils.observables import Observable, sensor

    @sensor(modality="sfcache")
    def observed(obs_cache):
        _keep_state_before_substeps(domain.sim)
        return np.array(domain.sim._sfcache_before)

    domain.add_observable(Observable(OBSERVED_STATE, observed, sampling_rate=domain.control_freq))


def observed_state(obs: dict) -> np.ndarray:
    """The state an observation shows (`track_observed_state` must have been called before the step)."""
    return obs[OBSERVED_STATE]


def forget_model(env) -> None:
    """The env's model changed (a reset re-draws the fixtures into it): the next `load_model` must load."""
    env._sfcache_xml = None


def load_model(env, xml: str) -> None:
    """Rebuild the env from a demo's `model_file` XML (mesh paths rewritten for this machine by LIBERO)."""
    from libero.libero.utils.utils import postprocess_model_xml

    if getattr(env, "_sfcache_xml", None) == xml:  # still the loaded model: no reset since (`forget_model`)
        return
    try:
        env.env.reset_from_xml_string(postprocess_model_xml(xml, {}))
    except Exception as error:  # MuJoCo's XML errors have their own types
        raise SfcacheError(f"the simulator could not load the stored model_file XML ({error})") from None
    env._sfcache_xml = xml


def observe(env) -> dict:
    """The env's observations of the state it is in now (cameras rendered when switched on)."""
    env.env.sim.forward()
    return env.env._get_observations(force_update=True)


def frames_of(env, obs: dict, depth: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(rgb, depth) per dataset view of one observation dict, upside down as rendered."""
    rgb = {view: np.asarray(obs[names[0]]) for view, names in CAMERAS.items()}
    metres = {view: metric_depth(env.env.sim, obs[names[1]]) for view, names in CAMERAS.items()} if depth else {}
    return rgb, metres


def render_states(
    env,
    states: np.ndarray,
    depth: bool,
    xml: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> Frames:
    """Frames of each state [T, S] (after loading `xml` when given); `advance(1)` after each frame."""
    if xml is not None:
        load_model(env, xml)
    set_cameras(env, True, depth)
    sim = env.env.sim
    size = sim.get_state().flatten().shape[0]
    if states.ndim != 2 or states.shape[1] != size:
        raise SfcacheError(f"states of shape {states.shape}: this model's flattened state has {size} numbers")
    rgb: dict[str, list] = {view: [] for view in CAMERAS}
    metres: dict[str, list] = {view: [] for view in CAMERAS} if depth else {}
    for state in states:
        sim.set_state_from_flattened(state)
        images, depths = frames_of(env, observe(env), depth)
        for view in CAMERAS:
            rgb[view].append(images[view])
            if depth:
                metres[view].append(depths[view])
        if advance is not None:
            advance(1)
    return Frames(
        {view: np.stack(frames) for view, frames in rgb.items()},
        {view: np.stack(frames).astype(DEPTH_DTYPE) for view, frames in metres.items()},
    )
