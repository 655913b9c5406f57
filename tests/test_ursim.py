"""The UR controller emulator (dpag_engine.ursim) driven by the real ur_rtde 1.6.5 client.

ur_rtde's pybind constructors hold the GIL, so every emulator a ur_rtde client talks to
runs in a child process (EmulatorProcess) on its own 127.0.0.N address; faults and the
command log go through the emulator's JSON control port. Raw-socket protocol checks use
an in-process emulator. All waits are bounded; fixtures stop every emulator they start.
"""
import math
import socket
import struct
import threading
import time
from importlib import metadata

import numpy as np
import pytest

from dpag_engine.ursim import EmulatorProcess, URControllerEmulator, forward_kinematics, wait_until
from dpag_engine.ursim import protocol as P
from dpag_engine.ursim.kinematics import fk_matrix, inverse_kinematics, matrix_from_rotvec

rtde_control = pytest.importorskip("rtde_control")
rtde_receive = pytest.importorskip("rtde_receive")
dashboard_client = pytest.importorskip("dashboard_client")

CB3_HOST, ESERIES_HOST, RAW_HOST = "127.0.0.11", "127.0.0.12", "127.0.0.13"
HOME = [0.0, -1.57, 1.57, -1.57, -1.57, 0.0]
PROTECTIVE_STOP, ROBOT_EMERGENCY_STOP, POWER_OFF = 3, 7, 3
STOPPED, PLAYING = 1, 2


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cb3():
    emu = EmulatorProcess(CB3_HOST, "3.15", control_port=30111)
    emu.start()
    yield emu
    assert emu.stop() == 0, emu.output()


@pytest.fixture(scope="module")
def eseries():
    emu = EmulatorProcess(ESERIES_HOST, "5.11", control_port=30112)
    emu.start()
    yield emu
    assert emu.stop() == 0, emu.output()


@pytest.fixture(params=["cb3", "eseries"])
def emu(request):
    """Either emulator, reset to a clean, unfaulted arm at HOME with no program running."""
    e = request.getfixturevalue(request.param)
    _reset(e)
    return e


def _reset(e):
    e.control.reset_faults()
    e.control.stop_program()
    e.control.set_joint_positions(q=HOME)
    e.control.clear_command_log()


class Clients:
    """Creates ur_rtde interfaces and disconnects all of them at teardown."""

    def __init__(self):
        self.made = []

    def receive(self, host):
        r = rtde_receive.RTDEReceiveInterface(host)
        self.made.append(r)
        return r

    def control(self, host):
        t = time.monotonic()
        c = rtde_control.RTDEControlInterface(host)
        self.connect_s = time.monotonic() - t
        self.made.append(c)
        return c

    def dashboard(self, host):
        d = dashboard_client.DashboardClient(host)
        d.connect()
        self.made.append(d)
        return d

    def close(self):
        for obj in reversed(self.made):
            try:
                obj.disconnect()
            except RuntimeError:
                pass


@pytest.fixture
def clients():
    c = Clients()
    yield c
    c.close()


def servo_trajectory(c, r, rate, duration, amplitude=0.2):
    """servoJ a smooth (1 - cos) move of joints 0 and 5 at `rate` Hz; returns the targets sent."""
    q0 = np.array(r.getActualQ())
    n = int(rate * duration)
    sent = []
    for k in range(n + 1):
        t_start = c.initPeriod()
        s = 0.5 * (1 - math.cos(math.pi * k / n))
        q = q0.copy()
        q[0] += amplitude * s
        q[5] -= amplitude * s
        assert c.servoJ(q.tolist(), 0.5, 0.5, 1.0 / rate, 0.1, 300)
        sent.append(q)
        # The arm lags the stream by a cycle or two; at <= 0.27 rad/s that is far below 0.02 rad.
        assert np.max(np.abs(np.array(r.getActualQ()) - q)) < 0.02
        c.waitPeriod(t_start)
    return np.array(sent)


# ------------------------------------------------------------------- kinematics
def test_fk_zero_configuration_matches_ur5_dh():
    # All joints at 0: the arm lies along -x, offsets d4+d6 along -y, z = d1 - d5.
    pose = forward_kinematics([0.0] * 6)
    assert np.allclose(pose[:3], [-0.81725, -0.19145, -0.005491], atol=1e-9)
    q = np.array([0.3, -1.2, 1.4, -1.7, -1.5, 0.4])
    assert np.allclose(matrix_from_rotvec(forward_kinematics(q)[3:]), fk_matrix(q)[:3, :3], atol=1e-12)
    q_ik = inverse_kinematics(forward_kinematics(q), q + 0.05)
    assert q_ik is not None and np.allclose(q_ik, q, atol=1e-6)


# ----------------------------------------------------------- raw RTDE protocol
def _rtde_request(sock, mtype, payload=b""):
    sock.sendall(P.frame(mtype, payload))
    return _rtde_read(sock)


def _rtde_read(sock):
    head = _read_exact(sock, 3)
    size, mtype = P.HEADER.unpack(head)
    return mtype, _read_exact(sock, size - 3)


def _read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "emulator closed the connection"
        data += chunk
    return data


def test_rtde_server_recipes_not_found_in_use_and_rate_cap():
    with URControllerEmulator(RAW_HOST, "3.15") as emu:
        a = socket.create_connection((RAW_HOST, 30004), timeout=3)
        b = socket.create_connection((RAW_HOST, 30004), timeout=3)
        try:
            assert _rtde_request(a, P.REQUEST_PROTOCOL_VERSION, struct.pack(">H", 2)) == (86, b"\x01")
            _, ver = _rtde_request(a, P.GET_URCONTROL_VERSION)
            assert struct.unpack(">IIII", ver)[:2] == (3, 15)
            # Unknown output and an e-Series-only output on a CB3 -> NOT_FOUND, id 0.
            _, rep = _rtde_request(a, P.SETUP_OUTPUTS, struct.pack(">d", 125) + b"timestamp,bogus,ft_raw_wrench,")
            assert rep[0] == 0 and rep[1:].decode().split(",") == ["DOUBLE", "NOT_FOUND", "NOT_FOUND"]
            # Input recipe ids count from 1 per connection; another client gets IN_USE.
            assert _rtde_request(a, P.SETUP_INPUTS, b"input_int_register_0,")[1] == b"\x01INT32"
            assert _rtde_request(a, P.SETUP_INPUTS, b"input_int_register_0,input_double_register_0,")[1][0] == 2
            _, rep = _rtde_request(b, P.SETUP_INPUTS, b"input_double_register_1,input_int_register_0,")
            assert rep[0] == 0 and b"IN_USE" in rep
            assert _rtde_request(b, P.SETUP_INPUTS, b"input_double_register_1,")[1][0] == 1
            # Ask a CB3 for 500 Hz: it streams at its 125 Hz limit.
            _, rep = _rtde_request(a, P.SETUP_OUTPUTS, struct.pack(">d", 500) + b"timestamp,actual_q,runtime_state,")
            assert rep[0] == 1 and rep[1:] == b"DOUBLE,VECTOR6D,UINT32"
            assert _rtde_request(a, P.START) == (83, b"\x01")
            stamps = []
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:
                mtype, payload = _rtde_read(a)
                assert mtype == P.DATA_PACKAGE and len(payload) == 1 + 8 + 48 + 4
                stamps.append(struct.unpack_from(">d", payload, 1)[0])
            rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
            assert 100 < rate < 135, rate
            # A data package writes the registers (int register 0 = command, logged).
            a.sendall(P.frame(P.DATA_PACKAGE, struct.pack(">Bi", 1, 42)))
            assert wait_until(lambda: emu.command_log(), 2.0)[0]["id"] == 42
        finally:
            a.close()
            b.close()
        # A closed connection frees its input registers.
        c = socket.create_connection((RAW_HOST, 30004), timeout=3)
        try:
            assert wait_until(lambda: _rtde_request(c, P.SETUP_INPUTS, b"input_int_register_0,")[1][0] == 1, 2.0)
        finally:
            c.close()


# ------------------------------------------------------------ real ur_rtde client
def test_receive_reads_joints_and_tcp_pose_from_fk(emu, clients):
    r = clients.receive(emu.host)
    q = np.array(r.getActualQ())
    assert np.allclose(q, HOME)
    assert np.allclose(r.getActualTCPPose(), forward_kinematics(q), atol=1e-9)
    emu.control.set_joint_positions(q=[0.1, -1.2, 1.3, -1.6, -1.4, 0.3])
    assert wait_until(lambda: abs(r.getActualQ()[0] - 0.1) < 1e-12, 2.0)
    assert np.allclose(r.getActualTCPPose(), forward_kinematics(r.getActualQ()), atol=1e-9)
    t0 = r.getTimestamp()
    time.sleep(0.2)
    assert r.getTimestamp() > t0 + 0.1
    assert r.getRobotMode() == 7 and r.getSafetyMode() == 1 and r.getRuntimeState() == STOPPED


@pytest.mark.parametrize("kind", ["cb3", "eseries"])
def test_servoj_tracks_trajectory_then_servostop_and_stopscript(kind, clients, request):
    e = request.getfixturevalue(kind)
    _reset(e)
    rate = 125 if kind == "cb3" else 500
    r, c = clients.receive(e.host), clients.control(e.host)
    assert c.isProgramRunning()
    start = e.control.now()
    sent = servo_trajectory(c, r, rate, duration=1.2)
    assert c.servoStop(2.0)
    log = [x for x in e.control.command_log(since=start) if x["name"] == "servoJ"]
    # Every servoJ call reached the controller, in order, with the targets sent.
    assert len(log) == len(sent)
    assert np.allclose([x["doubles"][:6] for x in log], sent, atol=1e-12)
    assert np.allclose([x["doubles"][8] for x in log], 1.0 / rate)       # servoJ time argument
    # The arm followed: it ends at the final target and never ran away from it.
    assert wait_until(lambda: np.allclose(r.getActualQ(), sent[-1], atol=1e-6), 2.0)
    assert e.control.snapshot()["safety_mode"] == 1
    assert c.stopScript() is None
    assert wait_until(lambda: r.getRuntimeState() == STOPPED, 2.0)
    assert not c.servoJ(sent[-1].tolist(), 0.5, 0.5, 1.0 / rate, 0.1, 300)  # no program: refused
    print(f"\nRTDEControlInterface connect on {e.version}: {clients.connect_s * 1000:.1f} ms")


def test_limit_violation_raises_protective_stop(emu, clients):
    r, c = clients.receive(emu.host), clients.control(emu.host)
    d = clients.dashboard(emu.host)
    q = r.getActualQ()
    jump = list(q)
    jump[1] += 0.5          # 0.5 rad in one servo step: far beyond v_max * 40 ms = 0.126 rad
    c.servoJ(jump, 0.5, 0.5, 0.008, 0.1, 300)
    assert wait_until(r.isProtectiveStopped, 2.0)
    assert r.getSafetyMode() == PROTECTIVE_STOP and r.getSafetyStatusBits() & (1 << 2)
    assert not c.isProgramRunning()
    assert not c.servoJ(jump, 0.5, 0.5, 0.008, 0.1, 300)       # the client refuses to command
    assert np.allclose(r.getActualQ(), q)                       # the arm did not move
    assert "PROTECTIVE_STOP" in d.safetymode()
    assert any("protective stop" in x["event"] for x in emu.control.event_log())
    # Recovery like on a real arm: unlock from the dashboard, reconnect control (re-upload).
    d.unlockProtectiveStop()
    assert wait_until(lambda: r.getSafetyMode() == 1, 2.0)
    c.disconnect()
    c2 = clients.control(emu.host)
    assert c2.isProgramRunning() and c2.servoJ(q, 0.5, 0.5, 0.008, 0.1, 300)


def test_injected_protective_and_emergency_stop_seen_by_client(eseries, clients):
    emu = eseries
    _reset(emu)
    r, c = clients.receive(emu.host), clients.control(emu.host)
    emu.control.protective_stop()
    assert wait_until(r.isProtectiveStopped, 2.0) and not c.isProgramRunning()
    assert not c.servoJ(r.getActualQ(), 0.5, 0.5, 0.008, 0.1, 300)
    emu.control.reset_faults()
    emu.control.emergency_stop()
    assert wait_until(r.isEmergencyStopped, 2.0)
    assert r.getSafetyMode() == ROBOT_EMERGENCY_STOP and r.getRobotMode() == POWER_OFF
    assert r.getRuntimeState() == STOPPED and not c.isProgramRunning()
    assert not c.servoJ(r.getActualQ(), 0.5, 0.5, 0.008, 0.1, 300)


def test_injected_program_stop_seen_by_client(cb3, clients):
    emu = cb3
    _reset(emu)
    r, c = clients.receive(emu.host), clients.control(emu.host)
    assert c.servoJ(r.getActualQ(), 0.5, 0.5, 0.008, 0.1, 300)
    emu.control.stop_program()
    assert wait_until(lambda: r.getRuntimeState() == STOPPED, 2.0)
    assert not c.isProgramRunning()
    assert not c.servoJ(r.getActualQ(), 0.5, 0.5, 0.008, 0.1, 300)


def test_injected_connection_drop_seen_by_client(cb3, clients):
    emu = cb3
    _reset(emu)
    r, c = clients.receive(emu.host), clients.control(emu.host)
    emu.control.drop_connections(refuse_s=1.0)
    # The receive interface notices the closed socket; the control interface's reconnect
    # attempt is refused while the "cable" is out, so it ends disconnected too.
    assert wait_until(lambda: not r.isConnected(), 2.0)
    assert wait_until(lambda: not c.isConnected(), 3.0)
    assert c.isProgramRunning()     # note: ur_rtde keeps its last (stale) state; trust isConnected()
    time.sleep(1.1)
    r.reconnect()
    assert r.isConnected() and np.allclose(r.getActualQ(), HOME)


@pytest.mark.slow
def test_injected_stream_freeze_seen_by_client(cb3, clients):
    _reset(cb3)
    r = clients.receive(cb3.host)
    cb3.control.freeze_stream(seconds=None)
    t0 = r.getTimestamp()
    time.sleep(0.5)
    assert r.getTimestamp() == t0                   # the data stopped: state is stale
    # ur_rtde gives up after its 2.5 s read deadline.
    assert wait_until(lambda: not r.isConnected(), 5.0)
    cb3.control.unfreeze_stream()


def test_blocking_commands_watchdog_and_unknown_commands(eseries, clients):
    _reset(eseries)
    r, c = clients.receive(eseries.host), clients.control(eseries.host)
    # moveJ blocks until the arm arrives (0.3 rad at 1 rad/s).
    target = list(HOME)
    target[0] += 0.3
    t = time.monotonic()
    assert c.moveJ(target, 1.0, 4.0)
    assert 0.25 < time.monotonic() - t < 3.0
    assert np.allclose(r.getActualQ(), target, atol=1e-6)
    # speedJ then speedStop.
    assert c.speedJ([0.2, 0, 0, 0, 0, 0], 2.0, 0.002)
    assert wait_until(lambda: r.getActualQd()[0] > 0.19, 2.0)
    assert c.speedStop(5.0)
    assert abs(r.getActualQd()[0]) < 1e-9
    # A command the emulator does not model still signals done (no 300 s client timeout).
    result = []
    th = threading.Thread(target=lambda: result.append(c.zeroFtSensor()), daemon=True)
    th.start()
    th.join(timeout=10)
    assert result == [True]
    assert eseries.control.command_log()[-1]["name"] == "zeroFtSensor"
    # The RTDE watchdog stops the program when the client stops kicking it.
    assert c.setWatchdog(20.0)
    for _ in range(10):
        c.kickWatchdog()
        time.sleep(0.01)
    assert c.isProgramRunning()
    assert wait_until(lambda: not c.isProgramRunning(), 2.0)
    assert any("watchdog" in x["event"] for x in eseries.control.event_log())


def test_servol_follows_pose_via_ik(cb3, clients):
    _reset(cb3)
    r, c = clients.receive(cb3.host), clients.control(cb3.host)
    pose = np.array(r.getActualTCPPose())
    for k in range(60):                         # 3 cm along y in 0.48 s at 125 Hz
        t_start = c.initPeriod()
        p = pose.copy()
        p[1] += 0.03 * (k + 1) / 60
        assert c.servoL(p.tolist(), 0.5, 0.5, 0.008, 0.1, 300)
        c.waitPeriod(t_start)
    assert wait_until(lambda: np.allclose(r.getActualTCPPose(), p, atol=1e-5), 2.0)
    assert c.servoStop(2.0)


def test_upper_range_registers(eseries, clients):
    _reset(eseries)
    flags = (rtde_control.RTDEControlInterface.FLAG_UPLOAD_SCRIPT
             | rtde_control.RTDEControlInterface.FLAG_UPPER_RANGE_REGISTERS)
    r = clients.receive(eseries.host)
    c = rtde_control.RTDEControlInterface(eseries.host, -1.0, flags)
    clients.made.append(c)
    assert eseries.control.snapshot()["reg_offset"] == 24      # parsed from the uploaded script
    q = r.getActualQ()
    q[2] += 0.01
    assert c.servoJ(q, 0.5, 0.5, 0.002, 0.1, 300)
    assert wait_until(lambda: abs(r.getActualQ()[2] - q[2]) < 1e-9, 2.0)


def test_two_emulators_side_by_side(cb3, eseries, clients):
    _reset(cb3)
    _reset(eseries)
    rc, re_ = clients.receive(cb3.host), clients.receive(eseries.host)
    cc, ce = clients.control(cb3.host), clients.control(eseries.host)
    start_c, start_e = cb3.control.now(), eseries.control.now()
    qc, qe = np.array(HOME), np.array(HOME)
    for k in range(100):                        # both at 125 Hz from one loop, opposite ways
        t_start = cc.initPeriod()
        qc[0] += 0.001
        qe[0] -= 0.001
        assert cc.servoJ(qc.tolist(), 0.5, 0.5, 0.008, 0.1, 300)
        assert ce.servoJ(qe.tolist(), 0.5, 0.5, 0.008, 0.1, 300)
        cc.waitPeriod(t_start)
    assert wait_until(lambda: abs(rc.getActualQ()[0] - qc[0]) < 1e-6, 2.0)
    assert wait_until(lambda: abs(re_.getActualQ()[0] - qe[0]) < 1e-6, 2.0)
    assert len(cb3.control.command_log(since=start_c)) == 100
    assert len(eseries.control.command_log(since=start_e)) == 100
    assert cb3.control.command_log(since=start_c)[-1]["doubles"][0] > 0
    assert eseries.control.command_log(since=start_e)[-1]["doubles"][0] < 0


# ---------------------------------------------------------------- handshake guard
def _control_recipes():
    """The 23 input recipes of RTDEControlInterface (ur_rtde 1.6.5), in order."""
    def i(*n):
        return [f"input_int_register_{k}" for k in n]

    def d(a, b):
        return [f"input_double_register_{k}" for k in range(a, b + 1)]
    return [
        i(0) + d(0, 7) + i(1), i(0) + d(0, 10), i(*range(8)) + d(0, 17), i(0), i(0) + d(0, 8),
        i(0) + d(0, 5), i(0) + d(0, 3), i(0) + d(0, 0), i(0, 1), i(0) + d(0, 13), i(0),
        i(0) + d(0, 11), i(0) + d(0, 7), i(0) + d(0, 13), i(0, 1), i(0) + d(0, 12),
        i(*range(7)) + d(0, 5), i(0, 1) + d(0, 6), i(0) + d(0, 0) + i(1), i(0) + d(0, 9),
        i(0) + d(0, 5) + i(1), i(0) + d(0, 17), i(0) + ["external_force_torque"]]


CONTROL_OUTPUTS = (["timestamp", "robot_status_bits", "safety_status_bits", "runtime_state"]
                   + [f"output_int_register_{k}" for k in range(3)]
                   + [f"output_double_register_{k}" for k in range(6)])


@pytest.mark.parametrize("kind,default_outputs", [("cb3", 57), ("eseries", 58)])
def test_handshake_guard(kind, default_outputs, clients, request):
    """Fails loudly when a ur_rtde upgrade changes the handshake the emulator relies on."""
    assert metadata.version("ur_rtde") == "1.6.5", "re-verify docs/ur_rtde_protocol.md, then this guard"
    emu = request.getfixturevalue(kind)
    _reset(emu)
    before = len(emu.control.setup_log())
    clients.receive(emu.host)
    c = clients.control(emu.host)
    log = emu.control.setup_log()[before:]
    conns = sorted({x["conn"] for x in log})
    assert len(conns) == 2, log
    recv = [x for x in log if x["conn"] == conns[0]]
    ctrl = [x for x in log if x["conn"] == conns[1]]
    # RTDEReceiveInterface: default recipe (57 variables on 3.15, 58 on 5.11).
    assert "".join(x["type"] for x in recv) == "VvvOS"
    assert len(recv[3]["names"]) == default_outputs
    # RTDEControlInterface: 13 outputs, then exactly these 23 input recipes with ids 1..23.
    assert "".join(x["type"] for x in ctrl) == "Vvv" + "O" + "I" * 23 + "S"
    outputs = ctrl[3]
    assert outputs["names"] == CONTROL_OUTPUTS and outputs["recipe_id"] == 1
    assert outputs["frequency"] == (125 if kind == "cb3" else 500)
    inputs = [x for x in ctrl if x["type"] == "I"]
    assert [x["names"] for x in inputs] == _control_recipes()
    assert [x["recipe_id"] for x in inputs] == list(range(1, 24))
    assert c.isProgramRunning()
