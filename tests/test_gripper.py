"""The Robotiq gripper client (dpag_engine.gripper) against the emulated URCap
(dpag_engine.ursim.robotiq), over real sockets on 127.0.0.1; no mocks.

Targets, speeds and object widths are drawn fresh each run (the seed is in every failure message)
and kept away from 0 and the ends of the stroke. All waits are bounded; fixtures stop every server
and client they start.
"""
import math
import random
import socket
import threading
import time

import pytest

from dpag_engine.gripper import GRIPPER_MODELS, GripperFault, RobotiqGripper
from dpag_engine.ursim import wait_until
from dpag_engine.ursim import robotiq as R
from dpag_engine.ursim.robotiq import GripperSim, RobotiqServer

HOST = "127.0.0.1"
STALL_S = 0.3
MARGIN_S = 0.6                          # scheduling slack on a loaded 2-core machine
SEED = random.SystemRandom().randrange(2**32)


@pytest.fixture
def rng():
    return random.Random(SEED)


@pytest.fixture
def sim():
    return GripperSim("2f85")


@pytest.fixture
def server(sim):
    srv = RobotiqServer(sim, HOST, port=0).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_gripper(server):
    made = []

    def make(**kw):
        kw = {"port": server.port, "stall_timeout_s": STALL_S, "timeout_s": 0.5, **kw}
        g = RobotiqGripper(HOST, **kw)
        made.append(g)
        return g
    yield make
    for g in made:
        g.close()


def raw(server):
    s = socket.create_connection((HOST, server.port), timeout=2.0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def ask(sock, line, expect_ack=False):
    """One request, its whole reply (the URCap's "ack" has no newline; the rest end with one)."""
    sock.sendall(line.encode() + b"\n")
    data = b""
    while not (data == b"ack" or data.endswith(b"\n")):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {line!r}"
        data += chunk
    return data


def counts_per_s(spe):
    return 255.0 / GRIPPER_MODELS["2f85"].full_stroke_s * max(spe / 255.0, R.MIN_SPEED_FRACTION)


def gripper_threads():
    return [t for t in threading.enumerate() if t.name.startswith("robotiq")]


# --------------------------------------------------------------------------- the model
def test_model_activation_speed_and_gating():
    sim, dt = GripperSim("2f140"), 0.01
    assert sim.width_m == pytest.approx(0.140)
    assert sim.handle("SET POS 200 GTO 1 SPE 255") == "ack"
    for _ in range(50):
        sim.step(dt)
    assert sim.register("POS") == 0, "moved while ACT 0"
    sim.handle("SET ACT 1")
    steps = 0
    while sim.register("STA") != 3:
        assert sim.register("STA") == 1
        sim.step(dt)
        steps += 1
    assert steps * dt == pytest.approx(R.ACTIVATION_S, abs=2 * dt)
    steps = 0
    sim.handle("SET POS 255")
    while sim.register("OBJ") != 3:
        sim.step(dt)
        steps += 1
    assert steps * dt == pytest.approx(GRIPPER_MODELS["2f85"].full_stroke_s, abs=2 * dt)    # full stroke at SPE 255
    assert sim.width_m == 0.0
    sim.handle("SET GTO 0 POS 0")
    sim.step(0.2)
    assert sim.register("POS") == 255 and sim.register("OBJ") == 0, "moved while GTO 0"
    sim.handle("SET SPE 0 GTO 1")       # the slowest speed still moves
    sim.step(1.0)
    assert 255 - sim.register("POS") == pytest.approx(counts_per_s(0), abs=1)
    sim.handle("SET ACT 0")             # a reset stops the fingers where they are
    held = sim.register("POS")
    sim.step(0.5)
    assert sim.register("POS") == held and sim.register("STA") == 0


# ----------------------------------------------------------------------- motion, objects
def test_connect_activates_and_tracks_random_targets(sim, server, make_gripper, rng):
    speed = rng.uniform(0.5, 1.0)
    g = make_gripper(speed=speed)
    assert sim.register("STA") == 0
    g.connect()
    assert sim.register("STA") == 3 and sim.register("GTO") == 1 and sim.activations == 1
    stroke = GRIPPER_MODELS["2f85"].stroke_m
    tol = 1.5 * stroke / 255                               # one position count, and rounding
    rate = counts_per_s(round(speed * 255))
    width = g.width()[0]
    assert width == pytest.approx(stroke, abs=tol), "connect must not move the fingers"
    for _ in range(3):
        target = rng.uniform(0.1, 0.9) * stroke
        while abs(target - width) < 0.2 * stroke:
            target = rng.uniform(0.1, 0.9) * stroke
        expected_s = abs(target - width) / stroke * 255 / rate
        t0 = time.monotonic()
        g.command(target)
        assert wait_until(lambda: abs(g.width()[0] - target) < tol, expected_s + MARGIN_S), (
            f"seed {SEED}: target {target:.4f}, at {g.width()[0]:.4f} after {expected_s:.2f} s")
        elapsed = time.monotonic() - t0
        assert elapsed > 0.7 * expected_s, f"seed {SEED}: arrived faster than the fingers move"
        assert wait_until(lambda: sim.register("OBJ") == 3 and g.stats["obj"] == 3, 0.5)
        assert not g.object_detected()
        w, t = g.width()
        assert 0.0 <= time.monotonic() - t < STALL_S
        width = w


def test_object_stops_closing(sim, server, make_gripper, rng):
    stroke = sim.stroke_m
    obj_w = rng.uniform(0.3, 0.6) * stroke
    sim.object_width_m = obj_w
    g = make_gripper(speed=1.0)
    g.connect()
    g.command(obj_w * rng.uniform(0.1, 0.6))              # aim inside the object
    assert wait_until(g.object_detected, 1.5), f"seed {SEED}: object {obj_w:.4f} not detected"
    assert sim.register("OBJ") == 2
    assert g.width()[0] == pytest.approx(obj_w, abs=1.5 * stroke / 255)
    time.sleep(0.1)
    assert g.width()[0] == pytest.approx(obj_w, abs=1.5 * stroke / 255), "closed into the object"
    release = obj_w + rng.uniform(0.1, 0.3) * (stroke - obj_w)
    g.command(release)                                      # opening is never blocked
    assert wait_until(lambda: not g.object_detected() and g.stats["obj"] == 3, 1.0)
    assert g.width()[0] == pytest.approx(release, abs=1.5 * stroke / 255)


def test_clipping_and_second_client_does_not_reset(sim, server, make_gripper, rng):
    g = make_gripper()
    g.connect()
    g.command(-rng.uniform(0.01, 1.0))                    # below 0: fully closed
    assert wait_until(lambda: sim.register("POS") == 255, 1.5)
    assert wait_until(lambda: g.width()[0] == 0.0, 0.5)
    other = make_gripper()
    other.connect()                                         # already active: no reset, no motion
    assert sim.activations == 1 and sim.register("PRE") == 255 and other.width()[0] == 0.0
    other.close()
    g.command(GRIPPER_MODELS["2f85"].stroke_m + rng.uniform(0.01, 1.0))   # beyond: fully open
    assert wait_until(lambda: sim.register("POS") == 0, 1.5)


# ------------------------------------------------------------------------- the protocol
def test_protocol_set_get(server, sim, rng):
    p, s, f = rng.randrange(1, 255), rng.randrange(1, 255), rng.randrange(1, 255)
    with raw(server) as c:
        assert ask(c, f"SET POS {p} SPE {s} FOR {f}") == b"ack"      # exactly b"ack"
        assert ask(c, "GET PRE") == f"PRE {p}\n".encode()
        assert ask(c, "GET SPE") == f"SPE {s}\n".encode()
        assert ask(c, "GET FOR") == f"FOR {f}\n".encode()
        assert ask(c, "GET STA") == b"STA 0\n"
        assert ask(c, "GET POS") == b"POS 0\n"                        # actual, not the request
        c.sendall(b"GET OBJ\nGET FLT\n")                             # two lines in one packet
        data = b""
        while data.count(b"\n") < 2:
            data += c.recv(4096)
        assert data == b"OBJ 0\nFLT 0\n"


@pytest.mark.parametrize("line", ["HELLO", "SET", "SET POS", "SET POS abc", "SET POS 256",
                                  "SET POS -1", "SET ACT 2", "SET NOPE 3", "SET STA 3",
                                  "GET", "GET NOPE", "GET POS OBJ", "set pos 12 nope 1",
                                  "\x00\xff garbage"])
def test_garbage_gets_an_error_reply_and_changes_nothing(server, sim, line):
    with raw(server) as c:
        assert ask(c, "SET POS 77") == b"ack"
        reply = ask(c, line)
        assert reply.startswith(b"ERR ") and reply.endswith(b"\n"), reply
        assert ask(c, "GET PRE") == b"PRE 77\n", "the connection must survive, unchanged"
    assert server.stats()["errors"] >= 1


def test_client_takes_replies_without_newline(rng):
    """The URCap's GET replies may come without a newline: a peer that answers from a real
    GripperSim with no newline at all must work just the same."""
    sim = GripperSim("2f85")
    sim.handle("SET ACT 1")
    sim.step(1.0)                                           # already active: connect won't reset
    listener = socket.create_server((HOST, 0))
    stop = threading.Event()

    def peer():
        conn, _ = listener.accept()
        with conn:
            buf = b""
            while not stop.is_set():
                sim.step(0.01)
                conn.settimeout(0.01)
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    conn.sendall(sim.handle(line.decode()).encode())     # no newline
    t = threading.Thread(target=peer, daemon=True)
    t.start()
    g = RobotiqGripper(HOST, listener.getsockname()[1], stall_timeout_s=STALL_S, timeout_s=0.5)
    try:
        g.connect()
        target = rng.uniform(0.2, 0.8) * sim.stroke_m
        g.command(target)
        assert wait_until(lambda: abs(g.width()[0] - target) < 1.5 * sim.stroke_m / 255, 3.0), (
            f"seed {SEED}: {g.stats}")
        assert g.stats["polls"] > 3 and not g.stats["fault"]
    finally:
        g.close()
        stop.set()
        t.join(2.0)
        listener.close()


def test_overlong_line_drops_only_that_client(server, make_gripper):
    g = make_gripper()
    g.connect()
    with raw(server) as bad, raw(server) as good:
        bad.sendall(b"SET POS " + b"1" * (R.MAX_LINE + 100))          # no newline
        bad.settimeout(2.0)
        assert bad.recv(4096) == b"", "the server must hang up"
        assert ask(good, "GET STA") == b"STA 3\n"
    t0 = time.monotonic()
    assert wait_until(lambda: g.width()[1] > t0, 0.5), "the gripper client must keep polling"
    assert server.stats()["dropped_long_line"] == 1


# --------------------------------------------------------------------------------- faults
def wait_fault(g, limit_s):
    """Seconds until width() raises GripperFault (fails past limit_s); the fault."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            g.width()
        except GripperFault as e:
            return time.monotonic() - t0, e
        time.sleep(0.01)
    pytest.fail(f"no GripperFault within {limit_s} s")


@pytest.mark.parametrize("how", ["drop", "stop"])
def test_lost_link_faults(server, make_gripper, how):
    g = make_gripper()
    g.connect()
    server.drop_connections() if how == "drop" else server.stop()
    dt, e = wait_fault(g, STALL_S + MARGIN_S)
    assert e.gripper == g.name and g.name in str(e) and f":{server.port}" in str(e)
    with pytest.raises(GripperFault):
        g.command(0.02)
    with pytest.raises(GripperFault):
        g.object_detected()
    assert g.stats["fault"] and not g.stats["connected"]


def test_frozen_server_faults(server, make_gripper):
    g = make_gripper(timeout_s=1.0)
    g.connect()
    server.freeze(5.0)
    dt, e = wait_fault(g, STALL_S + MARGIN_S)
    assert "stalled" in e.reason, e
    # ... and once no reply came within timeout_s, the link is given up for good.
    assert wait_until(lambda: "no reply" in g.stats["fault"], 1.0 + MARGIN_S), g.stats
    server.freeze(0)
    time.sleep(0.1)
    with pytest.raises(GripperFault, match="no reply"):
        g.width()


def test_fault_code_faults(server, sim, make_gripper, rng):
    g = make_gripper()
    g.connect()
    code = rng.randrange(1, 16)
    sim.inject_fault(code)
    dt, e = wait_fault(g, STALL_S + MARGIN_S)
    assert f"FLT {code}" in e.reason


def test_connect_to_closed_port_faults_quickly():
    with socket.socket() as s:          # a port nobody listens on
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    g = RobotiqGripper(HOST, port)
    t0 = time.monotonic()
    with pytest.raises(GripperFault, match=f"Robotiq 2f85 at {HOST}:{port}: cannot connect"):
        g.connect()
    assert time.monotonic() - t0 < 0.5
    g.close()


def test_activation_timeout_faults(server, sim, make_gripper):
    server.freeze(3.0)                  # the URCap accepts but never answers
    g = make_gripper(timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(GripperFault, match="no reply"):
        g.connect(timeout_s=0.5)
    assert time.monotonic() - t0 < 0.5 + MARGIN_S
    server.freeze(0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "0.04", True])
def test_bad_width_is_refused_before_anything_is_sent(server, sim, make_gripper, bad):
    g = make_gripper()
    with pytest.raises(ValueError, match="width_m"):
        g.command(bad)                  # before connect too: the value is checked first
    g.connect()
    pre, requests = sim.register("PRE"), server.stats()["requests"]
    with pytest.raises(ValueError, match="width_m"):
        g.command(bad)
    assert g.stats["commands"] == 0 and sim.register("PRE") == pre
    time.sleep(0.1)                     # a few polls later: still no SET
    assert server.stats()["requests"] > requests and sim.register("PRE") == pre


@pytest.mark.parametrize("kw,option", [
    ({"model": "2f99"}, "model"), ({"speed": 0.0}, "speed"), ({"speed": 1.5}, "speed"),
    ({"force": 0.0}, "force"), ({"force": math.nan}, "force"), ({"poll_hz": 0.0}, "poll_hz"),
    ({"poll_hz": 500.0}, "poll_hz"), ({"stall_timeout_s": 0.01}, "stall_timeout_s"),
    ({"timeout_s": 0.0}, "timeout_s"), ({"port": 0}, "port"), ({"host": ""}, "host")])
def test_constructor_validation(kw, option):
    with pytest.raises(ValueError, match=f"^{option}:"):
        RobotiqGripper(**{"host": HOST, **kw})


def test_close_is_idempotent_and_leaves_no_threads(sim):
    before = set(threading.enumerate())
    with RobotiqServer(sim, HOST, port=0) as server:
        g = RobotiqGripper(HOST, server.port)
        g.connect()
        assert any(t.name.startswith("robotiq-127") for t in gripper_threads())
        g.close()
        g.close()
        with pytest.raises(GripperFault, match="closed"):
            g.width()
        with pytest.raises(GripperFault, match="closed"):
            g.connect()
    assert wait_until(lambda: set(threading.enumerate()) <= before, 2.0), gripper_threads()
    assert server.stats()["clients"] == 0
