"""The robot config of a cell (dpag_engine/cell.py): a full TOML parsed, every bad value named by
file, table and key; bind() refusing before anything connects what the cell cannot provide."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dpag_engine.cell import (CameraConfig, Cell, CellError, GripperConfig, bind, load_cell, needed_cameras,
                              parse_cell, sim_cell)
from dpag_engine.spec import ActionSpec, ObsField, PolicySpec
from dpag_engine.spec_io import ObservationBuilder, Snapshot

FULL = {
    "robot": {"host": "192.168.1.10", "version": "5.11", "frequency": 500, "tcp_offset": [0.01, -0.02, 0.15, 0, 0, 0.3],
              "home": [0.1, -1.5, 1.4, -1.6, -1.57, 0.2]},
    "limits": {"v_max": [1.0, 1.0, 1.2, 2.0, 2.0, 3.0], "a_max": 8.0, "q_min": [-3.1] * 6, "q_max": [3.1] * 6,
               "workspace_lo": [-0.8, -0.6, 0.02], "workspace_hi": [0.1, 0.6, 0.6], "state_timeout_s": 0.1},
    "cameras": {"scene": {"source": "realsense:135122075425", "fps": 30, "resolution": [480, 640]},
                "wrist": {"source": "opencv:/dev/video2", "fps": 15}},
    "gripper": {"kind": "robotiq", "model": "2f140", "port": 63353, "speed": 0.5, "force": 0.25},
    "observation": {"camera_0": "camera.scene", "observation.state": ["robot.joint_pos", "gripper.width", "task.goal"]},
}


def to_toml(d: dict) -> str:
    """Tables of scalars and arrays (JSON's strings, numbers and arrays are TOML's too)."""
    def value(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    def key(k):
        return k if k.replace("_", "").isalnum() else json.dumps(k)

    lines = []
    for name, table in d.items():
        if not isinstance(table, dict):
            lines.append(f"{key(name)} = {value(table)}")
    for name, table in d.items():
        if not isinstance(table, dict):
            continue
        flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines += [f"[{name}]"] + [f"{key(k)} = {value(v)}" for k, v in flat.items()]
        for sub, t in table.items():
            if isinstance(t, dict):
                lines += [f"[{name}.{key(sub)}]"] + [f"{key(k)} = {value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path, d, name="cell.toml"):
    path = tmp_path / name
    path.write_text(to_toml(d) if isinstance(d, dict) else d)
    return path


def test_full_toml_parses_every_table(tmp_path):
    path = write(tmp_path, FULL)
    cell = load_cell(path)
    assert cell.path == str(path) and not cell.sim
    assert (cell.host, cell.version, cell.frequency) == ("192.168.1.10", "5.11", 500.0)
    assert cell.tcp_offset == (0.01, -0.02, 0.15, 0.0, 0.0, 0.3)
    assert cell.home == (0.1, -1.5, 1.4, -1.6, -1.57, 0.2)
    lim = cell.limits
    assert tuple(lim.v_max) == (1.0, 1.0, 1.2, 2.0, 2.0, 3.0) and tuple(lim.a_max) == (8.0,) * 6
    assert tuple(lim.q_min) == (-3.1,) * 6 and tuple(lim.q_max) == (3.1,) * 6
    assert tuple(lim.workspace_lo) == (-0.8, -0.6, 0.02) and tuple(lim.workspace_hi) == (0.1, 0.6, 0.6)
    assert lim.state_timeout_s == 0.1
    assert cell.cameras == {"scene": CameraConfig("realsense:135122075425", 30.0, (480, 640)),
                            "wrist": CameraConfig("opencv:/dev/video2", 15.0, None)}
    assert cell.cameras["scene"].kind == "realsense" and cell.cameras["wrist"].kind == "opencv"
    assert cell.gripper == GripperConfig("robotiq", "2f140", 63353, 0.5, 0.25)
    assert cell.observation == {"camera_0": ("camera.scene",),
                                "observation.state": ("robot.joint_pos", "gripper.width", "task.goal")}


def test_defaults_and_shorthands(tmp_path):
    cell = load_cell(write(tmp_path, '[cameras]\ntop = "sim:scene"\n'))   # a camera as a bare source string
    assert cell.sim and cell.home is None and cell.frequency is None and cell.tcp_offset == (0.0,) * 6
    assert cell.cameras == {"top": CameraConfig("sim:scene", 30.0, None)}
    assert cell.gripper.kind == "none" and cell.observation == {}
    assert load_cell(write(tmp_path, "[limits]\nv_max = 0.5\n", "b.toml")).limits.v_max == (0.5,) * 6
    s = sim_cell()
    assert s.sim and set(s.cameras) == {"scene", "wrist"} and s.gripper.kind == "robotiq"


def _edit(path: str, value):
    """FULL with the value at `path` ("table.key" / "cameras.name.key") set, or removed if value is DELETE."""
    d = copy.deepcopy(FULL)
    maxsplit = {"cameras": 2, "observation": 1}.get(path.split(".")[0], -1)   # observation keys hold dots
    *parents, last = path.split(".", maxsplit)
    t = d
    for p in parents:
        t = t.setdefault(p, {})
    if value is DELETE:
        t.pop(last)
    else:
        t[last] = value
    return d


DELETE = object()


@pytest.mark.parametrize("path,value,where,why", [
    ("robots", {"host": "x"}, "[robots]", "unknown table"),
    ("robot.hots", "x", "[robot] hots", "unknown key"),
    ("limits.v_mx", 1.0, "[limits] v_mx", "unknown key"),
    ("gripper.width", 0.05, "[gripper] width", "unknown key"),
    ("robot.host", "", "[robot] host", "address"),
    ("robot.frequency", -125, "[robot] frequency", "> 0"),
    ("robot.frequency", "fast", "[robot] frequency", "finite numbers"),
    ("robot.tcp_offset", [0, 0, 0.15], "[robot] tcp_offset", "6 finite numbers"),
    ("robot.tcp_offset", [0, 0, 0.9, 0, 0, 0], "[robot] tcp_offset", "0.5 m"),
    ("robot.home", [0, -1.5, 1.4, -1.6, -1.57, 3.3], "[robot] home", "outside [limits] q_min .. q_max"),
    ("robot.home", [0, -1.5, 1.4], "[robot] home", "6 finite numbers"),
    ("limits.v_max", 3.2, "[limits] v_max", "at most the UR5's joint speed limit (3.14159"),
    ("limits.v_max", [1.0, 1.0, 1.0, 1.0, 1.0, 3.2], "[limits] v_max", "3.2 rad/s"),
    ("limits.v_max", 0.0, "[limits] v_max", "must be > 0"),
    ("limits.v_max", [1.0] * 5, "[limits] v_max", "6 finite numbers"),
    ("limits.a_max", 1e4, "[limits] a_max", "acceleration"),
    ("limits.q_min", [3.2] * 6, "[limits] q_min", "q_min < q_max"),
    ("limits.q_max", [7.0] * 6, "[limits] q_min/q_max", "range"),
    ("limits.workspace_lo", [-0.8, 0.6, 0.02], "[limits] workspace", "below workspace_hi"),
    ("limits.workspace_hi", [0.1, 0.6, -0.1], "[limits] workspace", "below workspace_hi"),
    ("limits.workspace_hi", [0.1, 0.6], "[limits] workspace_hi", "3 finite numbers"),
    ("limits.state_timeout_s", 30.0, "[limits] state_timeout_s", "must be in"),
    ("cameras.scene.source", "usb:0", "[cameras.scene] source", "realsense:<serial>"),
    ("cameras.scene.source", "opencv:", "[cameras.scene] source", "opencv:<device"),
    ("cameras.scene.source", "realsense", "[cameras.scene] source", "got 'realsense'"),
    ("cameras.scene.source", DELETE, "[cameras.scene] source", "got None"),
    ("cameras.scene.fps", 0, "[cameras.scene] fps", "(0, 240]"),
    ("cameras.scene.fps", 500, "[cameras.scene] fps", "(0, 240]"),
    ("cameras.scene.fps", "30", "[cameras.scene] fps", "finite numbers"),
    ("cameras.scene.resolution", [480], "[cameras.scene] resolution", "2 finite numbers"),
    ("cameras.scene.resolution", [480.5, 640], "[cameras.scene] resolution", "in pixels"),
    ("cameras.scene.resolution", [4, 640], "[cameras.scene] resolution", "8 .. 4096"),
    ("cameras.scene.resolution", [480, 8192], "[cameras.scene] resolution", "8 .. 4096"),
    ("cameras.scene.exposure", 100, "[cameras.scene]", "keys are source, fps, resolution"),
    ("gripper.kind", "suction", "[gripper] kind", "got 'suction'"),
    ("gripper.kind", 3, "[gripper] kind", "got 3"),
    ("gripper.model", "3f", "[gripper] model", "2f85, 2f140"),
    ("gripper.model", ["2f85"], "[gripper] model", "got ['2f85']"),
    ("gripper.port", 70000, "[gripper] port", "a TCP port"),
    ("gripper.port", "63352", "[gripper] port", "a TCP port"),
    ("gripper.speed", 2.0, "[gripper] speed", "(0, 1]"),
    ("gripper.force", 0, "[gripper] force", "(0, 1]"),
    ("observation.observation.state", ["robot.joint_posx"], "[observation] 'observation.state'",
     "unknown source 'robot.joint_posx'"),
    ("observation.camera_0", "camera.top", "[observation] 'camera_0'", "no camera 'top' in [cameras] (scene, wrist)"),
    ("observation.camera_0", [], "[observation] 'camera_0'", "a source or a list of sources"),
    ("observation.camera_0", 3, "[observation] 'camera_0'", "a source or a list of sources"),
])
def test_every_bad_value_names_file_table_and_key(tmp_path, path, value, where, why):
    file = write(tmp_path, _edit(path, value))
    with pytest.raises(CellError) as err:
        load_cell(file)
    msg = str(err.value)
    assert msg.startswith(f"{file}: {where}"), msg
    assert why in msg, msg


@pytest.mark.parametrize("text,where,why", [
    ("robot = 3\n", "[robot]", "must be a table"),
    ("observation = \"q\"\n", "[observation]", "must be a table"),
    ("cameras = [1]\n", "[cameras]", "table of cameras"),
    ("[gripper]\nkind = \"none\"\n[observation]\nstate = [\"robot.joint_pos\", \"gripper.width\"]\n",
     "[observation] 'state'", "gripper.width: the cell has no gripper"),
    ("[robot]\nhost = \"x\"\n[robot]\nhost = \"y\"\n", "", "not valid TOML"),
    ("[robot\nhost = 1\n", "", "not valid TOML"),
])
def test_bad_documents_name_the_file(tmp_path, text, where, why):
    file = write(tmp_path, text)
    with pytest.raises(CellError) as err:
        load_cell(file)
    msg = str(err.value)
    assert msg.startswith(f"{file}: {where}") and why in msg, msg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CellError, match=rf"^{tmp_path / 'absent.toml'}: cannot read"):
        load_cell(tmp_path / "absent.toml")


# ------------------------------------------------------------------ bind
def _spec(*fields, action=ActionSpec()):
    return PolicySpec(obs=tuple(fields), action=action, dt=0.1)


def _cell(cameras=("scene",), gripper="robotiq", observation=None):
    return parse_cell({"cameras": {c: f"sim:{c}" for c in cameras}, "gripper": {"kind": gripper},
                       "observation": observation or {}}, "lab.toml")


CAM = ObsField("camera_1", "camera", (3, 96, 96), camera="wrist")
LEROBOT = _spec(ObsField("observation.state", "unknown", (9,)),
                ObsField("observation.images.scene", "camera", (3, 96, 96), camera="scene"))


def test_camera_the_cell_lacks_is_refused_naming_the_key():
    with pytest.raises(CellError, match=r"^lab\.toml: the policy needs camera 'camera_1' \(3x96x96\); the cell has "
                                        r"scene, top: add \[observation\] camera_1"):
        bind(_spec(CAM), _cell(("scene", "top")), {})
    with pytest.raises(CellError, match="'camera_1'.*no cameras"):
        bind(_spec(CAM), _cell(()), {})
    # Same name: that camera; a cell with one camera: that one; an explicit line wins over both.
    assert bind(_spec(CAM), _cell(("scene", "wrist")), {})[0].sources == ("camera.wrist",)
    assert bind(_spec(CAM), _cell(("top",)), {})[0].sources == ("camera.top",)
    b = bind(_spec(CAM), _cell(("scene", "wrist"), observation={"camera_1": "camera.scene"}), {})
    assert b[0].sources == ("camera.scene",) and needed_cameras(b) == ["scene"]


def test_one_cell_camera_never_feeds_two_policy_cameras():
    two = _spec(ObsField("camera_0", "camera", (3, 96, 96), camera="scene"), CAM)
    with pytest.raises(CellError, match=r"needs camera 'camera_1' .* the cell has scene"):
        bind(two, _cell(("scene",)), {})
    with pytest.raises(CellError, match=r"needs camera 'camera_0' .* the cell has top"):
        bind(two, _cell(("top",)), {})
    # Mapped explicitly, the lab may choose to (e.g. one camera for both while another is repaired).
    b = bind(two, _cell(("scene",), observation={"camera_1": "camera.scene"}), {})
    assert [x.sources for x in b] == [("camera.scene",), ("camera.scene",)] and needed_cameras(b) == ["scene"]


def test_lerobot_state_needs_a_mapping_then_binds():
    with pytest.raises(CellError, match=r"observation 'observation\.state' \(9 values\) has no known meaning: map "
                                        r"it in \[observation\]"):
        bind(LEROBOT, _cell(), {"goal": np.ones(3)})
    cell = load_cell_text('[cameras]\nscene = "sim:scene"\n[observation]\n'
                          '"observation.state" = ["robot.joint_pos", "task.goal"]\n')
    rng = np.random.default_rng(21)
    goal = rng.uniform(-0.5, 0.5, 3)
    bindings = bind(LEROBOT, cell, {"goal": goal})
    assert [b.sources for b in bindings] == [("robot.joint_pos", "task.goal"), ("camera.scene",)]
    # The bound state is the joints then the goal, as the mapping says.
    snap = Snapshot(0.0, rng.uniform(-2, 2, 6), rng.uniform(-1, 1, 6), task={"goal": goal})
    np.testing.assert_array_equal(ObservationBuilder(LEROBOT, bindings).state(snap), np.concatenate([snap.q, goal]))


def load_cell_text(text: str) -> Cell:
    import tomllib
    return parse_cell(tomllib.loads(text), "lab.toml")


@pytest.mark.parametrize("sources,task,match", [
    (["robot.joint_pos", "gripper.width"], {"goal": np.ones(3)}, r"'observation\.state' has 9 values, "
                                                                r"robot\.joint_pos \+ gripper\.width provide 7"),
    (["robot.joint_pos", "task.goal"], {"goal": np.ones(4)},
     r"has 9 values, robot\.joint_pos \+ task\.goal provide 10"),
    (["robot.joint_pos", "task.goal"], {}, r"'observation\.state' needs task input 'goal', the task supplies none"),
    (["robot.tcp_pose", "camera.scene"], {}, r"camera\.scene is a camera; 'observation\.state' holds low-dim"),
])
def test_mapped_sizes_and_sources_are_checked(sources, task, match):
    with pytest.raises(CellError, match=match):
        bind(LEROBOT, _cell(observation={"observation.state": sources}), task)


def test_sliced_key_binds_to_a_larger_source():
    spec = _spec(ObsField("observation.state", "unknown", (3,), (0, 3)))
    assert bind(spec, _cell(observation={"observation.state": "robot.tcp_pose"}), {})[0].sources == ("robot.tcp_pose",)
    with pytest.raises(CellError, match=r"values 0\.\.3 of its key.*gripper\.width provide 1"):
        bind(spec, _cell(observation={"observation.state": "gripper.width"}), {})


def test_diffusion_policy_names_bind_with_no_mapping():
    names = [("robot_eef_pose", "tcp_pose", "robot.tcp_pose"), ("robot_joint", "joint_pos", "robot.joint_pos"),
             ("robot_joint_vel", "joint_vel", "robot.joint_vel"),
             ("robot_eef_pose_vel", "tcp_speed", "robot.tcp_speed")]
    from dpag_engine.spec import kind_of
    fields = [ObsField(k, kind_of(k), (6,)) for k, _, _ in names]
    fields += [ObsField("camera_0", kind_of("camera_0"), (3, 240, 320), camera="camera_0"),
               ObsField("camera_1", kind_of("camera_1"), (3, 240, 320), camera="camera_1")]
    assert [f.kind for f in fields] == [k for _, k, _ in names] + ["camera", "camera"]
    bindings = bind(_spec(*fields), _cell(("camera_0", "camera_1")), {})
    assert [b.sources for b in bindings] == [(s,) for _, _, s in names] + [("camera.camera_0",), ("camera.camera_1",)]
    assert [b.field for b in bindings] == fields


def test_gripper_action_or_observation_without_gripper_is_refused():
    grip_action = _spec(ObsField("q", "joint_pos", (6,)), action=ActionSpec("joint_pos", gripper=True))
    with pytest.raises(CellError, match=r"^lab\.toml: the policy commands a gripper .* the cell has none"):
        bind(grip_action, _cell(gripper="none"), {})
    assert len(bind(grip_action, _cell(), {})) == 1
    grip_obs = _spec(ObsField("gripper_width", "gripper_width", (1,)))
    with pytest.raises(CellError, match=r"observes the gripper \('gripper_width'\), the cell has none"):
        bind(grip_obs, _cell(gripper="none"), {})
    assert bind(grip_obs, _cell(), {})[0].sources == ("gripper.width",)


def test_task_key_binds_to_the_task_input_of_its_name():
    spec = _spec(ObsField("q", "joint_pos", (6,)), ObsField("goal", "task", (3,)))
    assert [b.sources for b in bind(spec, _cell(), {"goal": np.arange(3.0)})] == [("robot.joint_pos",), ("task.goal",)]
    with pytest.raises(CellError, match=r"'goal' needs task input 'goal', the task supplies target"):
        bind(spec, _cell(), {"target": np.arange(3.0)})
    with pytest.raises(CellError, match=r"'goal' has 3 values, task\.goal provide 2"):
        bind(spec, _cell(), {"goal": np.arange(2.0)})


def test_home_default_limits_are_the_ur5_range():
    cell = parse_cell({"robot": {"home": [2 * math.pi - 0.01] + [0.0] * 5}}, "x.toml")
    assert cell.home[0] == pytest.approx(2 * math.pi - 0.01)
    with pytest.raises(CellError, match=r"^x\.toml: \[robot\] home: outside"):
        parse_cell({"robot": {"home": [2 * math.pi + 0.01] + [0.0] * 5}}, "x.toml")


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/cells/*.toml")),
                         ids=lambda p: p.name)
def test_the_shipped_cell_configs_parse(path):
    cell = load_cell(path)
    assert len(cell.cameras) == 2 and cell.gripper.kind == "robotiq" and max(cell.limits.v_max) <= math.pi
    if path.name == "sim.toml":   # the file says what the built-in emulated cell is
        built_in = sim_cell()
        assert (cell.host, cell.version, cell.cameras, cell.gripper) == \
            (built_in.host, built_in.version, built_in.cameras, built_in.gripper)
        assert np.allclose(cell.limits.v_max, built_in.limits.v_max, atol=1e-4)
        assert cell.limits.workspace_lo == built_in.limits.workspace_lo
