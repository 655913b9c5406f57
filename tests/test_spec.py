"""The policy spec (dpag_engine/spec.py): plain-data round trip, validation that names the field,
names that say their kind, building it from data; training writing it into model.pt; format-1
checkpoints migrating to it; spec_io turning cell measurements into policy tensors and action
chunks into joint targets.

Oracles are independent of the code under test: hand-written expected specs, scipy's Rotation for
TCP composition and angular velocity, PIL for image resizing, numerical differences of poses.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from dpag_engine import checkpoint as ck
from dpag_engine.cameras.base import Frame
from dpag_engine.cell import CameraConfig, Cell, GripperConfig, bind
from dpag_engine.checkpoint import CheckpointError, load_policy, save_checkpoint
from dpag_engine.config import ImageEncoderConfig
from dpag_engine.kinematics import forward_kinematics
from dpag_engine.spec import (TCP_COMPONENTS, ActionSpec, ObsField, PolicySpec, SpecError, build_spec, kind_of,
                              merge_hints, reach_spec)
from dpag_engine.spec_io import ActionDecoder, ObservationBuilder, Snapshot

from factories import make_policy

Q_HOME = np.array([0.0, -1.2, 1.6, -1.97, -1.57, 0.0])   # a well-conditioned UR5 pose, elbow up


# ------------------------------------------------------------------ independent oracles
def tcp_oracle(q, offset) -> tuple[np.ndarray, Rotation]:
    """TCP position and rotation from the flange pose (forward_kinematics) composed with the tool
    offset through scipy: the TCP is the flange frame's image of the offset point."""
    fl = forward_kinematics(q)
    r_fl = Rotation.from_rotvec(fl[3:])
    return fl[:3] + r_fl.apply(offset[:3]), r_fl * Rotation.from_rotvec(offset[3:])


def rotation_distance(a: Rotation, b: Rotation) -> float:
    return float((a.inv() * b).magnitude())


def random_offset(rng) -> np.ndarray:
    return np.concatenate([rng.uniform(-0.05, 0.05, 2), rng.uniform(0.08, 0.2, 1), rng.uniform(-0.4, 0.4, 3)])


def random_q(rng, spread=0.3) -> np.ndarray:
    return Q_HOME + rng.uniform(-spread, spread, 6)


# ------------------------------------------------------------------ round trip
def random_spec(rng: np.random.Generator) -> PolicySpec:
    fields = []
    for i in range(int(rng.integers(1, 5))):
        kind = str(rng.choice(["joint_pos", "joint_vel", "tcp_pose", "tcp_speed", "gripper_width", "task", "unknown"]))
        size = {"gripper_width": 1}.get(kind, 6 if kind not in ("task", "unknown") else int(rng.integers(1, 12)))
        a = int(rng.integers(0, size))
        b = int(rng.integers(a + 1, size + 1))
        part = None if (a, b) == (0, size) or kind in ("task", "unknown") else (a, b)
        dim = b - a if part else size
        fields.append(ObsField(f"key{i}_{kind}", kind, (dim,), part))
    for j in range(int(rng.integers(0, 3))):
        h, w = int(rng.integers(16, 128)), int(rng.integers(16, 128))
        crop = (int(rng.integers(8, h + 1)), int(rng.integers(8, w + 1))) if rng.random() < 0.5 else None
        fields.append(ObsField(f"observation.images.cam{j}", "camera", (int(rng.choice([1, 3])), h, w),
                               camera=f"cam{j}", crop=crop))
    rng.shuffle(fields)
    if rng.random() < 0.5:
        action = ActionSpec("joint_pos", absolute=bool(rng.random() < 0.5), gripper=bool(rng.random() < 0.5))
    elif rng.random() < 0.5:   # relative TCP: every component, in any order
        action = ActionSpec("tcp_pose", absolute=False, dims=tuple(rng.permutation(TCP_COMPONENTS)),
                            gripper=bool(rng.random() < 0.5))
    else:
        dims = tuple(str(c) for c in rng.permutation(TCP_COMPONENTS)[: int(rng.integers(1, 7))])
        fixed = {c: float(rng.uniform(-2, 2)) for c in TCP_COMPONENTS if c not in dims}
        action = ActionSpec("tcp_pose", absolute=True, dims=dims, fixed=fixed, gripper=bool(rng.random() < 0.5))
    return PolicySpec(obs=tuple(fields), action=action, dt=float(rng.uniform(1e-3, 10.0)),
                      task=str(rng.choice(["ur5_reach", "pick"])) if rng.random() < 0.5 else None)


@pytest.mark.parametrize("seed", range(25))
def test_to_dict_from_dict_round_trip_of_random_specs(seed):
    spec = random_spec(np.random.default_rng([7, seed]))
    d = spec.to_dict()
    plain = json.loads(json.dumps(d))   # plain builtins only: survives JSON and a weights-only checkpoint
    back = PolicySpec.from_dict(plain)
    assert back == spec
    assert back.to_dict() == d
    assert back.state_dim == sum(f.shape[0] for f in spec.obs if f.kind != "camera")
    assert back.action.dim == len(spec.action.dims) + spec.action.gripper


# ------------------------------------------------------------------ validation names the field
def _obs(**kw):
    return ObsField(**{"key": "q", "kind": "joint_pos", "shape": (6,), **kw})


def _spec(**kw):
    return PolicySpec(**{"obs": (_obs(),), "action": ActionSpec(), "dt": 0.1, **kw})


@pytest.mark.parametrize("make,match", [
    (lambda: _obs(kind="joint_angle"), r"spec\.obs\['q'\]\.kind: 'joint_angle' is not one of"),
    (lambda: _obs(key="img", kind="camera", shape=(3, 64), camera="front"), r"spec\.obs\['img'\]\.shape: a camera"),
    (lambda: _obs(key="img", kind="camera", shape=(4, 64, 64), camera="front"), r"spec\.obs\['img'\]\.shape"),
    (lambda: _obs(key="img", kind="camera", shape=(3, 0, 64), camera="front"), r"spec\.obs\['img'\]\.shape"),
    (lambda: _obs(key="img", kind="camera", shape=(3, 64, 64)), r"spec\.obs\['img'\]\.camera"),
    (lambda: _obs(shape=(7,)), r"spec\.obs\['q'\]: values \[0, 7\) of a joint_pos \(6 values\)"),
    (lambda: _obs(shape=(2, 3)), r"spec\.obs\['q'\]\.shape: a low-dim field is \(D,\)"),
    (lambda: _obs(shape=(3,), part=(4, 7)), r"spec\.obs\['q'\]: values \[4, 7\)"),
    (lambda: _obs(shape=(3,), part=(0, 2)), r"spec\.obs\['q'\]: values \[0, 2\)"),
    (lambda: ActionSpec("cartesian"), r"spec\.action\.kind: 'cartesian'"),
    (lambda: ActionSpec("joint_pos", dims=("q0", "q1")), r"spec\.action\.dims: joint actions are all six"),
    (lambda: ActionSpec("joint_pos", fixed={"z": 0.2}), r"spec\.action\.fixed: only TCP actions"),
    (lambda: ActionSpec("tcp_pose", dims=("x", "y")), r"spec\.action\.fixed: .*\['z', 'rx', 'ry', 'rz'\]"),
    (lambda: ActionSpec("tcp_pose", dims=("x", "y"), fixed={"z": 0.3, "rx": 0.0, "ry": 3.1}),
     r"spec\.action\.fixed: .*\['rz'\]"),
    (lambda: ActionSpec("tcp_pose", dims=("x", "x", "y", "z", "rx", "ry", "rz")), r"spec\.action\.dims: .*distinct"),
    (lambda: ActionSpec("tcp_pose", dims=("x", "y", "z", "rx", "ry", "yaw")), r"spec\.action\.dims"),
    (lambda: ActionSpec("tcp_pose", absolute=False, dims=("x", "y"),
                        fixed={"z": 0.3, "rx": 0.0, "ry": 3.1, "rz": 0.0}), r"spec\.action: relative TCP"),
    (lambda: ActionSpec("tcp_pose", dims=("x", "y"), fixed={"z": math.inf, "rx": 0, "ry": 3.1, "rz": 0}),
     r"spec\.action\.fixed: values must be finite"),
    (lambda: ActionSpec("tcp_pose", dims=("x", "y", "z"), fixed={"z": 0.3, "rx": 0, "ry": 3.1, "rz": 0}),
     r"spec\.action\.fixed: \['z'\] are columns the policy outputs"),
    (lambda: ActionSpec("joint_pos", absolute="false"), r"spec\.action\.absolute: expected true or false"),
    (lambda: ActionSpec("joint_pos", gripper=1), r"spec\.action\.gripper: expected true or false"),
    (lambda: _spec(dt=0.0), r"spec\.dt: .*\(0, 10\]"),
    (lambda: _spec(dt=-0.1), r"spec\.dt"),
    (lambda: _spec(dt=10.5), r"spec\.dt"),
    (lambda: _spec(dt=math.nan), r"spec\.dt"),
    (lambda: _spec(dt="0.1"), r"spec\.dt"),
    (lambda: _spec(obs=(_obs(), _obs(kind="task", shape=(3,)))), r"spec\.obs: a key appears twice: \['q', 'q'\]"),
    (lambda: _spec(obs=()), r"spec\.obs: a policy observes something"),
    (lambda: _spec(obs=(_obs(key="a", kind="camera", shape=(3, 8, 8), camera="front"),
                        _obs(key="b", kind="camera", shape=(3, 8, 8), camera="front"))),
     r"spec\.obs: two camera fields feed the same policy input"),
])
def test_every_validation_error_names_its_field(make, match):
    with pytest.raises(SpecError, match=match):
        make()


@pytest.mark.parametrize("bad", [
    "not a dict", {"obs": [], "action": {}, "dt": 0.1, "version": 2}, {"action": {}, "dt": 0.1},
    {"obs": "q", "action": {}, "dt": 0.1}, {"obs": [{"key": "q", "kind": "joint_pos", "shape": [6], "units": "rad"}],
                                            "action": {}, "dt": 0.1},
    {"obs": [{"key": "q", "kind": "joint_pos", "shape": ["six"]}], "action": {}, "dt": 0.1},
    {"obs": [{"key": "q", "kind": "joint_pos", "shape": [6]}], "action": {"kind": "tcp_pose", "dims": ["x"],
                                                                       "fixed": {"y": "high"}}, "dt": 0.1},
    {"obs": [{"key": "q", "kind": "joint_pos", "shape": [6]}], "action": {"speed": 1}, "dt": 0.1},
    {"obs": [{"key": "q", "kind": "joint_pos", "shape": [6]}], "action": None, "dt": 0.1},
])
def test_malformed_spec_dicts_raise_spec_error(bad):
    with pytest.raises(SpecError, match=r"^spec"):
        PolicySpec.from_dict(bad)


# ------------------------------------------------------------------ names
@pytest.mark.parametrize("key,kind", [
    ("robot_eef_pose", "tcp_pose"), ("robot_joint", "joint_pos"), ("robot_eef_pose_vel", "tcp_speed"),
    ("robot_joint_vel", "joint_vel"), ("camera_0", "camera"), ("camera_3", "camera"),
    ("observation.state", "unknown"), ("observation.images.scene", "camera"), ("observation.images.wrist", "camera"),
    ("q", "joint_pos"), ("qd", "joint_vel"), ("goal", "task"), ("gripper_width", "gripper_width"),
    ("object_pos", "unknown"), ("state", "unknown"),
])
def test_kind_of_real_world_names(key, kind):
    assert kind_of(key) == kind


# ------------------------------------------------------------------ building from data
def test_build_spec_needs_a_control_period():
    spec, why = build_spec([("q", None, 6)], [], None, 6, merge_hints({}))
    assert spec is None and "control period" in why and "data.spec.dt" in why


@pytest.mark.parametrize("action_dim", [2, 5, 8, 14])
def test_build_spec_cannot_infer_other_action_widths(action_dim):
    spec, why = build_spec([("q", None, 6)], [], None, action_dim, merge_hints({"dt": 0.1}))
    assert spec is None and f"{action_dim} action columns" in why and "data.spec.action" in why


def test_build_spec_infers_joints_and_gripper_from_width():
    six, _ = build_spec([("robot_joint", None, 6), ("robot_eef_pose", (0, 3), 3)], [], None, 6,
                        merge_hints({"fps": 20}))
    assert six == PolicySpec(obs=(ObsField("robot_joint", "joint_pos", (6,)),
                                  ObsField("robot_eef_pose", "tcp_pose", (3,), (0, 3))),
                             action=ActionSpec("joint_pos", absolute=True, gripper=False), dt=0.05)
    seven, _ = build_spec([("q", None, 6)], [("front", "camera_0", (3, 48, 64))], (40, 56), 7,
                          merge_hints({"dt": 0.2}))
    assert seven.action == ActionSpec("joint_pos", gripper=True) and seven.action.dim == 7
    assert seven.camera_fields == (ObsField("camera_0", "camera", (3, 48, 64), camera="front", crop=(40, 56)),)
    assert seven.dt == 0.2 and seven.task is None


def test_build_spec_honours_hints_later_layers_winning():
    dataset = {"task": "pick", "dt": 0.1, "kinds": {"observation.state": "joint_pos", "extra": "task"},
               "action": {"kind": "tcp_pose", "dims": ["x", "y", "z"], "fixed": {"rx": 0.0, "ry": 3.1, "rz": 0.2}}}
    run = {"fps": 20, "kinds": {"extra": "gripper_width"}, "action": {"gripper": True}}
    spec, _ = build_spec([("observation.state", None, 6), ("extra", None, 1), ("camera_pose", None, 7)], [], None, 4,
                         merge_hints(dataset, run))
    assert spec.dt == pytest.approx(0.05) and spec.task == "pick"   # the run's fps beats the dataset's dt
    assert [(f.key, f.kind) for f in spec.obs] == [("observation.state", "joint_pos"), ("extra", "gripper_width"),
                                                   ("camera_pose", "unknown")]   # a state key is never a camera
    assert spec.action == ActionSpec("tcp_pose", dims=("x", "y", "z"), fixed={"rx": 0.0, "ry": 3.1, "rz": 0.2},
                                     gripper=True)
    # Within one layer an explicit dt wins over fps; an earlier fps loses to a later dt.
    assert merge_hints({"dt": 0.25, "fps": 10})["dt"] == 0.25
    assert merge_hints({"fps": 10}, {"dt": 0.3})["dt"] == 0.3


@pytest.mark.parametrize("hints,action_dim,match", [
    ({"dt": 0.1, "action": {"kind": "tcp_pose", "dims": ["x", "y"], "fixed": {"z": 0.3, "rx": 0, "ry": 3.1, "rz": 0}}},
     3, r"data\.spec\.action: describes 2 columns, the data's actions have 3"),
    ({"dt": 0.1, "action": {"kind": "joint_pos", "gripper": True}}, 6, r"describes 7 columns, .* have 6"),
    ({"dt": 0.1, "action": {"kind": "joint_pos"}}, 7, r"describes 6 columns, .* have 7"),
    ({"dt": 0.1, "action": {"knd": "joint_pos"}}, 6, r"data\.spec\.action\.knd: unknown"),
    ({"dt": "fast"}, 6, r"data\.spec\.dt"),
])
def test_build_spec_raises_when_hints_describe_the_wrong_columns(hints, action_dim, match):
    with pytest.raises(SpecError, match=match):
        build_spec([("q", None, 6)], [], None, action_dim, merge_hints(hints))


@pytest.mark.parametrize("layer,match", [({"fps": 0}, r"data\.spec\.fps"), ({"fps": "ten"}, r"data\.spec\.fps"),
                                         ({"hz": 10}, r"data\.spec\.hz: unknown"),
                                         ({"kinds": ["q"]}, r"data\.spec\.kinds: expected a mapping")])
def test_merge_hints_names_bad_hints(layer, match):
    with pytest.raises(SpecError, match=match):
        merge_hints(layer)


# ------------------------------------------------------------------ training writes the spec
STEPS = ["train.steps=1", "train.batch_size=4", "train.log_every=10", "train.eval_every=0", "train.warmup_steps=1",
         "train.progress=false", "policy.recipe=tiny", "policy.horizon=8", "policy.n_action_steps=4",
         "data.val_ratio=0.0", "--method=dp"]


def _train(data, out, *extra):
    from dpag_engine.training.cli import main
    assert main(["--data", str(data), "--out-dir", str(out), *STEPS, *extra]) == 0
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["format_version"] == ck.FORMAT_VERSION == 2
    policy = load_policy(out / "model.pt")
    assert policy.spec == PolicySpec.from_dict(raw["spec"])   # what load_policy sets is what was written
    return policy


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_training_on_reach_writes_reach_spec(tmp_path):
    from dpag_engine.tasks import get_task
    get_task("ur5_reach").write_demonstrations(tmp_path / "reach.zarr", 3)
    policy = _train(tmp_path / "reach.zarr", tmp_path / "run", "data.state_keys=[q,goal]")
    expected = PolicySpec(obs=(ObsField("q", "joint_pos", (6,)), ObsField("goal", "task", (3,))),
                          action=ActionSpec("joint_pos", absolute=True), dt=0.1, task="ur5_reach")
    assert policy.spec == expected == reach_spec()


def test_training_on_reach_tcp_writes_tcp_xy_actions(tmp_path):
    from dpag_engine.tasks import get_task
    task = get_task("ur5_reach_tcp")
    task.write_demonstrations(tmp_path / "tcp.zarr", 3)
    policy = _train(tmp_path / "tcp.zarr", tmp_path / "run", "data.state_keys=[tcp_pose,goal]")
    spec = policy.spec
    assert [(f.key, f.kind, f.shape) for f in spec.obs] == [("tcp_pose", "tcp_pose", (6,)), ("goal", "task", (3,))]
    assert spec.dt == pytest.approx(0.1) and spec.task == "ur5_reach_tcp"
    a = spec.action
    assert (a.kind, a.absolute, a.dims, a.gripper) == ("tcp_pose", True, ("x", "y"), False)
    home = forward_kinematics(np.asarray(task.q_home))   # the fixed height and orientation: the home pose's
    assert set(a.fixed) == {"z", "rx", "ry", "rz"}
    np.testing.assert_allclose([a.fixed[c] for c in ("z", "rx", "ry", "rz")], home[2:], atol=1e-12)


def test_training_on_lerobot_fixture_takes_dt_from_fps(tmp_path):
    from test_lerobot import FIXTURES
    if not (FIXTURES / "ur5_images").is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    policy = _train(FIXTURES / "ur5_images", tmp_path / "run", "policy.image={}", f"data.cache_dir={tmp_path / 'c'}")
    spec = policy.spec
    assert spec.dt == pytest.approx(0.1) and spec.task is None   # info.json fps 10
    assert spec.obs[0] == ObsField("observation.state", "unknown", (9,))
    cam = spec.camera_fields
    assert len(cam) == 1 and cam[0].key == "observation.images.scene" and cam[0].camera == "scene"
    assert cam[0].shape == (3, 96, 96) == tuple(policy.cfg.image.image_shape)
    assert spec.action == ActionSpec("joint_pos", absolute=True, gripper=False)


# ------------------------------------------------------------------ checkpoint migration and checks
def _rewrite(path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    ck.atomic_save(ckpt, path)


def _as_format_1(c):
    c["format_version"] = 1
    c.pop("spec")


@pytest.mark.parametrize("overrides,expected", [
    (dict(state_dim=9, action_dim=6), "reach"),
    (dict(state_dim=5, action_dim=6), None),
    (dict(state_dim=9, action_dim=7), None),
    (dict(state_dim=9, action_dim=6,
          image=ImageEncoderConfig(cameras=("scene",), image_shape=(3, 72, 72), crop_shape=(64, 64),
                                   backbone="small")), None),
])
def test_format_1_checkpoint_migrates(tmp_path, overrides, expected):
    path = save_checkpoint(tmp_path / "model.pt", make_policy(seed=3, **overrides), step=11)
    _rewrite(path, _as_format_1)
    assert "spec" not in torch.load(path, weights_only=True)
    policy = load_policy(path)
    assert policy.checkpoint_step == 11
    assert policy.spec == (reach_spec() if expected == "reach" else None)
    # Saved again, it is a format-2 file holding the migrated spec.
    again = save_checkpoint(tmp_path / "again.pt", policy)
    raw = torch.load(again, weights_only=True)
    assert raw["format_version"] == 2 and raw["spec"] == (reach_spec().to_dict() if expected else None)


def _image_spec(shape=(3, 72, 72)):
    return PolicySpec(obs=(ObsField("q", "joint_pos", (4,), (0, 4)),
                           ObsField("camera_0", "camera", shape, camera="front"),
                           ObsField("camera_1", "camera", shape, camera="wrist")),
                      action=ActionSpec("tcp_pose", dims=("x", "y"), fixed={"z": 0.3, "rx": 0, "ry": 3.1, "rz": 0}),
                      dt=0.1)


@pytest.fixture(scope="module")
def _image_ckpt_bytes(tmp_path_factory):
    policy = make_policy(seed=5, state_dim=4, action_dim=2,
                         image=ImageEncoderConfig(cameras=("front", "wrist"), image_shape=(3, 72, 72),
                                                  crop_shape=(64, 64), backbone="small"))
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", policy, spec=_image_spec())
    assert load_policy(path).spec == _image_spec()
    return path.read_bytes()


@pytest.fixture
def image_ckpt(tmp_path, _image_ckpt_bytes):
    path = tmp_path / "model.pt"
    path.write_bytes(_image_ckpt_bytes)
    return path


def _set_spec(spec_dict):
    return lambda c: c.__setitem__("spec", spec_dict)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["obs"].__setitem__(0, {"key": "q", "kind": "joint_pos", "shape": [5], "part": [0, 5]}),
     r"spec\.obs: the state parts add up to 5 values, the policy's state_dim is 4"),
    (lambda d: d["action"].update(dims=["x", "y", "z"], fixed={"rx": 0, "ry": 3.1, "rz": 0}),
     r"spec\.action: 3 columns, the policy's action_dim is 2"),
    (lambda d: d["action"].update(gripper=True), r"spec\.action: 3 columns"),
    (lambda d: d["obs"][1].update(shape=[3, 96, 96]),
     r"spec\.obs\['camera_0'\]: shape \(3, 96, 96\), the policy's image_shape is \(3, 72, 72\)"),
    (lambda d: d["obs"][2].update(camera="side"), r"spec\.obs: cameras \['front', 'side'\], .* \['front', 'wrist'\]"),
    (lambda d: d["obs"].pop(2), r"spec\.obs: cameras \['front'\]"),
])
def test_spec_disagreeing_with_config_is_refused(image_ckpt, edit, match):
    d = _image_spec().to_dict()
    edit(d)
    _rewrite(image_ckpt, _set_spec(d))
    with pytest.raises(CheckpointError, match=rf"^{image_ckpt}: {match}"):
        load_policy(image_ckpt)


@pytest.mark.parametrize("bad", [
    "reach", [1, 2], {"obs": [], "action": {}, "dt": 0.1},
    {"obs": [{"key": "q", "kind": "joint_pos", "shape": [4], "part": [0, 4]}], "action": {"kind": "joint_pos"}},
    {"obs": [{"key": "q", "kind": "joint_pos", "shape": ["4"], "part": [0, "x"]}], "action": {}, "dt": 0.1},
    {"obs": [{"key": "q", "kind": "elbow", "shape": [4]}], "action": {}, "dt": 0.1},
])
def test_malformed_spec_in_checkpoint_is_refused(image_ckpt, bad):
    _rewrite(image_ckpt, _set_spec(bad))
    with pytest.raises(CheckpointError, match=rf"^{image_ckpt}: spec"):
        load_policy(image_ckpt)


def test_save_checkpoint_refuses_a_spec_that_does_not_describe_the_policy(tmp_path):
    with pytest.raises(SpecError, match="state_dim is 5"):
        save_checkpoint(tmp_path / "model.pt", make_policy(seed=1, state_dim=5, action_dim=6), spec=reach_spec())
    assert not (tmp_path / "model.pt").exists()


# ------------------------------------------------------------------ spec_io: observations
def _cell(offset, cameras=("scene",)):
    return Cell(tcp_offset=tuple(offset), cameras={c: CameraConfig(f"sim:{c}") for c in cameras},
                gripper=GripperConfig("robotiq"))


def _snap(rng, **kw):
    return Snapshot(t=float(rng.uniform(0, 100)), q=random_q(rng), qd=rng.uniform(-1.0, 1.0, 6),
                    gripper_width=float(rng.uniform(0.0, 0.085)), **kw)


@pytest.mark.parametrize("seed", range(4))
def test_state_of_joints_tcp_xyz_gripper_and_goal(seed):
    rng = np.random.default_rng([11, seed])
    offset = random_offset(rng)
    spec = PolicySpec(obs=(ObsField("robot_joint", "joint_pos", (6,)), ObsField("tcp_pose", "tcp_pose", (3,), (0, 3)),
                           ObsField("gripper_width", "gripper_width", (1,)), ObsField("goal", "task", (3,)),
                           ObsField("qd", "joint_vel", (3,), (2, 5))),
                      action=ActionSpec(), dt=0.1)
    goal = rng.uniform(-0.5, 0.5, 3)
    cell = _cell(offset)
    builder = ObservationBuilder(spec, bind(spec, cell, {"goal": goal}), cell.tcp_offset)
    snap = _snap(rng, task={"goal": goal})
    state = builder.state(snap)
    p_tcp, _ = tcp_oracle(snap.q, offset)
    expected = np.concatenate([snap.q, p_tcp, [snap.gripper_width], goal, snap.qd[2:5]])
    assert state.shape == (16,) == (spec.state_dim,)
    np.testing.assert_allclose(state, expected, atol=1e-12)
    # The offset matters: without it the TCP is the flange.
    plain = ObservationBuilder(spec, bind(spec, _cell(np.zeros(6)), {"goal": goal}))
    np.testing.assert_allclose(plain.state(snap)[6:9], forward_kinematics(snap.q)[:3], atol=1e-12)
    assert np.linalg.norm(plain.state(snap)[6:9] - p_tcp) > 0.05


@pytest.mark.parametrize("seed", range(4))
def test_tcp_pose_and_speed_sources_against_independent_composition(seed):
    rng = np.random.default_rng([12, seed])
    offset = random_offset(rng)
    spec = PolicySpec(obs=(ObsField("robot_eef_pose", "tcp_pose", (6,)),
                           ObsField("robot_eef_pose_vel", "tcp_speed", (6,)),
                           ObsField("robot_joint_vel", "joint_vel", (6,))), action=ActionSpec(), dt=0.1)
    cell = _cell(offset)
    builder = ObservationBuilder(spec, bind(spec, cell, {}), cell.tcp_offset)
    snap = _snap(rng)
    state = builder.state(snap)
    pose, speed, qd = state[:6], state[6:12], state[12:]
    p, r = tcp_oracle(snap.q, offset)
    np.testing.assert_allclose(pose[:3], p, atol=1e-12)
    assert rotation_distance(Rotation.from_rotvec(pose[3:]), r) < 1e-9
    np.testing.assert_array_equal(qd, snap.qd)
    # Central difference along qd: linear velocity of the TCP point, angular velocity from R(+h) R(-h)^T.
    h = 1e-6
    (p1, r1), (p0, r0) = tcp_oracle(snap.q + h * snap.qd, offset), tcp_oracle(snap.q - h * snap.qd, offset)
    v = (p1 - p0) / (2 * h)
    w = (r1 * r0.inv()).as_rotvec() / (2 * h)
    assert np.linalg.norm(v) > 0.05 and np.linalg.norm(w) > 0.1   # a real motion, not a zero test
    np.testing.assert_allclose(speed[:3], v, atol=1e-4)
    np.testing.assert_allclose(speed[3:], w, atol=1e-4)


def test_images_resized_to_spec_resolution_chw_in_unit_range():
    from PIL import Image
    rng = np.random.default_rng(13)
    spec = PolicySpec(obs=(ObsField("q", "joint_pos", (6,)),
                           ObsField("camera_0", "camera", (3, 48, 64), camera="front"),
                           ObsField("observation.images.wrist", "camera", (3, 30, 40), camera="wrist")),
                      action=ActionSpec(), dt=0.1)
    cell = _cell(np.zeros(6), cameras=("front", "wrist"))
    builder = ObservationBuilder(spec, bind(spec, cell, {}))
    # Smooth content (a random 6x8 pattern upsampled) so two resamplers agree to a few units.
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((320, 240), Image.BICUBIC))
    wrist = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)   # already the spec's size: untouched
    window = []
    for k in range(2):
        snap = _snap(rng, frames={"front": Frame(big, 1.0, k), "wrist": Frame(wrist, 1.0, k)})
        images = builder.images(snap)
        assert images["front"].shape == (3, 48, 64) and images["front"].dtype == np.uint8
        ref = np.asarray(Image.fromarray(big).resize((64, 48), Image.BILINEAR)).astype(float)
        assert np.abs(images["front"].transpose(1, 2, 0) - ref).mean() < 1.5
        np.testing.assert_array_equal(images["wrist"], wrist.transpose(2, 0, 1))
        window.append((builder.state(snap), images))
    obs = builder.policy_obs(window)
    assert set(obs) == {"state", "front", "wrist"}
    assert obs["state"].shape == (1, 2, 6) and obs["state"].dtype == torch.float32
    torch.testing.assert_close(obs["state"][0, 1], torch.from_numpy(window[1][0]).float())
    assert obs["front"].shape == (1, 2, 3, 48, 64) and obs["wrist"].shape == (1, 2, 3, 30, 40)
    for cam in ("front", "wrist"):
        assert obs[cam].dtype == torch.float32 and 0.0 <= float(obs[cam].min()) and float(obs[cam].max()) <= 1.0
    torch.testing.assert_close(obs["wrist"][0, 0], torch.from_numpy(wrist.transpose(2, 0, 1)).float() / 255)


def test_one_channel_policy_refuses_rgb_camera():
    spec = PolicySpec(obs=(ObsField("camera_0", "camera", (1, 16, 16), camera="front"),), action=ActionSpec(), dt=0.1)
    builder = ObservationBuilder(spec, bind(spec, _cell(np.zeros(6), cameras=("front",)), {}))
    rng = np.random.default_rng(14)
    with pytest.raises(ValueError, match="'camera_0'.*1 channel"):
        builder.images(_snap(rng, frames={"front": Frame(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), 0.0, 0)}))


# ------------------------------------------------------------------ spec_io: actions
def _joint_spec(**kw):
    return PolicySpec(obs=(ObsField("q", "joint_pos", (6,)),), action=ActionSpec("joint_pos", **kw), dt=0.1)


def test_joint_actions_absolute_relative_and_gripper_column():
    rng = np.random.default_rng(15)
    snap = _snap(rng)
    chunk = rng.uniform(-0.2, 0.2, (8, 6))
    joints, grip = ActionDecoder(_joint_spec())(chunk, snap)
    np.testing.assert_array_equal(joints, chunk)
    assert grip is None
    joints, grip = ActionDecoder(_joint_spec(absolute=False))(chunk, snap)
    np.testing.assert_allclose(joints, chunk + snap.q[None], atol=0)
    widths = rng.uniform(0, 0.085, (8, 1))
    joints, grip = ActionDecoder(_joint_spec(gripper=True))(np.hstack([chunk, widths]), snap)
    np.testing.assert_array_equal(joints, chunk)
    np.testing.assert_array_equal(grip, widths[:, 0])
    with pytest.raises(ValueError, match=r"shape \(8, 6\).*\(rows, 7\)"):
        ActionDecoder(_joint_spec(gripper=True))(chunk, snap)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dims", [("x", "y"), ("y", "x")])
def test_tcp_xy_actions_with_fixed_height_and_orientation_reach_every_target(seed, dims):
    rng = np.random.default_rng([16, seed])
    offset = random_offset(rng) if seed else np.zeros(6)
    q0 = random_q(rng, 0.1)
    p0, r0 = tcp_oracle(q0, offset)
    fixed = dict(zip(("z", "rx", "ry", "rz"), [p0[2], *r0.as_rotvec()]))
    spec = PolicySpec(obs=(ObsField("q", "joint_pos", (6,)),), dt=0.1,
                      action=ActionSpec("tcp_pose", dims=dims, fixed=fixed, gripper=True))
    # A path of 8 targets away from the start, each within 3 cm of the last.
    xy = p0[:2] + np.cumsum(rng.uniform(-0.03, 0.03, (8, 2)), axis=0)
    widths = rng.uniform(0, 0.085, 8)
    cols = {"x": xy[:, 0], "y": xy[:, 1]}
    chunk = np.column_stack([cols[d] for d in dims] + [widths])
    joints, grip = ActionDecoder(spec, offset)(chunk, Snapshot(0.0, q0, np.zeros(6)))
    np.testing.assert_array_equal(grip, widths)
    assert joints.shape == (8, 6)
    for i, q in enumerate(joints):
        p, r = tcp_oracle(q, offset)
        np.testing.assert_allclose(p, [xy[i, 0], xy[i, 1], p0[2]], atol=1e-6, err_msg=f"row {i}")
        assert rotation_distance(r, r0) < 1e-6, i
        assert np.max(np.abs(q - q0)) < 1.0   # the IK stayed on the start's branch


def test_relative_tcp_actions_are_offsets_from_the_observed_pose():
    rng = np.random.default_rng(17)
    offset = random_offset(rng)
    snap = Snapshot(0.0, random_q(rng, 0.1), np.zeros(6))
    dims = ("rz", "x", "y", "z", "rx", "ry")
    spec = PolicySpec(obs=(ObsField("q", "joint_pos", (6,)),), dt=0.1,
                      action=ActionSpec("tcp_pose", absolute=False, dims=dims))
    deltas = np.cumsum(rng.uniform(-0.01, 0.01, (5, 6)), axis=0)   # (x, y, z, rx, ry, rz) order
    chunk = deltas[:, [TCP_COMPONENTS.index(d) for d in dims]]
    joints, grip = ActionDecoder(spec, offset)(chunk, snap)
    assert grip is None
    p_obs, r_obs = tcp_oracle(snap.q, offset)
    for i, q in enumerate(joints):
        target = np.concatenate([p_obs, r_obs.as_rotvec()]) + deltas[i]
        p, r = tcp_oracle(q, offset)
        np.testing.assert_allclose(p, target[:3], atol=1e-6)
        assert rotation_distance(r, Rotation.from_rotvec(target[3:])) < 1e-6


def test_unreachable_tcp_target_names_the_row():
    rng = np.random.default_rng(18)
    offset = random_offset(rng)
    q0 = random_q(rng, 0.1)
    p0, r0 = tcp_oracle(q0, offset)
    fixed = dict(zip(("z", "rx", "ry", "rz"), [p0[2], *r0.as_rotvec()]))
    spec = PolicySpec(obs=(ObsField("q", "joint_pos", (6,)),), dt=0.1,
                      action=ActionSpec("tcp_pose", dims=("x", "y"), fixed=fixed))
    chunk = np.array([p0[:2] + 0.01, p0[:2] + 0.02, [3.0, 2.5], p0[:2]])
    with pytest.raises(ValueError, match=r"action row 2: TCP target \[3\.0, 2\.5, .*out of the arm's reach"):
        ActionDecoder(spec, offset)(chunk, Snapshot(0.0, q0, np.zeros(6)))
    # The same chunk without the bad row decodes (rows 0, 1 and the last were never the problem).
    joints, _ = ActionDecoder(spec, offset)(chunk[[0, 1, 3]], Snapshot(0.0, q0, np.zeros(6)))
    assert joints.shape == (3, 6) and np.all(np.isfinite(joints))
