"""Serving any policy trained here: a TCP-pose-action policy through servoL, an image + joints +
gripper policy with the emulated cameras and Robotiq gripper, and what the robot config and the
cell's sensors can do wrong. Every run is `serve.main` through the real ur_rtde client against the
emulator (the cell's cameras and gripper are the emulator's, over their own sockets).

The policies are untrained (fresh weights) with normalisers fitted on real expert demonstrations
of their task plug-ins: their chunks move the arm around inside the demonstrations' range, which
is what a test of the serving path wants; policies that work are the job of the slow test at the
end and of the README's second example.
"""
import math

import numpy as np
import pytest
import torch

from dpag_engine import serve, session
from dpag_engine.checkpoint import save_checkpoint
from dpag_engine.config import ImageEncoderConfig, PolicyConfig
from dpag_engine.data.replay_buffer import read_replay_buffer
from dpag_engine.kinematics import forward_kinematics, tcp_pose
from dpag_engine.policy import DPAGPolicy
from dpag_engine.spec import build_spec, merge_hints
from dpag_engine.tasks import get_task
from factories import ServeThread, running_emulator

pytest.importorskip("rtde_control")

HOST = "127.0.0.31"
V_MAX, A_MAX = 1.0, 8.0


def fitted_policy(task_name: str, tmp_path, image: ImageEncoderConfig | None = None):
    """A fresh policy of `task_name`'s spec, its normaliser fitted on 3 of the expert's demonstrations."""
    task = get_task(task_name)
    data = read_replay_buffer(task.write_demonstrations(tmp_path / f"{task_name}.zarr", 3, seed=int(
        np.random.default_rng().integers(1 << 20)))["path"])
    keys = task.state_keys()
    state = np.concatenate([data.data[k].reshape(len(data.data[k]), -1) for k in keys], axis=1)
    action = data.data["action"]
    cams = [(c, c, tuple(image.image_shape)) for c in image.cameras] if image else []
    spec, why = build_spec([(k, None, data.data[k].reshape(len(state), -1).shape[1]) for k in keys], cams,
                           tuple(image.crop_shape) if image else None, action.shape[1], merge_hints(data.spec_hints))
    assert spec is not None, why
    cfg = PolicyConfig(recipe="tiny", state_dim=state.shape[1], action_dim=action.shape[1], image=image)
    policy = DPAGPolicy(cfg)
    policy.normalizer.fit({"action": torch.from_numpy(action), "state": torch.from_numpy(state.astype(np.float32))})
    policy.spec = spec
    return save_checkpoint(tmp_path / f"{task_name}.pt", policy), spec


@pytest.fixture(scope="module")
def emu():
    yield from running_emulator(HOST, "3.15", 30131)


@pytest.fixture(scope="module")
def tcp_ckpt(tmp_path_factory):
    return fitted_policy("ur5_reach_tcp", tmp_path_factory.mktemp("tcp"))


IMAGE = ImageEncoderConfig(cameras=("scene", "wrist"), image_shape=(3, 64, 64), crop_shape=(58, 58),
                           backbone="small", feature_dim=16, num_keypoints=8)


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    return fitted_policy("ur5_reach_image", tmp_path_factory.mktemp("image"), IMAGE)


def sim_config(tmp_path, **drop) -> str:
    """The emulated cell as a lab would write it for the emulator at HOST."""
    cameras = {"scene": "sim:scene", "wrist": "sim:wrist"}
    for name in drop.get("cameras", ()):
        cameras.pop(name)
    text = [f'[robot]\nhost = "{HOST}"\n', "[limits]\nv_max = 1.0\na_max = 8.0\n"]
    text += [f'[cameras.{n}]\nsource = "{s}"\nfps = 30\n' for n, s in cameras.items()]
    text.append(f'[gripper]\nkind = "{drop.get("gripper", "robotiq")}"\n')
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cell.toml"
    path.write_text("\n".join(text))
    return str(path)


class Run(ServeThread):
    """serve.main against the emulated cell, from a robot config."""

    def __init__(self, emu, ckpt, tmp_path, *extra, config=None):
        emu.control.reset_faults()
        emu.control.stop_program()
        emu.control.set_joint_positions(q=list(get_task("ur5_reach").q_home))
        emu.control.clear_command_log()
        for cam in ("scene", "wrist"):
            emu.control.camera_freeze(camera=cam, seconds=0)
            emu.control.camera_delay(camera=cam, seconds=0.0)
        emu.control.gripper_freeze(seconds=0)
        out = tmp_path / "serve"
        super().__init__(emu, ["--ckpt", str(ckpt), "--robot", "ur5", "--config", config or sim_config(tmp_path),
                               "--episodes", "1", "--duration", "2.0", "--no-rt", "--log-dir", str(out), *extra], out)


def test_a_tcp_pose_policy_is_served_through_servol(emu, tcp_ckpt, tmp_path):
    ckpt, spec = tcp_ckpt
    assert spec.action.kind == "tcp_pose" and spec.action.dims == ("x", "y")
    run = Run(emu, ckpt, tmp_path, "--config", sim_config(tmp_path, cameras=("scene", "wrist"), gripper="none"))
    assert run.join() == session.EXIT_OK, run.summary["message"]
    servol = [e for e in run.log if e["name"] == "servoL"]
    assert servol and not [e for e in run.log if e["name"] == "servoJ"]
    log = np.load(run.out / "run.npz")
    poses = np.array([e["doubles"][:6] for e in servol])
    # Every joint target planned puts the TCP at the spec's fixed height and orientation (the
    # policy's x, y through IK); the scheduler's limited trajectory between them goes to servoL as
    # poses (FK of each commanded joint vector).
    fixed = spec.action.fixed
    targets = log["plan_actions"].reshape(-1, 6)
    poses_planned = np.array([forward_kinematics(q) for q in targets])
    assert np.abs(poses_planned[:, 2] - fixed["z"]).max() < 1e-6
    assert np.abs(poses_planned[:, 3:] - [fixed["rx"], fixed["ry"], fixed["rz"]]).max() < 1e-5
    assert np.allclose(poses[:, :3], [forward_kinematics(q)[:3] for q in log["cmd_q"][:len(poses)]], atol=1e-9)
    assert run.summary["task"] == "ur5_reach_tcp" and run.summary["episodes"] == 1
    # The observation's state is the TCP pose the robot measured, then the goal.
    q = log["obs_q"][-1]
    assert np.allclose(log["obs_state"][-1][:6], tcp_pose(q), atol=1e-9)


def test_an_image_policy_is_served_with_the_emulated_cameras_and_gripper(emu, image_ckpt, tmp_path):
    ckpt, spec = image_ckpt
    assert [f.camera for f in spec.camera_fields] == ["scene", "wrist"] and spec.action.gripper
    run = Run(emu, ckpt, tmp_path)
    assert run.join() == session.EXIT_OK, run.summary["message"]
    s = run.summary
    assert set(s["cameras"]) == {"scene", "wrist"}
    for c in s["cameras"].values():
        # A frame is rendered at 30 Hz: the nearest one is at most ~1/30 s from the observation,
        # plus the render and the socket.
        assert 0 <= c["frame_age_ms_p50"] < 60, c
    assert s["camera_to_command_ms_p50"] > 0 and s["gripper"]["polls"] > 0
    log = np.load(run.out / "run.npz")
    widths = log["obs_gripper_width"]
    assert np.all(np.isfinite(widths)) and np.all((widths >= 0) & (widths <= 0.0851))
    assert np.allclose(log["obs_state"][:, :6], log["obs_q"], atol=1e-12)
    assert np.allclose(log["obs_state"][:, 6], widths)
    assert (run.out / "camera_frames.png").stat().st_size > 1000


def test_an_injected_camera_delay_shows_as_frame_age(emu, image_ckpt, tmp_path):
    ckpt, _ = image_ckpt
    delay = 0.08
    base = Run(emu, ckpt, tmp_path / "a")
    assert base.join() == session.EXIT_OK, base.summary["message"]
    run = Run(emu, ckpt, tmp_path / "b")
    emu.control.camera_delay(camera="scene", seconds=delay)
    assert run.join() == session.EXIT_OK, run.summary["message"]
    added = run.summary["cameras"]["scene"]["frame_age_ms_p50"] - base.summary["cameras"]["scene"]["frame_age_ms_p50"]
    assert abs(added - delay * 1e3) < 25, (added, run.summary["cameras"])
    # The undelayed wrist camera is as before.
    assert run.summary["cameras"]["wrist"]["frame_age_ms_p50"] < 60


@pytest.mark.parametrize("what", ["camera", "gripper"])
def test_a_sensor_that_stops_is_a_safe_stop(emu, image_ckpt, tmp_path, what):
    ckpt, _ = image_ckpt
    run = Run(emu, ckpt, tmp_path, "--duration", "6.0")
    run.wait_servoing()
    if what == "camera":
        emu.control.camera_freeze(camera="wrist", seconds=None)
    else:
        emu.control.gripper_freeze(seconds=30.0)
    code = run.join()
    emu.control.camera_freeze(camera="wrist", seconds=0)
    emu.control.gripper_freeze(seconds=0)
    assert code == session.EXIT_SENSOR_FAULT, run.summary["message"]
    assert run.summary["message"].startswith("sensor fault:")
    assert ("'wrist'" if what == "camera" else "Robotiq") in run.summary["message"]
    moves = [e for e in run.log if e["name"] == "servoJ"]
    q = np.array([e["doubles"][:6] for e in moves])
    assert np.abs(q[-1] - q[-2]).max() * 125 < 1e-2          # brought to rest before stopping
    assert [e["name"] for e in run.log if e["name"] != "servoJ"][-2:] == ["servoStop", "stopScript"]


def test_a_config_without_a_source_the_policy_needs_is_refused_before_connecting(emu, image_ckpt, tmp_path, capsys):
    ckpt, _ = image_ckpt
    emu.control.clear_command_log()
    clients = emu.control.snapshot()["rtde_clients"]
    code = serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--config", sim_config(tmp_path, cameras=("wrist",)),
                       "--log-dir", str(tmp_path / "s")])
    assert code == session.EXIT_USAGE
    err = capsys.readouterr().err
    assert "camera 'wrist'" in err and "the cell has scene" in err
    assert emu.control.command_log() == [] and emu.control.snapshot()["rtde_clients"] == clients
    code = serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--config", sim_config(tmp_path, gripper="none"),
                       "--log-dir", str(tmp_path / "s")])
    assert code == session.EXIT_USAGE and "gripper" in capsys.readouterr().err
    assert emu.control.command_log() == []


def test_a_checkpoint_without_a_spec_is_refused(tmp_path, capsys):
    policy = DPAGPolicy(PolicyConfig(recipe="tiny", state_dim=5, action_dim=2))
    policy.normalizer.fit({"action": torch.randn(50, 2), "state": torch.randn(50, 5)})
    ckpt = save_checkpoint(tmp_path / "m.pt", policy)
    assert serve.main(["--ckpt", str(ckpt), "--log-dir", str(tmp_path / "s")]) == session.EXIT_USAGE
    assert "has no spec" in capsys.readouterr().err


@pytest.mark.slow
def test_record_train_serve_the_image_task_end_to_end(emu, tmp_path):
    """Demonstrations with rendered frames -> a small image DP-AG trained on CPU -> served with the
    emulated cameras and gripper. The number need not be high; the path must be whole."""
    from dpag_engine.train import main as train_main
    task = get_task("ur5_reach_image")
    data = task.write_demonstrations(tmp_path / "demos.zarr", 12)["path"]
    out = tmp_path / "train"
    assert train_main(["--config", "configs/ur5_reach_image.toml", f"data.path={data}", "train.steps=60",
                       "train.eval_every=0", f"train.out_dir={out}", "train.batch_size=16"]) == 0
    run = Run(emu, out / "model.pt", tmp_path, "--duration", "3.0")
    assert run.join() == session.EXIT_OK, run.summary["message"]
    assert run.summary["task"] == "ur5_reach_image" and math.isfinite(run.summary["mean_jerk"])
    assert run.summary["success_rate"] in (0.0, 1.0)


def test_a_policy_of_a_task_with_no_plug_in_is_served_with_task_own(emu, tmp_path):
    """A lab's own task: the spec names no task, the config gives the home pose, --duration the
    episode; the summary has no success rate (nobody scores it) but everything else."""
    data = read_replay_buffer(get_task("ur5_reach").write_demonstrations(tmp_path / "d.zarr", 2)["path"])
    spec, _ = build_spec([("q", None, 6)], [], None, 6, merge_hints({"dt": 0.1}))
    assert spec.task is None
    policy = DPAGPolicy(PolicyConfig(recipe="tiny", state_dim=6, action_dim=6))
    policy.normalizer.fit({"action": torch.from_numpy(data.data["action"]), "state": torch.from_numpy(data.data["q"])})
    policy.spec = spec
    ckpt = save_checkpoint(tmp_path / "own.pt", policy)
    config = tmp_path / "own.toml"
    home = ", ".join(f"{q:.4f}" for q in get_task("ur5_reach").q_home)
    config.write_text(f'[robot]\nhost = "{HOST}"\nhome = [{home}]\n[limits]\nv_max = 1.0\na_max = 8.0\n')
    run = Run(emu, ckpt, tmp_path, "--task", "own", config=str(config))
    assert run.join() == session.EXIT_OK, run.summary["message"]
    assert run.summary["task"] == "own" and run.summary["success_rate"] is None
    assert math.isfinite(run.summary["mean_jerk"])
    # Without --duration an own task has no episode length: refused before connecting.
    code = serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--config", str(config), "--task", "own",
                       "--log-dir", str(tmp_path / "s2")])
    assert code == session.EXIT_USAGE
