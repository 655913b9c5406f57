"""`python -m dpag_engine.serve` against the UR controller emulator through the real ur_rtde client.

Every run goes through `serve.main` exactly as the command line does (robot `ur5` at the emulator's
loopback address), on a small untrained reach policy: its chunks jump around inside the data's
range, which is what a limit test wants. Each fault is injected through the emulator's side
channel while the arm is servoing; the emulator's command log is then checked: every servoJ target
within the position, velocity and acceleration limits and inside the workspace box, and no servoJ
after the stop began.
"""
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dpag_engine import serve, session
from dpag_engine.checkpoint import save_checkpoint
from dpag_engine.config import PolicyConfig
from dpag_engine.envs.ur5_reach import ReachTask
from dpag_engine.kinematics import forward_kinematics
from dpag_engine.policy import DPAGPolicy
from dpag_engine.robot import SafetyLimits
from dpag_engine.spec import reach_spec
from dpag_engine.spec_io import ObservationBuilder
from dpag_engine.ursim import wait_until
from factories import ServeThread, running_emulator

pytest.importorskip("rtde_control")

CB3_HOST, ESERIES_HOST = "127.0.0.21", "127.0.0.22"
V_MAX, A_MAX = 1.0, 8.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained reach policy whose normaliser spans +-0.1 rad around home (fresh weights).

    Its chunks jump anywhere in that range, yet the TCP stays within ~10 cm of home, inside the box.
    """
    task = ReachTask()
    cfg = PolicyConfig(recipe="tiny", state_dim=9, action_dim=6)
    policy = DPAGPolicy(cfg)
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    q = torch.tensor(task.q_home, dtype=torch.float32) + 0.2 * (torch.rand(400, 6, generator=g) - 0.5)
    goal = torch.tensor(task.goal_low, dtype=torch.float32) + 0.05 * torch.rand(400, 3, generator=g)
    policy.normalizer.fit({"action": q, "state": torch.cat([q, goal], 1)})
    policy.spec = reach_spec()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", policy)


@pytest.fixture(scope="module")
def cb3():
    yield from running_emulator(CB3_HOST, "3.15", 30121)


@pytest.fixture(scope="module")
def eseries():
    yield from running_emulator(ESERIES_HOST, "5.11", 30122)


def _fresh(emu):
    emu.control.reset_faults()
    emu.control.stop_program()
    emu.control.set_joint_positions(q=list(ReachTask().q_home))
    emu.control.clear_command_log()


class ServeRun(ServeThread):
    """serve.main with this module's limits against `emu`, the servoJ commands kept apart."""

    def __init__(self, emu, ckpt, tmp_path, *extra, process=False):
        _fresh(emu)
        out = tmp_path / "serve"
        argv = ["--ckpt", str(ckpt), "--robot", "ur5", "--host", emu.host, "--episodes", "1",
                "--duration", "2.0", "--v-max", str(V_MAX), "--a-max", str(A_MAX), "--no-rt",
                "--log-dir", str(out), *extra]
        # Maps the emulator's controller clock to this process's monotonic clock (one clock per machine).
        self.offset = time.monotonic() - emu.control.now()
        super().__init__(emu, argv, out, process)

    def join(self, timeout=40.0):
        code = super().join(timeout)
        self.servoj = [e for e in self.log if e["name"] == "servoJ"]
        return code

    def ended_with_stop_commands(self):
        """The last commands the controller got were servoStop then stopScript (it logs each one at
        its next cycle, so give it a moment)."""
        def last_two():
            return [e["name"] for e in self.emu.control.command_log() if e["name"] != "servoJ"][-2:]
        return wait_until(lambda: last_two() == ["servoStop", "stopScript"], 2.0)


def check_commands_within_limits(run):
    """The controller got exactly the commands of the run log, and they respect every limit.

    Velocity and acceleration are taken against each command's loop slot time: a slot the loop
    skipped (late wake-up on this shared machine) is a longer interval, not a faster move.
    """
    q = np.array([e["doubles"][:6] for e in run.servoj])
    log = np.load(run.out / "run.npz")
    assert len(q) > 10 and np.allclose(q, log["cmd_q"][:len(q)])
    assert len(log["cmd_q"]) - len(q) <= 1      # at most the command in flight at a disconnect
    t = log["cmd_t_slot"][:len(q)]
    lim = SafetyLimits()
    assert np.all(q >= np.array(lim.q_min)) and np.all(q <= np.array(lim.q_max))
    dt = np.diff(t)
    v = np.diff(q, axis=0) / dt[:, None]
    assert np.abs(v).max() <= V_MAX * (1 + 1e-6)
    # Velocity change between interval midpoints: well defined for uneven spacing too, and a
    # subsample of a limited stream (commands the pump never sent) stays within the limit.
    a = np.diff(v, axis=0) / (0.5 * (dt[1:] + dt[:-1]))[:, None]
    assert np.abs(a).max() <= A_MAX * (1 + 1e-6)
    tcp = np.array([forward_kinematics(x)[:3] for x in q[:: max(1, len(q) // 200)]])
    assert np.all(tcp >= np.array(lim.workspace_lo)) and np.all(tcp <= np.array(lim.workspace_hi))


def check_stopped(run):
    """servoStop was the last motion command sent and no servoJ came after the stop began."""
    stops = run.summary["stop_sequence"]
    assert stops and stops[0][1] == "stop"
    t_stop = stops[0][0] - run.offset
    assert sum(e["t"] > t_stop + 0.002 for e in run.servoj) == 0


def test_serve_runs_an_episode_and_writes_the_run_log(cb3, ckpt, tmp_path):
    run = ServeRun(cb3, ckpt, tmp_path)
    assert run.join() == session.EXIT_OK, run.summary["message"]
    s = run.summary
    assert s["episodes"] == 1 and s["frequency_hz"] == 125.0 and s["plans"] >= 5
    assert s["loop"]["cycles"] > 0.8 * 125 * 2.0 and s["loop"]["fault"] == ""
    check_commands_within_limits(run)
    assert run.ended_with_stop_commands()
    log = np.load(run.out / "run.npz")
    # servoJ's time argument is the trajectory span since the last command (one period unless the
    # pump skipped one); lookahead and gain as given.
    spans = np.diff(log["cmd_t_slot"][:len(run.servoj)])
    assert np.allclose([e["doubles"][8] for e in run.servoj[1:]], np.maximum(spans, 1 / 125), rtol=1e-6)
    assert np.allclose([e["doubles"][9:11] for e in run.servoj], [0.1, 300])
    assert log["cmd_q"].shape[1] == 6 and len(log["cmd_q"]) == len(log["cmd_t_slot"])
    assert log["plan_actions"].shape[1:] == (16 - 2 + 1, 6)     # every future row of the prediction
    assert np.all(np.diff(log["obs_t"]) > 0)
    assert np.all(np.diff(log["cmd_t_slot"]) > 0)                      # monotone command timestamps
    assert s["rtc"] and log["plan_committed"][1:].min() >= 1           # real-time chunking is the default
    for name in ("joints", "plan_latency", "loop_period", "tcp_paths"):
        assert (run.out / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
def test_serve_picks_500_hz_on_an_eseries(eseries, ckpt, tmp_path):
    run = ServeRun(eseries, ckpt, tmp_path, "--mode", "guided", "--no-rtc")
    assert run.join() == session.EXIT_OK, run.summary["message"]
    assert run.summary["frequency_hz"] == 500.0 and run.summary["runtime"] == "cpp"  # guided on the C++ engine
    assert not run.summary["rtc"] and not np.load(run.out / "run.npz")["plan_committed"].any()
    check_commands_within_limits(run)


@pytest.mark.slow
def test_servol_streams_the_same_trajectory_as_tool_poses(cb3, ckpt, tmp_path):
    run = ServeRun(cb3, ckpt, tmp_path, "--servo", "servoL", "--runtime", "torch")
    assert run.join() == session.EXIT_OK, run.summary["message"]
    assert run.summary["runtime"] == "torch"
    servol = [e for e in run.log if e["name"] == "servoL"]
    log = np.load(run.out / "run.npz")
    assert not run.servoj and len(servol) == len(log["cmd_q"])
    poses = np.array([e["doubles"][:6] for e in servol])
    assert np.allclose(poses[:, :3], [forward_kinematics(q)[:3] for q in log["cmd_q"]], atol=1e-9)
    # The controller's IK stayed on the commanded branch (another branch is ~1 rad away); what is
    # left is tracking lag of a moving arm.
    assert np.abs(log["state_q"][-1] - log["cmd_q"][-1]).max() < 0.1


@pytest.mark.parametrize("fault, words", [
    ("protective_stop", "protective stop"),
    ("emergency_stop", "emergency stop"),
    ("stop_program", "not running"),
    ("drop_connections", "connection"),
    ("freeze_stream", "stale"),
    ("nan_joints", "non-finite joint positions"),
])
def test_every_fault_ends_in_a_safe_stop(cb3, ckpt, tmp_path, fault, words):
    run = ServeRun(cb3, ckpt, tmp_path, process=fault == "freeze_stream")
    run.wait_servoing()
    if fault == "nan_joints":       # the controller reports NaN joint positions
        cb3.control.set_joint_positions(q=[math.nan] * 6)
    else:
        getattr(cb3.control, fault)(**({"refuse_s": 1.0} if fault == "drop_connections" else {}))
    code = run.join()
    assert code == session.EXIT_ROBOT_FAULT, run.summary["message"]
    assert words in run.summary["message"]
    check_commands_within_limits(run)
    check_stopped(run)
    if fault == "freeze_stream":   # commands still reach the controller: the arm got servoStop
        assert "servoStop" in [e["name"] for e in run.log if e["t"] > run.servoj[-1]["t"]]
        cb3.control.unfreeze_stream()
    if fault == "drop_connections":
        time.sleep(1.0)   # let the emulator accept connections again


def test_a_command_outside_the_workspace_box_stops_the_arm(cb3, ckpt, tmp_path):
    home = ReachTask().home_tcp
    box = [*(home - [0.5, 0.5, 0.005]), *(home + [0.5, 0.5, 0.5])]   # the floor 5 mm under home
    run = ServeRun(cb3, ckpt, tmp_path, "--workspace", *map(str, box))
    assert run.join() == session.EXIT_ROBOT_FAULT
    assert "outside the workspace box" in run.summary["message"]
    q = np.array([e["doubles"][:6] for e in run.servoj])
    assert np.all(np.array([forward_kinematics(x)[2] for x in q]) >= box[2])
    check_stopped(run)


def test_non_finite_actions_hold_then_stop(cb3, ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = session.TimedPlanner.__call__

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * np.nan if calls["n"] == 4 else out
    monkeypatch.setattr(session.TimedPlanner, "__call__", poisoned)
    run = ServeRun(cb3, ckpt, tmp_path)
    assert run.join() == session.EXIT_BAD_VALUES
    assert "non-finite actions" in run.summary["message"]
    check_commands_within_limits(run)
    q = np.array([e["doubles"][:6] for e in run.servoj])
    assert np.abs(q[-1] - q[-2]).max() * 125 < 1e-2        # brought to rest before stopping
    assert run.ended_with_stop_commands()


@pytest.mark.slow
def test_late_plans_keep_the_previous_chunk_and_a_stalled_planner_stops(cb3, ckpt, tmp_path):
    late = ServeRun(cb3, ckpt, tmp_path, "--simulate-delay", "300")
    assert late.join() == session.EXIT_OK, late.summary["message"]
    assert late.summary["scheduler"]["actions_dropped_stale"] > 0       # latency compensation dropped the past
    stalled = ServeRun(cb3, ckpt, tmp_path, "--simulate-delay", "1500", "--abort-after", "1.0")
    assert stalled.join() == session.EXIT_PLANNER_STALLED
    assert "no plan accepted" in stalled.summary["message"]
    check_commands_within_limits(stalled)
    q = np.array([e["doubles"][:6] for e in stalled.servoj])
    assert np.abs(q[-1] - q[-2]).max() * 125 < 1e-2        # it was holding at rest


def test_bad_checkpoint_and_unreachable_controller_are_clear_errors(ckpt, tmp_path, capsys):
    assert serve.main(["--ckpt", str(tmp_path / "missing.pt")]) == 1
    assert "no such file" in capsys.readouterr().err
    # Nothing listens on this address: no emulator, no arm.
    code = serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--host", "127.0.0.29", "--log-dir", str(tmp_path / "s")])
    assert code == session.EXIT_ROBOT_FAULT
    assert "cannot connect to the controller at 127.0.0.29" in json.loads((tmp_path / "s" / "summary.json").read_text())["message"]


# ---- reliability: options, crashes, bad observations, memory (issue "Reliability") ----

def strict_json(path):
    """summary.json as a strict parser reads it: a bare NaN or Infinity is an error."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("option", [
    ["--v-max", "1e9"], ["--v-max", "0"], ["--v-max", "-1"], ["--v-max", "nan"], ["--a-max", "1e9"],
    ["--a-max", "0"], ["--a-max", "inf"], ["--frequency", "10000"], ["--frequency", "100"],
    ["--episodes", "0"], ["--episodes", "-2"], ["--inference-steps", "0"], ["--inference-steps", "1000"],
    ["--hold-after", "0"], ["--hold-after", "100"], ["--watchdog-hz", "0"], ["--watchdog-hz", "1e6"],
    ["--rtc-soft-steps", "-3"], ["--rtc-soft-steps", "1000"], ["--state-timeout", "0"],
    ["--state-timeout", "100"], ["--duration", "0"], ["--duration", "-1"], ["--duration", "1e9"],
    ["--plan-hz", "1000"], ["--plan-hz", "0"], ["--abort-after", "0"], ["--threads", "0"], ["--seed", "-1"],
    ["--gain", "5"], ["--lookahead-time", "1"], ["--simulate-delay", "-5"], ["--candidates", "0"], ["--candidates", "9"],
    ["--workspace", "0.5", "0", "0", "0", "1", "1"],
])
def test_every_option_outside_what_the_arm_allows_is_refused_before_connecting(ckpt, tmp_path, capsys, option):
    """Nothing listens at this address: an option that got past the checks would end in a
    connection failure (exit 2) and a log folder; a refused one exits 1 naming the option."""
    out = tmp_path / "s"
    code = serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--host", "127.0.0.29", "--log-dir", str(out), *option])
    err = capsys.readouterr().err
    assert code == session.EXIT_USAGE, err
    assert option[0] in err and not out.exists()


def test_options_the_emulated_controller_does_not_allow(ckpt, tmp_path, capsys):
    assert serve.main(["--ckpt", str(ckpt), "--robot", "sim", "--frequency", "500", "--log-dir", str(tmp_path)]) == 1
    assert "--frequency 500.0: the controller servos at 125 Hz" in capsys.readouterr().err
    assert serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--log-dir", str(tmp_path)]) == 1
    assert "--robot ur5 needs the controller's address" in capsys.readouterr().err


def test_a_rate_the_real_controller_does_not_run_is_refused_before_servoing(cb3, ckpt, tmp_path):
    """A CB3 at --robot ur5 is only known to be a CB3 once its dashboard answers: 500 Hz is refused
    then, before the RTDE session, and not one command reaches the arm."""
    _fresh(cb3)
    code = serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--host", cb3.host, "--frequency", "500",
                       "--log-dir", str(tmp_path / "s")])
    summary = strict_json(tmp_path / "s" / "summary.json")
    assert code == session.EXIT_USAGE and "--frequency: 500 Hz: a controller 3.x servos at 125 Hz" in summary["message"]
    assert not [e for e in cb3.control.command_log() if e["name"] in ("servoJ", "servoL")]


@pytest.mark.parametrize("bug", [LookupError, RuntimeError])
def test_a_crash_while_the_arm_moves_is_recorded_as_a_crash_after_bringing_it_to_rest(cb3, ckpt, tmp_path,
                                                                                        monkeypatch, bug):
    """Before: an exception outside RuntimeError/OSError left summary.json saying exit 0, "done",
    and a RuntimeError once servoing was re-raised the same way."""
    calls = {"n": 0}
    real = session.TimedPlanner.__call__

    def buggy(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise bug("injected bug")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(session.TimedPlanner, "__call__", buggy)
    run = ServeRun(cb3, ckpt, tmp_path)
    assert run.join() == session.EXIT_INTERNAL
    summary = strict_json(run.out / "summary.json")
    assert summary["exit_code"] == session.EXIT_INTERNAL
    assert summary["message"] == f"internal error: {bug.__name__}: injected bug"
    assert "in buggy" in summary["traceback"]
    check_commands_within_limits(run)
    q = np.array([e["doubles"][:6] for e in run.servoj])
    assert np.abs(q[-1] - q[-2]).max() * 125 < 1e-2        # brought to rest before stopping
    assert run.ended_with_stop_commands()


def test_a_huge_observation_is_refused_by_name_and_the_arm_brought_to_rest(cb3, ckpt, tmp_path, monkeypatch):
    """1e30 in one state element used to give all-NaN actions from the reference planner."""
    calls = {"n": 0}
    real = ObservationBuilder.state

    def sensor_glitch(self, snap):
        calls["n"] += 1
        state = real(self, snap)
        if calls["n"] == 12:
            state[7] = 1e30
        return state
    monkeypatch.setattr(ObservationBuilder, "state", sensor_glitch)
    run = ServeRun(cb3, ckpt, tmp_path, "--runtime", "torch", "--no-rtc", "--plan-hz", "10")
    assert run.join() == session.EXIT_BAD_VALUES
    assert "obs['state']: the value at index (0, 1, 7)" in run.summary["message"]
    q = np.array([e["doubles"][:6] for e in run.servoj])
    assert np.abs(q[-1] - q[-2]).max() * 125 < 1e-2
    assert run.ended_with_stop_commands()


def test_the_stop_sequence_records_what_each_call_returned(cb3, ckpt, tmp_path):
    """Under a protective stop ur_rtde's servoStop returns False: the log used to say it was done."""
    run = ServeRun(cb3, ckpt, tmp_path)
    assert run.join() == session.EXIT_OK
    assert [w for _, w in run.summary["stop_sequence"]] == ["stop", "servoStop: returned True", "stopScript: done"]
    run = ServeRun(cb3, ckpt, tmp_path)
    run.wait_servoing()
    cb3.control.protective_stop()
    assert run.join() == session.EXIT_ROBOT_FAULT
    said = [w for _, w in run.summary["stop_sequence"]]
    assert said[0] == "stop" and said[1] in ("servoStop: returned False", "servoStop: returned True"), said


def test_a_refused_connection_is_said_in_plain_words(ckpt, tmp_path, capsys):
    code = serve.main(["--ckpt", str(ckpt), "--robot", "ur5", "--host", "127.0.0.29", "--log-dir", str(tmp_path / "s")])
    assert code == session.EXIT_ROBOT_FAULT
    message = strict_json(tmp_path / "s" / "summary.json")["message"]
    assert "127.0.0.29:29999 (dashboard server) refused the connection: nothing listens there" in message
    assert "Timeout connecting" not in message
    out = capsys.readouterr().out
    assert "no plots (nothing ran)" in out and "joints.png" not in out


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS")), None)
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_memory_stays_flat_at_500_hz(eseries, ckpt, tmp_path):
    """A short soak: serve at 500 Hz for 40 s as a child process, its RSS sampled once a second.
    Before the run log streamed to disk, memory grew ~20 MB a minute at 500 Hz (every command,
    state and plan kept in Python lists)."""
    _fresh(eseries)
    out = tmp_path / "soak"
    proc = subprocess.Popen([sys.executable, "-m", "dpag_engine.serve", "--ckpt", str(ckpt), "--robot", "ur5",
                             "--host", eseries.host, "--episodes", "1", "--duration", "40", "--no-rt",
                             "--v-max", str(V_MAX), "--a-max", str(A_MAX), "--log-dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []   # (seconds since the arm started moving, RSS MB)
    start = None
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            moving = sum(e["name"] == "servoJ" for e in eseries.control.command_log()[-5:]) > 0
            if moving and start is None:
                start = time.monotonic()
            if start is not None:
                rss = rss_mb(proc.pid)
                if rss is not None:   # None: the process is exiting
                    samples.append((time.monotonic() - start, rss))
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == session.EXIT_OK
    t, rss = np.array(samples).T
    # After warm-up (the planner's caches, the first chunk of every log) and before the episode ends
    # (then the run log is folded into run.npz and plotted, which takes memory once).
    late = (t >= 10.0) & (t <= 37.0)
    growth_mb_per_min = np.polyfit(t[late], rss[late], 1)[0] * 60
    assert growth_mb_per_min < 3.0, f"RSS grew {growth_mb_per_min:.1f} MB/min: {samples}"
    assert len(np.load(out / "run.npz")["cmd_q"]) > 0.9 * 500 * 40
    assert not (out / "stream").exists() or not any((out / "stream").iterdir())
