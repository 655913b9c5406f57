"""A trained policy on a task plug-in without the emulator: the kinematic cell.

    python -m dpag_engine.tasks --task ur5_reach_image --eval outputs/ur5_reach_image/model.pt --episodes 100

The observation and the commands go through exactly what serving uses (the checkpoint's spec bound
to the emulated cell, spec_io's ObservationBuilder and ActionDecoder, the renderer that draws the
emulator's cameras), but the arm is an ideal servo with the UR5's joint speed limit and the gripper
moves at its own speed, stepped at the policy's rate: whole chunks of n_action_steps execute open
loop, as in Diffusion Policy's evaluation. Hundreds of episodes take minutes instead of hours, so
success rates come with enough episodes to mean something; serving on the emulator (real ur_rtde,
the servo loop, frames over sockets) is the check that the numbers carry over.
"""
from __future__ import annotations

import numpy as np
import torch

from ..cameras import Frame
from ..envs.ur5_reach import EVAL_SEED   # held-out episodes: seeds this far above the demonstrations'
from ..cell import bind, needed_cameras, sim_cell
from ..kinematics import UR5_LIMITS
from ..progress import progress_bar
from ..runtime import policy_planner
from ..spec_io import ActionDecoder, ObservationBuilder, Snapshot
from .base import Task, Trace
from .reach import GRIPPER, CellRenderer



def rollout(task: Task, policy, episode: dict, generator: torch.Generator, mode: str = "dp",
            planner=None) -> dict:
    """One episode of `policy` on the kinematic cell; the task's metrics. planner: the plan contract
    to run it with (default: the PyTorch reference)."""
    spec, cfg = policy.spec, policy.cfg
    cell = sim_cell()
    inputs = task.inputs(episode)
    bindings = bind(spec, cell, inputs)
    builder, decoder = ObservationBuilder(spec, bindings), ActionDecoder(spec)
    cams = needed_cameras(bindings)
    renderer = scene = None
    if cams:
        hw = next(tuple(b.field.shape[1:]) for b in bindings if b.field.kind == "camera")
        renderer = CellRenderer(hw)
        scene = renderer.scene(task.scene(episode))
    planner = planner or policy.planner()
    dt, max_step = spec.dt, UR5_LIMITS.v_max * spec.dt
    q, width = np.asarray(task.q_home, dtype=float), GRIPPER.stroke_m
    qs, widths, history, queue = [q.copy()], [width], [], []
    for step in range(task.episode_steps):
        frames = {c: Frame(renderer.render(c, q, width, scene), step * dt, step) for c in cams}
        snap = Snapshot(step * dt, q, np.zeros(6), width, frames, inputs)
        history.append((builder.state(snap), builder.images(snap)))
        if not queue:
            window = ([history[0]] * cfg.n_obs_steps + history)[-cfg.n_obs_steps:]
            out = planner.predict_action(builder.policy_obs(window), generator, mode=mode)
            joints, grip = decoder(out["action"][0].double().numpy(), snap)
            queue = [(joints[i], None if grip is None else grip[i]) for i in range(len(joints))]
        target, grip = queue.pop(0)
        q = q + np.clip(target - q, -max_step, max_step)
        if grip is not None:
            width += float(np.clip(np.clip(grip, 0.0, GRIPPER.stroke_m) - width,
                                   -GRIPPER.speed_m_s * dt, GRIPPER.speed_m_s * dt))
        qs.append(q.copy())
        widths.append(width)
    return task.evaluate(Trace(np.asarray(qs), np.asarray(widths) if spec.action.gripper else None), episode)


def evaluate_policy(task: Task, policy, episodes: int, mode: str = "dp", seed: int = EVAL_SEED,
                    progress: bool = True, runtime: str = "cpp", weights: str = "fp32") -> dict:
    """`episodes` held-out episodes (episode i from np.random.default_rng([seed, i])); the rates.
    runtime: "cpp" plans on the C++ engine as serving does, "torch" on the PyTorch reference;
    weights: the engine's weight storage (runtime.ENGINE_WEIGHTS)."""
    generator = torch.Generator().manual_seed(seed)
    planner = policy_planner(policy, runtime, mode, weights=weights)
    results = []
    for i in progress_bar(range(episodes), desc=f"{task.name} rollout ({mode}, {runtime})", disable=not progress):
        episode = task.sample_episode(np.random.default_rng([seed, i]))
        results.append(rollout(task, policy, episode, generator, mode, planner))

    def rate(key):
        values = [r[key] for r in results if r.get(key) is not None]
        return float(np.mean(values)) if values else float("nan")
    return {"task": task.name, "mode": mode, "runtime": runtime, "weights": weights, "episodes": episodes,
            "success_rate": rate("success"),
            "collision_rate": rate("collided"), "mean_jerk": rate("mean_jerk"),
            "gripper_closed_rate": rate("gripper_closed"), "per_episode": results}
