"""A scripted Push-T expert that plans push primitives by simulating them.

Push-T's block is quasi-static (gym-pusht sets the space damping to 0, so pymunk zeroes every
body's velocity each substep and the T moves only while it is pushed). That makes a short lookahead
in a second copy of the physics an exact model of one push. The expert repeats:

1. **plan**: candidate primitives are contact points on the T's outline (every ~20 px, kept clear
   of the concave corners the 15 px agent cannot reach) times push directions (the inward normal
   and the normal turned by +-25 degrees). Each is simulated from the agent resting 1 px off the
   contact; the score is the mean distance of the 9 keypoints to the goal's after the push, plus a
   small charge per pixel of approach path. A random pick among the near-best candidates (and a
   per-episode travel charge and speed) is where the demonstrations get their variety: the same
   state is solved by pushes from different sides in different episodes. Near the goal the travel
   charge fades with the remaining error (else it outweighs the last few pixels and every push looks
   like a local minimum), more trial lengths are tried (the PD lag means a 12 px push moves the T
   only ~2 px), and a push that left the T where it was is not tried again (with its neighbours on
   the outline) until the T moves.
2. **approach** around the T, never through it: back off along the last contact's outward normal
   to a clearance circle around the T's centre of mass, follow the circle the short way round, and
   come in along the new contact's normal.
3. **push**: the push length is chosen again from the true state on arrival (the approach may have
   nudged the T), then the target slides along the push direction and the agent backs off. If the
   walk knocks the T more than 3 px off the planned pose, the plan is dropped and made again.
"""
from __future__ import annotations

import numpy as np

import shapely.geometry as sg

from .pusht import GOAL_KEYPOINTS, T_COM, T_OUTLINE, PushT, _polygons, keypoints, rotation

AGENT_RADIUS = 15.0
CLEARANCE = 77.0 + AGENT_RADIUS + 10.0  # farthest T corner from the centre of mass is 76.5 px
PUSH_STEP = 12.0                         # px the target moves per 10 Hz step while pushing
PUSH_LENGTHS = (1.5, 3.0, 6.0, 9.0, 12.0, 16.0, 20.0, 24.0, 36.0, 48.0, 80.0, 120.0)  # px of target travel past the contact
CONCAVE = [np.array([15.0, 30.0]), np.array([-15.0, 30.0])]


def _contact_candidates(spacing: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Points on the T's outline (local frame) and their outward normals."""
    points, normals = [], []
    centroid_test = T_OUTLINE.mean(axis=0)
    for i in range(len(T_OUTLINE)):
        a, b = T_OUTLINE[i], T_OUTLINE[(i + 1) % len(T_OUTLINE)]
        edge = b - a
        length = np.linalg.norm(edge)
        n = np.array([edge[1], -edge[0]]) / length
        # The outline is a simple polygon, so the outward side is the one whose tiny step leaves it.
        if _inside_t(a + edge / 2 + n * 1e-3) or np.dot(n, a + edge / 2 - centroid_test) < -100:
            n = -n
        for t in np.arange(spacing / 2, length, spacing):
            p = a + edge * t / length
            # The agent's disc must fit: keep the contact a radius away from concave corners.
            if min(np.linalg.norm(p - c) for c in CONCAVE) < AGENT_RADIUS + 3:
                continue
            points.append(p)
            normals.append(n)
    return np.array(points), np.array(normals)


def _inside_t(p: np.ndarray) -> bool:
    x, y = p
    return bool((-60 < x < 60 and 0 < y < 30) or (-15 < x < 15 and 30 <= y < 120))


CONTACTS, NORMALS = _contact_candidates()


def _t_polygon(block_pose: np.ndarray):
    return _polygons(block_pose)


def kp_cost(block_pose: np.ndarray) -> float:
    """Mean distance (px) of the block's keypoints to the goal's: 0 exactly at the goal."""
    return float(np.linalg.norm(keypoints(block_pose) - GOAL_KEYPOINTS, axis=1).mean())


def _clip(p: np.ndarray) -> np.ndarray:
    return np.clip(p, AGENT_RADIUS + 2, 512 - AGENT_RADIUS - 2)


class Simulator:
    """A second gym-pusht physics world to try pushes in (no rendering, no coverage per step)."""

    def __init__(self):
        self.task = PushT()
        self.task.reset(0)
        self.env = self.task.env

    def run(self, agent: np.ndarray, block_pose: np.ndarray, targets) -> np.ndarray:
        """Start from agent (x, y, vx, vy) and the block at rest; follow targets; return the block pose."""
        self.task.set_state({"agent": agent, "block": np.array([*block_pose, 0.0, 0.0, 0.0])})
        env, dt = self.env, self.env.dt
        for target in targets:
            target = _clip(np.asarray(target))
            for _ in range(10):  # gym-pusht's step: 10 substeps of PD control at 100 Hz
                pos, vel = env.agent.position, env.agent.velocity
                env.agent.velocity = (vel[0] + (env.k_p * (target[0] - pos[0]) - env.k_v * vel[0]) * dt,
                                      vel[1] + (env.k_p * (target[1] - pos[1]) - env.k_v * vel[1]) * dt)
                env.space.step(dt)
        return self.task.block_pose


def push_targets(pre: np.ndarray, direction: np.ndarray, length: float, speed: float) -> list[np.ndarray]:
    """Targets sliding from the pre-contact point by `length` px, then one backing-off step."""
    speed = speed if length <= 24 else 2 * speed  # long pushes move faster; fine ones stay slow
    n = max(1, int(np.ceil(length / speed)))
    targets = [pre + direction * length * (k + 1) / n for k in range(n)]
    return targets + [targets[-1] - direction * 2 * AGENT_RADIUS]


class PushTExpert:
    """`act(task)` returns the next action (target position, px) from the true state of `task`."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.sim = Simulator()
        # Per-episode style: how much a long walk round the T is worth avoiding, and walking speed.
        self.travel_cost = float(self.rng.uniform(0.005, 0.03))
        self.walk_speed = float(self.rng.uniform(30.0, 40.0))
        self.queue: list[np.ndarray] = []
        # (contact index, local push direction, fixed length or None to choose on arrival)
        self.plan: tuple[int, np.ndarray, float | None] | None = None
        self.last_normal: np.ndarray | None = None       # world outward normal of the last contact
        self.waited = 0                                  # steps spent settling on the contact
        self.plan_pose: np.ndarray | None = None         # the block's pose when the plan was made
        self.tabu: list[tuple[int, tuple]] = []          # pushes that just failed to move the T
        self.tabu_pose: np.ndarray | None = None
        self.last_plan: tuple[int, tuple] | None = None

    # ---- geometry in the world frame ----
    @staticmethod
    def _world(block_pose: np.ndarray, local: np.ndarray) -> np.ndarray:
        return local @ rotation(block_pose[2]).T + block_pose[:2]

    def _contact(self, block_pose: np.ndarray, i: int, local_dir: np.ndarray):
        rot = rotation(block_pose[2])
        point = self._world(block_pose, CONTACTS[i])
        normal = rot @ NORMALS[i]
        pre = point + normal * (AGENT_RADIUS + 1.0)
        return pre, normal, rot @ local_dir

    def _approach(self, agent: np.ndarray, block_pose: np.ndarray, pre: np.ndarray, normal: np.ndarray):
        """Waypoints around the T to `pre` and their length in px, or (None, inf) when both ways
        round would touch the T (the circle is squeezed against a wall, say)."""
        centre = self._world(block_pose, T_COM)
        start = [agent]
        if np.linalg.norm(agent - centre) < CLEARANCE:
            out = self.last_normal if self.last_normal is not None else agent - centre
            out = out / (np.linalg.norm(out) + 1e-9)
            start.append(_clip(_exit_point(agent, out, centre)))
        entry = _exit_point(pre, normal, centre)
        a0 = np.arctan2(*(start[-1] - centre)[::-1])
        a1 = np.arctan2(*(entry - centre)[::-1])
        short = (a1 - a0 + np.pi) % (2 * np.pi) - np.pi
        body = _t_polygon(block_pose).buffer(AGENT_RADIUS + 1.0)
        for turn in (short, short - np.sign(short) * 2 * np.pi):  # the short way round first
            n_arc = int(abs(turn) * CLEARANCE / self.walk_speed)
            arc = [_clip(centre + CLEARANCE * np.array([np.cos(a0 + turn * k / (n_arc + 1)),
                                                        np.sin(a0 + turn * k / (n_arc + 1))]))
                   for k in range(1, n_arc + 1)]
            path = start + arc + [_clip(entry)]
            # The last leg runs along the contact's normal and ends 1 px off the T by construction.
            if len(path) > 1 and sg.LineString(path[1:] if len(path) > 2 else path).intersects(body):
                continue
            path.append(pre)
            return path, float(sum(np.linalg.norm(b - a) for a, b in zip(path[:-1], path[1:])))
        return None, float("inf")

    def _resample(self, path: list[np.ndarray]) -> list[np.ndarray]:
        """Targets at walking speed along the path; the last leg (towards the T) at half speed."""
        out = []
        for k, (a, b) in enumerate(zip(path[:-1], path[1:])):
            speed = self.walk_speed / 2 if k == len(path) - 2 else self.walk_speed
            n = int(np.ceil(np.linalg.norm(b - a) / speed))
            out += [a + (b - a) * (j + 1) / n for j in range(n)]
        return out + [path[-1]]  # one step to settle on the pre-contact point

    # ---- planning ----
    def _simulate(self, agent_state, block_pose, i, local_dir, lengths, speed=PUSH_STEP):
        pre, _, direction = self._contact(block_pose, i, local_dir)
        agent = agent_state if agent_state is not None else np.array([*pre, 0.0, 0.0])
        return [(kp_cost(self.sim.run(agent, block_pose, push_targets(pre, direction, L, speed))), L)
                for L in lengths]

    def _choose(self, task: PushT):
        pose, agent = task.block_pose, task.agent_pos
        now = kp_cost(pose)
        # Two trial lengths scaled to the remaining error: a nudge and a full push.
        coarse = [float(np.clip(now / 4, 2.0, 24.0)), float(np.clip(now, 6.0, 80.0))]
        if now < 15.0:  # near the goal the PD lag makes push length a poor guide to travel: try more
            coarse = [3.0, 8.0, 12.0, 20.0]
        # The walk round the T is charged less as the remaining error shrinks, so that near the goal
        # the best fine push wins over a merely close one.
        travel_cost = self.travel_cost * min(1.0, now / 30.0)
        scored = []
        for i in range(len(CONTACTS)):
            for turn in (-25.0, 0.0, 25.0):
                local_dir = rotation(np.radians(turn)) @ -NORMALS[i]
                pre, normal, _ = self._contact(pose, i, local_dir)
                if np.any(pre < AGENT_RADIUS) or np.any(pre > 512 - AGENT_RADIUS):
                    continue  # contact faces a wall
                if (i, (float(round(turn)),)) in self.tabu:
                    continue  # tried from this very pose and the T did not move
                cost, _ = min(self._simulate(None, pose, i, local_dir, coarse))
                travel = np.linalg.norm(pre - agent)  # a cheap stand-in; the real path is checked below
                scored.append((cost + travel_cost * travel, i, local_dir, turn))
        scored.sort(key=lambda s: s[0])
        if not scored:  # boxed in by walls on every side we could reach: push anywhere
            i = int(self.rng.integers(len(CONTACTS)))
            return i, -NORMALS[i], 12.0
        refined = []
        for _, i, local_dir, _ in scored:
            if len(refined) == 6:
                break
            pre, normal, _ = self._contact(pose, i, local_dir)
            path, travel = self._approach(agent, pose, pre, normal)
            if path is None:
                continue
            cost, _ = min(self._simulate(None, pose, i, local_dir, PUSH_LENGTHS))
            refined.append((cost + travel_cost * travel, i, local_dir, cost))
        refined.sort(key=lambda s: s[0])
        if not refined:
            _, i, local_dir, _ = scored[0]
            return i, local_dir, 12.0
        best = refined[0][0]
        if min(r[3] for r in refined) > now - 0.05:  # judged on the push alone, not the walk
            # A local minimum: no single push helps. Shake it with a random short push from the
            # better quarter; the plan that follows starts from somewhere new.
            _, i, local_dir, _ = scored[self.rng.integers(max(1, len(scored) // 4))]
            return i, local_dir, 12.0
        # Variety: any candidate within 15 % of the best improvement.
        good = [r for r in refined if r[0] <= best + 0.15 * max(now - best, 0.0)]
        _, i, local_dir, _ = good[self.rng.integers(len(good))]
        return i, local_dir, None

    @staticmethod
    def _turn_of(i: int, local_dir: np.ndarray) -> float:
        n = -NORMALS[i]
        return float(round(np.degrees(np.arctan2(n[0] * local_dir[1] - n[1] * local_dir[0], n @ local_dir))))

    def _moved(self, pose: np.ndarray, since: np.ndarray | None, px: float = 3.0) -> bool:
        return since is None or float(np.linalg.norm(keypoints(pose) - keypoints(since), axis=1).max()) > px

    def act(self, task: PushT) -> np.ndarray:
        pose = task.block_pose
        if self.plan is not None and self._moved(pose, self.plan_pose):
            # The walk knocked the T (the PD lag cuts corners): the plan is stale, make a new one
            # rather than chase a contact point that moves with the T.
            self.plan, self.queue, self.waited = None, [], 0
        if not self.queue:
            if self.plan is None:  # plan a push, walk to it
                if self.plan_pose is not None and not self._moved(pose, self.plan_pose, 0.3) and self.last_plan:
                    # The last push left the T where it was: don't try it again from here.
                    if self._moved(pose, self.tabu_pose, 0.3):
                        self.tabu = []
                    # Its neighbours on the outline usually fail the same way: rule them out too.
                    j = self.last_plan[0]
                    self.tabu += [(k, (t,)) for k in (j - 1, j, j + 1) for t in (-25.0, 0.0, 25.0)]
                    self.tabu_pose = pose
                elif self._moved(pose, self.tabu_pose, 0.3):
                    self.tabu = []
                self.plan_pose = pose
                self.plan = self._choose(task)
                self.last_plan = None
                pre, normal, _ = self._contact(task.block_pose, *self.plan[:2])
                path, _ = self._approach(task.agent_pos, task.block_pose, pre, normal)
                self.queue = self._resample(path if path is not None else [task.agent_pos, pre])
            else:  # arrived: pick the push length from the true state, then push
                i, local_dir, length = self.plan
                pose = task.block_pose
                pre, _, _ = self._contact(pose, i, local_dir)
                # The PD controller lags its target; the plan assumed the agent resting at `pre`.
                if np.linalg.norm(task.agent_pos - pre) > 1.0 and self.waited < 4:
                    self.waited += 1
                    return _clip(pre)
                self.waited = 0
                if length is None:
                    agent = task.get_state()["agent"][:4]
                    _, length = min(self._simulate(agent, pose, i, local_dir, PUSH_LENGTHS))
                pre, normal, direction = self._contact(pose, i, local_dir)
                self.queue = push_targets(pre, direction, length, PUSH_STEP)
                self.last_plan = (i, (self._turn_of(i, local_dir),))
                self.last_normal, self.plan = normal, None
        return _clip(self.queue.pop(0))


def _exit_point(p: np.ndarray, direction: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Where the ray p + t * direction (t >= 0) leaves the clearance circle."""
    d = direction / (np.linalg.norm(direction) + 1e-9)
    rel = p - centre
    b = float(rel @ d)
    t = -b + np.sqrt(max(b * b - (rel @ rel - CLEARANCE ** 2), 0.0))
    return p + d * max(t, 0.0)


def run_expert_episode(task: PushT, seed: int, expert_seed: int | None = None) -> dict[str, np.ndarray]:
    """One demonstration: per-step observations and the actions taken from them."""
    expert = PushTExpert(seed if expert_seed is None else expert_seed)
    obs = task.reset(seed)
    steps: dict[str, list] = {k: [] for k in obs}
    steps["action"] = []
    while not task.done:
        action = expert.act(task)
        for k, v in obs.items():
            steps[k].append(v)
        steps["action"].append(action.astype(np.float32))
        obs = task.step(action)
    return {k: np.stack(v) for k, v in steps.items()}
