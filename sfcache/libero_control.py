"""A scripted pick-and-place controller for LIBERO tasks, from privileged object poses.

It reads the task's goal (`parsed_problem["goal_state"]`: one `on` / `in` predicate, object -> destination)
and steers the end effector with OSC_POSE delta actions (position x 0.05 m, rotation x 0.5 rad, world frame;
gripper -1 open, +1 close) through waypoints: above the grasp point, down, close, lift, over the destination
(corrected with the held object's live pose), down until the object nearly touches, open, up. A grasp that
lifts without the object (the object stays down while the gripper rises) opens and starts again from above
the object, at most `REGRASPS` times, so noisy demonstrations show recoveries. Object sizes
come from MuJoCo's geom bounding boxes, so no per-object table is needed. Bowls are pinched at the rim
(fingers close along y); boxes are grasped across their short side (the gripper turns to it).

A controller never decides success: the environment's own check (`done` of `env.step`) does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sfcache.errors import SfcacheError

POSITION_SCALE, ROTATION_SCALE = 0.05, 0.5  # OSC_POSE: metres / radians per unit action
OPEN, CLOSE = -1.0, 1.0
RIM_OFFSET, RIM_HEIGHT = 0.047, 0.035  # bowls: pinch the rim this far from the centre along y, above the origin


class UnsupportedTask(SfcacheError):
    """The controller has no script for this task's goal (e.g. open a drawer, two objects)."""


@dataclass(frozen=True)
class Box:
    """World-axis bounding box of an object's geoms."""

    low: np.ndarray
    high: np.ndarray

    @property
    def center(self) -> np.ndarray:
        return (self.low + self.high) / 2


def _quat_to_matrix(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) -> rotation matrix."""
    x, y, z, w = np.asarray(quat, dtype=np.float64) / np.linalg.norm(quat)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _rotation_vector(matrix: np.ndarray) -> np.ndarray:
    """Rotation matrix -> axis * angle."""
    cosine = np.clip((np.trace(matrix) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cosine)
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0], matrix[1, 0] - matrix[0, 1]])
    if np.pi - angle < 1e-3:  # near 180 degrees the antisymmetric part vanishes: take the axis from the diagonal
        axis = np.sqrt(np.maximum((np.diag(matrix) + 1) / 2, 0.0))
        return axis / np.linalg.norm(axis) * angle
    return axis / (2 * np.sin(angle)) * angle


def _yaw(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class Scene:
    """Live poses and sizes from the simulator of one LIBERO env (`env.env`)."""

    def __init__(self, env):
        self.env = env.env if hasattr(env, "env") and hasattr(env.env, "sim") else env

    @property
    def sim(self):
        return self.env.sim

    def _geoms(self, name: str) -> np.ndarray:
        """Geom ids of the body `name` and its descendants."""
        model = self.sim.model
        root = self.env.obj_body_id[name]
        bodies = {root}
        for body in range(model.nbody):  # children come after their parents in MuJoCo's body order
            if model.body_parentid[body] in bodies:
                bodies.add(body)
        return np.array([g for g in range(model.ngeom) if model.geom_bodyid[g] in bodies])

    def box(self, name: str) -> Box:
        """The world-axis bounding box of object `name`'s collision and visual geoms."""
        model, data = self.sim.model, self.sim.data
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        points = []
        for geom in self._geoms(name):
            center, half = model.geom_aabb[geom][:3], model.geom_aabb[geom][3:]
            local = center + corners * half
            points.append(data.geom_xpos[geom] + local @ data.geom_xmat[geom].reshape(3, 3).T)
        if not points:
            position = self.position(name)
            return Box(position, position)
        stacked = np.concatenate(points)
        return Box(stacked.min(axis=0), stacked.max(axis=0))

    def local_extent(self, name: str) -> np.ndarray:
        """Half sizes of the object's geoms along its own axes (for the short side of a box)."""
        model, data = self.sim.model, self.sim.data
        rotation = data.body_xmat[self.env.obj_body_id[name]].reshape(3, 3)
        origin = data.body_xpos[self.env.obj_body_id[name]]
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        points = []
        for geom in self._geoms(name):
            local = model.geom_aabb[geom][:3] + corners * model.geom_aabb[geom][3:]
            world = data.geom_xpos[geom] + local @ data.geom_xmat[geom].reshape(3, 3).T
            points.append((world - origin) @ rotation)
        stacked = np.concatenate(points)
        return (stacked.max(axis=0) - stacked.min(axis=0)) / 2

    def position(self, name: str) -> np.ndarray:
        return np.array(self.sim.data.body_xpos[self.env.obj_body_id[name]])

    def rotation(self, name: str) -> np.ndarray:
        return np.array(self.sim.data.body_xmat[self.env.obj_body_id[name]]).reshape(3, 3)

    def site(self, name: str) -> np.ndarray | None:
        try:
            return np.array(self.sim.data.get_site_xpos(name))
        except (ValueError, KeyError):
            return None

    def objects(self) -> list[str]:
        return list(self.env.obj_body_id)


def goal_of(env) -> tuple[str, str, str]:
    """(predicate, object, destination) of a single `on`/`in` goal; UnsupportedTask otherwise."""
    scene = Scene(env)
    goal = scene.env.parsed_problem["goal_state"]
    if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0].lower() not in ("on", "in"):
        raise UnsupportedTask(f"goal {goal}: the controller scripts one `on`/`in` goal (pick and place)")
    predicate, target, destination = (str(part) for part in goal[0])
    if target not in scene.env.obj_body_id:
        raise UnsupportedTask(f"goal {goal}: {target} is not a movable object")
    return predicate.lower(), target, destination


class PickPlace:
    """`controller(obs) -> action [7]` for one episode; `phase` names where it is, `failure` why it gave up."""

    # waypoint tolerances (m) and step budgets per phase
    NEAR, CLOSE_STEPS, RELEASE_STEPS, RETREAT_STEPS, PHASE_STEPS = 0.01, 12, 10, 12, 80
    REGRASPS, LEFT_BEHIND = 2, 0.03  # retries of a missed grasp; how far (m) the gripper rises without the object

    def __init__(self, env):
        self.scene = Scene(env)
        self.predicate, self.target, self.destination = goal_of(env)
        self.phase, self.count, self.failure = "approach", 0, None
        self.regrasps = 0
        self.orientation = None  # desired gripper rotation matrix, fixed at the start
        self.grasp_offset = None  # eef - object position at the grasp, for carrying
        self.trail: list[np.ndarray] = []  # eef positions in this phase, to notice a blocked motion
        self.is_bowl = "bowl" in self.target

    # -- geometry

    def _grasp_point(self) -> np.ndarray:
        scene, name = self.scene, self.target
        position, box = scene.position(name), scene.box(name)
        if self.is_bowl:
            others = [scene.position(o)[:2] for o in scene.objects() if o != name]
            sides = [position + np.array([0.0, side * RIM_OFFSET, RIM_HEIGHT]) for side in (1, -1)]
            clearance = [min((np.linalg.norm(s[:2] - o) for o in others), default=1.0) for s in sides]
            return sides[int(np.argmax(clearance))]
        height = box.high[2] - box.low[2]
        z = max(box.low[2] + 0.5 * height, box.high[2] - 0.035)
        return np.array([box.center[0], box.center[1], z])

    def _above_grasp(self) -> np.ndarray:
        """Where the approach heads (and a re-grasp returns to): 8 cm above the grasp point."""
        return self.grasp + np.array([0, 0, 0.08])

    def _gripper_yaw(self) -> float:
        """Yaw turn (rad) that puts the fingers (closing along world y) across the object's short side."""
        if self.is_bowl:
            return 0.0
        extent = self.scene.local_extent(self.target)
        if abs(extent[0] - extent[1]) < 0.005:  # round enough: no turn
            return 0.0
        axes = self.scene.rotation(self.target)
        short = axes[:, int(np.argmin(extent[:2]))]
        angle = np.arctan2(short[1], short[0]) - np.pi / 2  # turn world y onto the short axis
        return float((angle + np.pi / 2) % np.pi - np.pi / 2)  # the fingers are symmetric: within +-90 degrees

    def _destination_point(self) -> tuple[np.ndarray, float]:
        """(point over which to release, its z the destination's top; the z the object's bottom should reach)."""
        scene = self.scene
        if self.destination in scene.env.obj_body_id:
            box = scene.box(self.destination)
            return np.array([*box.center[:2], box.high[2]]), box.high[2] + 0.01
        site = scene.site(self.destination)
        if site is None:
            raise UnsupportedTask(f"destination {self.destination}: neither an object nor a site")
        owner = next((o for o in scene.objects() if self.destination.startswith(o + "_")), None)
        top = scene.box(owner).high[2] if owner is not None else site[2]  # e.g. basket_1_contain_region: the rim
        if self.predicate == "in":  # into a container: down to its region (lowering stops early on contact)
            return np.array([site[0], site[1], top]), min(top, site[2]) + 0.01
        return np.array([site[0], site[1], top]), top + 0.01

    # -- control

    def _move(self, obs: dict, target: np.ndarray, gripper: float) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        action = np.zeros(7)
        action[:3] = np.clip((target - eef) / POSITION_SCALE, -1.0, 1.0)
        current = _quat_to_matrix(obs["robot0_eef_quat"])
        action[3:6] = np.clip(_rotation_vector(self.orientation @ current.T) / ROTATION_SCALE, -1.0, 1.0)
        action[6] = gripper
        return action

    def _next(self, phase: str) -> None:
        self.phase, self.count, self.trail = phase, 0, []

    def _stalled(self, eef: np.ndarray, steps: int = 4, distance: float = 0.002) -> bool:
        """The eef moved less than `distance` over the last `steps` steps of this phase (blocked by contact)."""
        self.trail.append(eef.copy())
        return len(self.trail) > steps and float(np.linalg.norm(self.trail[-1] - self.trail[-1 - steps])) < distance

    def _reached(self, obs: dict, target: np.ndarray, tolerance: float | None = None) -> bool:
        return float(np.linalg.norm(np.asarray(obs["robot0_eef_pos"]) - target)) < (tolerance or self.NEAR)

    def __call__(self, obs: dict) -> np.ndarray:
        if self.orientation is None:
            start = _quat_to_matrix(obs["robot0_eef_quat"])
            self.orientation = _yaw(self._gripper_yaw()) @ start
            self.grasp = self._grasp_point()
        self.count += 1
        if self.count > self.PHASE_STEPS and self.phase not in ("release", "retreat", "done"):
            self.failure = f"{self.phase} did not reach its waypoint in {self.PHASE_STEPS} steps"
            self._next("done")
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        if self.phase == "done":
            return self._move(obs, eef, OPEN)
        object_box = self.scene.box(self.target)
        if self.phase == "approach":
            above = self._above_grasp()
            over = float(np.linalg.norm((eef - above)[:2])) < 0.015  # out of reach in height: go on from here
            if (self._reached(obs, above, 0.015) or (self._stalled(eef) and over)) and self.count > 3:
                self._next("descend")
            return self._move(obs, above, OPEN)
        if self.phase == "descend":
            if self._reached(obs, self.grasp, 0.008) or (self._stalled(eef) and self.count > 5):  # fingers touch
                self._next("close")
            return self._move(obs, self.grasp, OPEN)
        if self.phase == "close":
            if self.count >= self.CLOSE_STEPS:
                self.grasp_offset = eef - self.scene.position(self.target)
                self.bottom_offset = eef[2] - object_box.low[2]
                point, _ = self._destination_point()
                clear = max(point[2], object_box.low[2]) + self.bottom_offset + 0.06
                self.carry_z = min(clear, max(point[2], self.grasp[2]) + 0.25)  # within the arm's reach
                self._next("lift")
            return self._move(obs, self.grasp, CLOSE)
        point, bottom_z = self._destination_point()
        carry_z = self.carry_z
        if self.phase == "lift":
            lifted = np.array([*self.grasp[:2], carry_z])
            left_behind = (eef - self.scene.position(self.target))[2] - self.grasp_offset[2] > self.LEFT_BEHIND
            if left_behind and self.regrasps < self.REGRASPS:  # a missed grasp: open, and again from above it
                self.regrasps += 1
                self.grasp = self._grasp_point()
                self._next("approach")
                return self._move(obs, self._above_grasp(), OPEN)
            if eef[2] > carry_z - 0.02:
                self._next("carry")
            return self._move(obs, lifted, CLOSE)
        held = eef - self.scene.position(self.target)  # the live grasp offset (the object may have slipped)
        over = np.array([point[0] + held[0], point[1] + held[1], carry_z])
        if self.phase == "carry":
            if float(np.linalg.norm((held - self.grasp_offset)[:2])) > 0.04:  # the live offset would run away
                self.failure = "the object is not in the gripper (missed or slipped)"
                self._next("done")
                return self._move(obs, eef, OPEN)
            if self._reached(obs, over, 0.012):
                self._next("lower")
            return self._move(obs, over, CLOSE)
        if self.phase == "lower":
            low = np.array([over[0], over[1], bottom_z + (eef[2] - object_box.low[2])])
            if self._reached(obs, low, 0.008) or self._stalled(eef, 3):
                self._next("release")
            return self._move(obs, low, CLOSE)
        if self.phase == "release":
            if self.count >= self.RELEASE_STEPS:
                self.release_at = eef.copy()
                self._next("retreat")
            return self._move(obs, eef, OPEN)
        if self.count >= self.RETREAT_STEPS:  # retreat
            self._next("done")
        return self._move(obs, self.release_at + np.array([0, 0, 0.1]), OPEN)

    @property
    def finished(self) -> bool:
        """The script has run out (the object was released and the arm lifted, or a phase gave up)."""
        return self.phase == "done"

    @property
    def released(self) -> bool:
        return self.phase in ("retreat", "done") and self.failure is None
