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

from dpag_engine.kinematics import fk_matrix, forward_kinematics, inverse_kinematics, matrix_from_rotvec
from dpag_engine.ursim import EmulatorProcess, URControllerEmulator, wait_until
from dpag_engine.ursim import protocol as P

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


# ------------------------------------------------------ robustness (issue #17)
# In-process emulators on their own address, so these never share ports with the fixtures above.
ROBUST_HOST = "127.0.0.14"


def _rtde_stream(sock, names=b"timestamp,", freq=500.0):
    """Set up an output recipe on a raw RTDE socket and start the stream."""
    assert _rtde_request(sock, P.REQUEST_PROTOCOL_VERSION, struct.pack(">H", 2)) == (86, b"\x01")
    _, rep = _rtde_request(sock, P.SETUP_OUTPUTS, struct.pack(">d", freq) + names)
    assert rep[0] == 1, rep
    assert _rtde_request(sock, P.START) == (83, b"\x01")


def _stream_stamps(sock, seconds):
    """Timestamps of the data packages (recipe starting with `timestamp`) read for `seconds`."""
    stamps = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        mtype, payload = _rtde_read(sock)
        if mtype == P.DATA_PACKAGE:
            stamps.append(struct.unpack_from(">d", payload, 1)[0])
    return stamps


def _assert_streaming(sock, seconds=0.3):
    """The stream is alive: packages keep arriving, with fresh timestamps, at the full rate."""
    stamps = _stream_stamps(sock, seconds)
    assert len(stamps) > 0.5 * 500 * seconds and stamps[-1] - stamps[0] > 0.5 * seconds, stamps[-3:]


def _read_until_eof(sock, timeout):
    """Everything the peer sends until it closes; fails if it is still open after `timeout`."""
    data, deadline = b"", time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"still open after {timeout} s; got {data[:200]!r}")
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def robust():
    """An in-process e-Series emulator (500 Hz) and a raw RTDE witness client that streams from it."""
    with URControllerEmulator(ROBUST_HOST, "5.11") as emu:
        w = socket.create_connection((ROBUST_HOST, 30004), timeout=3)
        _rtde_stream(w)
        try:
            yield emu, w
        finally:
            w.close()


def _events(emu, text):
    return [e["event"] for e in emu.event_log() if text in e["event"]]


def test_oversized_setup_outputs_gets_failure_reply_and_stream_survives(robust):
    emu, w = robust
    a = socket.create_connection((ROBUST_HOST, 30004), timeout=3)
    try:
        # 1400 x 48 bytes: its data package would be over the protocol's 65535-byte limit. Before the
        # fix this recipe was accepted and the package's struct.error killed the timing thread.
        mtype, rep = _rtde_request(a, P.SETUP_OUTPUTS, struct.pack(">d", 500) + b"actual_q," * 1400)
        assert mtype == P.SETUP_OUTPUTS and rep[0] == 0 and b"NOT_FOUND" in rep
        assert _rtde_request(a, P.START)[0] == P.START
        _assert_streaming(w)
        # A request whose reply (10 bytes of "NOT_FOUND," per 2-byte name) could not fit one package.
        for mtype in (P.SETUP_OUTPUTS, P.SETUP_INPUTS):
            payload = (struct.pack(">d", 125) if mtype == P.SETUP_OUTPUTS else b"") + b"x," * 30000
            got, rep = _rtde_request(a, mtype, payload)
            assert got == mtype and rep[0] == 0 and rep.startswith(b"\x00NOT_FOUND")
        # The same limit for input recipes: a package a client could never send is refused.
        _, rep = _rtde_request(a, P.SETUP_INPUTS, b"external_force_torque," * 1400)
        assert rep[0] == 0 and b"NOT_FOUND" in rep
        assert _rtde_request(a, P.GET_URCONTROL_VERSION)[0] == P.GET_URCONTROL_VERSION   # still served
        _assert_streaming(w)
    finally:
        a.close()


def test_malformed_rtde_requests_get_failure_replies(robust):
    emu, w = robust
    a = socket.create_connection((ROBUST_HOST, 30004), timeout=3)
    try:
        assert _rtde_request(a, P.REQUEST_PROTOCOL_VERSION, b"") == (86, b"\x00")        # no version
        assert _rtde_request(a, P.REQUEST_PROTOCOL_VERSION, struct.pack(">H", 1)) == (86, b"\x00")
        assert _rtde_request(a, P.SETUP_OUTPUTS, b"\x00\x01")[1] == b"\x00"             # no frequency
        _, rep = _rtde_request(a, P.SETUP_OUTPUTS, struct.pack(">d", 125) + b"\xff\xfe,timestamp,")
        assert rep == b"\x00NOT_FOUND,DOUBLE"                                          # not UTF-8
        _, rep = _rtde_request(a, P.SETUP_INPUTS, b"\xff,input_int_register_0,")
        assert rep == b"\x00NOT_FOUND,INT32"
        _, rep = _rtde_request(a, P.SETUP_OUTPUTS, struct.pack(">d", float("nan")) + b"timestamp,")
        assert rep[0] == 0                                                              # bad frequency
        # Unknown message types, and data packages for no recipe, are ignored, not answered.
        a.sendall(P.frame(0x7A, b"junk") + P.frame(P.DATA_PACKAGE, b"\x09abc") + P.frame(P.DATA_PACKAGE))
        assert _rtde_request(a, P.GET_URCONTROL_VERSION)[0] == P.GET_URCONTROL_VERSION
        _assert_streaming(w)
        assert emu.snapshot()["handler_errors"] == 0
    finally:
        a.close()


def _send_script(text):
    with socket.create_connection((ROBUST_HOST, 30003), timeout=3) as s:
        s.sendall(text.encode())


def test_script_with_out_of_range_register_offset_is_refused(robust):
    emu, w = robust
    # Before the fix the offset indexed past the 48 registers: the script thread raised, and the
    # next controller cycle raised too, which ended the timing thread (no more data for anyone).
    for offset in ("100", "25", "9" * 5000):
        _send_script(f"def rtde_control():\n  global reg_offset_int = # int register offset\n{offset}\n"
                     "  textmsg(1)\nend\n")
        assert wait_until(lambda: _events(emu, "register offset"), 2.0)
        assert emu.snapshot()["runtime_state"] == 1                      # STOPPED: not started
        _assert_streaming(w)
        emu.clear_event_log()
    _send_script("def rtde_control():\n  global reg_offset_int = 24\nend\n")  # upper range: fine
    assert wait_until(lambda: emu.snapshot()["runtime_state"] == PLAYING, 2.0)
    assert emu.snapshot()["reg_offset"] == 24
    _assert_streaming(w)


def test_dashboard_line_length_is_bounded(robust):
    emu, _ = robust
    with socket.create_connection((ROBUST_HOST, 29999), timeout=3) as d:
        assert d.recv(4096).startswith(b"Connected")
        # Before the fix the emulator kept buffering a line without newline forever (39 MB: +63 MB RSS).
        d.sendall(b"x" * 8192)
        reply = _read_until_eof(d, 3.0)
        assert b"too long" in reply
    with socket.create_connection((ROBUST_HOST, 29999), timeout=3) as d:     # others still served
        f = d.makefile("rb")
        f.readline()
        d.sendall(b"robotmode\n")
        assert f.readline() == b"Robotmode: RUNNING\n"


def test_script_flood_is_bounded(robust):
    import resource
    emu, w = robust
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    s = socket.create_connection((ROBUST_HOST, 30003), timeout=5)
    sent = 0
    try:
        line = b"  textmsg(\"no end in sight\")\n" * 2048
        while sent < 16 << 20:                 # 16 MiB without a program end
            s.sendall(line)
            sent += len(line)
    except OSError:
        pass                                    # the emulator closed this connection: expected
    _read_until_eof(s, 3.0)
    s.close()
    cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
    assert sent <= 4 << 20, sent                # cut off after 1 MiB (plus what the kernel buffered)
    assert _events(emu, "1 MiB")
    assert cpu < 2.0, cpu                       # before the fix: ~10 s (each chunk rescanned it all)
    _assert_streaming(w)


def test_client_that_never_reads_does_not_stall_the_stream(robust):
    emu, w = robust
    a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)    # fills within a few packages
    a.settimeout(3)
    a.connect((ROBUST_HOST, 30004))
    try:
        _rtde_stream(a, names=b"timestamp," + b"actual_q," * 60)   # ~2.9 kB at 500 Hz, never read
        stamps = _stream_stamps(w, 2.0)
        gaps = np.diff(stamps)
        # Before the fix the timing thread blocked 0.5 s in the silent client's send: one 0.5 s gap.
        assert len(stamps) > 600 and gaps.max() < 0.25, gaps.max()
        # It is dropped once the kernel's buffers (MBs, seconds of stream) and SEND_BACKLOG are full.
        assert wait_until(lambda: _events(emu, "not reading"), 6.0)
        assert wait_until(lambda: emu.snapshot()["rtde_clients"] == 1, 2.0)
    finally:
        a.close()


def test_client_that_pauses_reading_keeps_its_connection(robust):
    emu, w = robust
    a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.settimeout(3)
    a.connect((ROBUST_HOST, 30004))
    try:
        _rtde_stream(a, names=b"timestamp," + b"actual_q," * 60)
        time.sleep(1.0)         # a stalled client (a GC pause, a loaded machine)
        # The kernel's buffers absorb it: nothing is lost, and the client catches up.
        t_resume = emu.now()
        stamps = _stream_stamps(a, 1.5)
        assert stamps[-1] > t_resume + 1.0 and np.diff(stamps).max() < 0.25
        assert not _events(emu, "dropped")
        _assert_streaming(w)
    finally:
        a.close()


def test_non_finite_commands_raise_protective_stop(robust):
    emu, w = robust
    emu.set_joint_positions(HOME)
    _send_script("def rtde_control():\n  global reg_offset_int = 0\nend\n")
    assert wait_until(lambda: emu.snapshot()["runtime_state"] == PLAYING, 2.0)
    a = socket.create_connection((ROBUST_HOST, 30004), timeout=3)
    names = b"input_int_register_0," + b"".join(b"input_double_register_%d," % k for k in range(11))
    try:
        assert _rtde_request(a, P.SETUP_INPUTS, names)[1][0] == 1
        nan = float("nan")
        for cmd, doubles in ((11, [nan] * 6 + [0.5, 0.5, 0.002, 0.1, 300]),      # servoJ
                             (24, [0.1, 0.2, 1e308, nan, 0, 0] + [0.5] * 5),     # servoL (IK)
                             (9, [float("inf")] + [0] * 10)):                    # speedJ
            emu.reset_faults()
            emu.stop_program()
            _send_script("def rtde_control():\n  global reg_offset_int = 0\nend\n")
            assert wait_until(lambda: emu.snapshot()["runtime_state"] == PLAYING, 2.0)
            a.sendall(P.frame(P.DATA_PACKAGE, struct.pack(">Bi11d", 1, cmd, *doubles)))
            # Before the fix NaN reached the joints (servoJ) or raised in IK inside the timing thread.
            assert wait_until(lambda: emu.snapshot()["safety_mode"] != 1, 2.0), cmd
            assert np.all(np.isfinite(emu.snapshot()["q"])) and np.allclose(emu.snapshot()["q"], HOME)
            a.sendall(P.frame(P.DATA_PACKAGE, struct.pack(">Bi11d", 1, 0, *[0.0] * 11)))   # clear
            assert wait_until(lambda: emu.in_int[0] == 0, 2.0)
        _assert_streaming(w)
        assert emu.snapshot()["tick_errors"] == 0
    finally:
        a.close()


def test_timing_thread_and_handlers_survive_unexpected_errors(robust, monkeypatch):
    emu, w = robust
    original = emu._update_values
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] % 50 == 0:
            raise RuntimeError("injected cycle fault")
        original()
    monkeypatch.setattr(emu, "_update_values", flaky)
    _assert_streaming(w, 0.5)               # before the fix the first fault ended the timing thread
    assert _events(emu, "injected cycle fault") and emu.snapshot()["tick_errors"] >= 1
    monkeypatch.setattr(emu, "_update_values", original)
    # A handler's unexpected error closes that one connection, is logged, and nothing else stops.
    monkeypatch.setattr(emu, "_data_package", lambda conn, payload: 1 / 0)
    a = socket.create_connection((ROBUST_HOST, 30004), timeout=3)
    a.sendall(P.frame(P.DATA_PACKAGE, b"\x01"))
    assert _read_until_eof(a, 3.0) == b""
    a.close()
    assert wait_until(lambda: _events(emu, "ZeroDivisionError"), 2.0)
    assert emu.snapshot()["handler_errors"] == 1
    _assert_streaming(w)


def test_command_log_is_a_bounded_ring_with_a_drop_counter():
    with URControllerEmulator(ROBUST_HOST, "5.11", log_size=100) as emu:
        a = socket.create_connection((ROBUST_HOST, 30004), timeout=3)
        try:
            names = b"input_int_register_0," + b"".join(b"input_double_register_%d," % k for k in range(11))
            assert _rtde_request(a, P.SETUP_INPUTS, names)[1][0] == 1
            a.sendall(b"".join(P.frame(P.DATA_PACKAGE, struct.pack(">Bi11d", 1, 1000 + k, *[k * 0.5] * 11))
                               for k in range(250)))
            assert wait_until(lambda: emu.snapshot()["log_dropped"] == 150, 3.0)
            log = emu.command_log()
            assert [e["id"] for e in log] == list(range(1150, 1250))      # the newest 100, in order
            assert log[-1]["doubles"] == tuple([249 * 0.5] * 11) and log[-1]["ints"] == ()
            assert log[-1]["name"] == "cmd1249"
            emu.clear_command_log()
            assert emu.command_log() == [] and emu.snapshot()["log_dropped"] == 0
        finally:
            a.close()


def test_full_command_log_is_small():
    """A long run's memory stays flat: the log is capped, and a full log costs a few MB."""
    import tracemalloc
    from dpag_engine.ursim.rtde import RtdeConnection as _Connection
    emu = URControllerEmulator(ROBUST_HOST, "5.11")            # not started: no sockets needed
    cap = emu.command_log_capacity
    assert cap >= 20_000                                        # 40 s of servoJ at 500 Hz
    conn = _Connection(None, None, 1)
    names = ["input_int_register_0"] + [f"input_double_register_{k}" for k in range(11)]
    conn.inputs.append(P.Recipe(1, names, [P.INPUT_TYPES[n] for n in names]))
    tracemalloc.start()
    try:
        for k in range(cap + 1000):
            emu._data_package(conn, struct.pack(">Bi11d", 1, 11, *[k * 1e-3] * 11))
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert emu.snapshot()["log_dropped"] == 1000
    assert size < 300 * cap, f"{size / cap:.0f} bytes per logged command"


def test_connections_leave_no_threads_behind(robust):
    emu, w = robust
    before = list(emu._threads)
    base = len(before)
    for _ in range(30):
        with socket.create_connection((ROBUST_HOST, 29999), timeout=3) as d:
            d.recv(100)
    # Every thread these connections started has ended (counting live threads against `base` could
    # pass early: a thread of an earlier test that ends meanwhile makes room for one still running).
    assert wait_until(lambda: not any(t.is_alive() for t in emu._threads if t not in before), 3.0)
    with socket.create_connection((ROBUST_HOST, 29999), timeout=3) as d:   # pruned on the next accept
        d.recv(100)
        assert len(emu._threads) <= base + 1


def test_setup_log_entries_are_bounded(robust):
    emu, w = robust
    a = socket.create_connection((ROBUST_HOST, 30004), timeout=3)
    try:
        _rtde_request(a, P.SETUP_OUTPUTS, struct.pack(">d", 125) + b"x," * 30000)
        _rtde_request(a, P.SETUP_INPUTS, b"y" * 60000 + b",")
    finally:
        a.close()
    big = emu.setup_log()[-2:]
    assert big[0]["n_names"] == 30000 and len(big[0]["names"]) <= 64
    assert big[1]["n_names"] == 1 and len(big[1]["names"][0]) <= 64


def test_connection_count_is_bounded(robust):
    from dpag_engine.ursim.server import MAX_CLIENTS
    emu, w = robust
    socks, banners = [], []
    try:
        # One thread per connection: past MAX_CLIENTS (the witness is one) a new one is closed at once.
        for _ in range(MAX_CLIENTS + 10):
            socks.append(socket.create_connection((ROBUST_HOST, 29999), timeout=3))
            banners.append(socks[-1].recv(100))
        assert sum(b.startswith(b"Connected") for b in banners) == MAX_CLIENTS - 1
        assert banners[-1] == b""
        assert _events(emu, "too many connections")
        _assert_streaming(w)
    finally:
        for s in socks:
            s.close()

    def banner():
        with socket.create_connection((ROBUST_HOST, 29999), timeout=3) as d:
            return d.recv(100).startswith(b"Connected")
    assert wait_until(banner, 3.0)                  # served again once the others have closed


def test_reading_a_full_command_log_does_not_stall_the_stream(eseries):
    """json.dumps holds the GIL for its whole call: one call on a 20k-entry command log stopped the
    timing thread for ~100 ms (more on a loaded machine, past serve's 200 ms staleness limit)."""
    _reset(eseries)
    host = eseries.host
    a = socket.create_connection((host, 30004), timeout=3)
    w = socket.create_connection((host, 30004), timeout=3)
    try:
        names = b"input_int_register_0," + b"".join(b"input_double_register_%d," % k for k in range(11))
        assert _rtde_request(a, P.SETUP_INPUTS, names)[1][0] == 1
        for j in range(20):
            a.sendall(b"".join(P.frame(P.DATA_PACKAGE, struct.pack(">Bi11d", 1, 11, *[k * 1e-3] * 11))
                               for k in range(1000)))
        assert wait_until(lambda: len(eseries.control.command_log()) == 20_000, 20.0, interval=0.2)
        _rtde_stream(w)
        stamps, stop = [], threading.Event()

        def witness():
            while not stop.is_set():
                stamps.extend(_stream_stamps(w, 0.1))
        reader = threading.Thread(target=witness, daemon=True)
        reader.start()
        t0 = eseries.control.now()
        try:
            with socket.create_connection((host, 30112), timeout=10) as s:
                for _ in range(4):          # read the raw reply: the time is the emulator's
                    s.sendall(b'{"op": "command_log"}\n')
                    reply = b""
                    while not reply.endswith(b"\n"):
                        reply += s.recv(1 << 20)
                    assert reply.startswith(b'{"ok": true') and reply.count(b'"servoJ"') == 20_000
                    time.sleep(0.1)
            t1 = eseries.control.now()
            time.sleep(0.1)
        finally:
            stop.set()
            reader.join(5)
    finally:
        a.close()
        w.close()
        eseries.control.clear_command_log()
    stamps = np.array([t for t in stamps if t0 <= t <= t1])
    gaps = np.diff(stamps)
    assert len(stamps) > 0.8 * 500 * (t1 - t0) and np.sum(gaps > 0.05) <= 1, np.sort(gaps)[-5:]
