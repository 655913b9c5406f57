"""Task plug-ins: their demonstrations (keys, actions, frames, spec hints) and the kinematic cell rollout."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpag_engine.config import ImageEncoderConfig, PolicyConfig
from dpag_engine.data.replay_buffer import read_replay_buffer
from dpag_engine.kinematics import forward_kinematics
from dpag_engine.render import SCENE_CAMERA, Scene, render
from dpag_engine.spec import build_spec, merge_hints
from dpag_engine.tasks import TASKS, get_task
from dpag_engine.tasks.__main__ import main as tasks_main
from dpag_engine.tasks.reach import GRIPPER_CLOSED_TOL_M, IMAGE_HW, gripper_track
from dpag_engine.tasks.rollout import rollout


def demos(name, tmp_path, n=3):
    seed = int(np.random.default_rng().integers(1 << 20))
    summary = get_task(name).write_demonstrations(tmp_path / f"{name}.zarr", n, seed=seed)
    assert summary["written"] == n and summary["success_rate"] == 1.0
    return read_replay_buffer(summary["path"])


def test_joint_variant_actions_are_the_next_joints(tmp_path):
    buf = demos("ur5_reach", tmp_path)
    ep = buf.get_episode(1)
    np.testing.assert_array_equal(ep["action"][:-1], ep["q"][1:])
    assert buf.spec_hints["task"] == "ur5_reach" and buf.spec_hints["dt"] == 0.1


def test_tcp_variant_actions_are_the_next_tool_positions(tmp_path):
    buf = demos("ur5_reach_tcp", tmp_path)
    ep = buf.get_episode(0)
    np.testing.assert_allclose(ep["tcp_pose"], [forward_kinematics(q) for q in ep["q"]], atol=1e-6)
    np.testing.assert_allclose(ep["action"][:-1], ep["tcp_pose"][1:, :2], atol=1e-6)
    fixed = buf.spec_hints["action"]["fixed"]
    assert np.abs(ep["tcp_pose"][:, 2] - fixed["z"]).max() < 1e-4     # the expert keeps the height


def test_image_variant_frames_are_the_renderers_and_the_gripper_closes_at_the_goal(tmp_path):
    buf = demos("ur5_reach_image", tmp_path, n=2)
    ep = buf.get_episode(0)
    assert ep["scene"].shape[1:] == (*IMAGE_HW, 3) and ep["scene"].dtype == np.uint8
    t = int(np.random.default_rng().integers(len(ep["q"])))
    # The frame is the emulator's scene camera at the stored resolution, from that step's joints and
    # gripper width, with the goal marker where the episode's goal is (found from the frame itself:
    # the expert's final TCP is the goal).
    goal = forward_kinematics(ep["action"][-1, :6])[:3]
    frame = render(SCENE_CAMERA.resized(*IMAGE_HW), ep["q"][t].astype(float), float(ep["gripper_width"][t, 0]),
                   Scene().with_goal(goal))
    assert np.abs(frame.astype(int) - ep["scene"][t]).mean() < 1.0
    grip = ep["action"][:, 6]
    assert grip[0] > 0.08 and grip[-1] == 0.0 and np.all(np.diff(grip) <= 0)   # open while moving, then close
    np.testing.assert_allclose(ep["gripper_width"][:, 0], gripper_track(grip, 0.1)[:-1], atol=1e-6)
    assert ep["gripper_width"][-1, 0] <= GRIPPER_CLOSED_TOL_M


class ReplayPlanner:
    """A planner that returns the demonstration's own next actions: an oracle for the rollout."""

    def __init__(self, actions, n_action_steps):
        self.actions, self.n, self.t = actions, n_action_steps, 0

    def predict_action(self, obs, generator, mode="dp"):
        chunk = self.actions[self.t:self.t + self.n]
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.n - len(chunk), 0)]) if len(chunk) < self.n else chunk
        self.t += self.n
        return {"action": torch.from_numpy(chunk.astype(np.float32))[None]}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_rollout_of_the_experts_own_actions_succeeds(tmp_path, name):
    """The kinematic cell executes a demonstration's actions through the spec's decoder (TCP actions
    through IK, the gripper column at its speed) and the task scores it a success: the rollout,
    the decoder and the score agree with the data. A policy whose actions are off by 5 cm fails."""
    task = get_task(name)
    buf = demos(name, tmp_path, n=1)
    ep = buf.get_episode(0)
    keys = task.state_keys()
    image = ImageEncoderConfig(cameras=("scene", "wrist"), image_shape=(3, *IMAGE_HW), crop_shape=(58, 58),
                               backbone="small") if name == "ur5_reach_image" else None
    cams = [(c, c, (3, *IMAGE_HW)) for c in image.cameras] if image else []
    spec, _ = build_spec([(k, None, ep[k].reshape(len(ep["q"]), -1).shape[1]) for k in keys], cams,
                         (58, 58) if image else None, ep["action"].shape[1], merge_hints(buf.spec_hints))
    cfg = PolicyConfig(recipe="tiny", state_dim=spec.state_dim, action_dim=spec.action.dim, image=image)
    goal = np.asarray(forward_kinematics(ep["q"][-1])[:3])
    episode = {"goal": goal.tolist()}
    for offset, expect in ((0.0, True), (0.05, False)):
        actions = ep["action"].astype(np.float64).copy()
        if offset:   # shift the whole path sideways in the arm's action space
            actions[:, :2] += offset if name == "ur5_reach_tcp" else 0.0
            if name != "ur5_reach_tcp":
                actions[:, 0] += offset * 3   # base joint: ~ offset x reach radius of 0.4 m
        policy = SimpleNamespace(spec=spec, cfg=cfg, planner=lambda a=actions: ReplayPlanner(a, cfg.n_action_steps))
        m = rollout(task, policy, episode, torch.Generator().manual_seed(0))
        assert m["success"] is expect, (offset, m)


def test_the_cli_writes_and_evaluates(tmp_path, capsys):
    out = tmp_path / "d.zarr"
    assert tasks_main(["--task", "ur5_reach", "--out", str(out), "--episodes", "2"]) == 0
    assert read_replay_buffer(out).n_episodes == 2
    with pytest.raises(SystemExit):
        tasks_main(["--task", "ur5_reach", "--episodes", "2"])          # neither --out nor --eval
