"""Fuzz the UR controller emulator (issue #17): random and mutated RTDE, dashboard and script
traffic, while a witness client checks that the RTDE stream never stops; afterwards the real
ur_rtde client still connects, commands and gets fresh, changing data.

Bounded in count and time (URSIM_FUZZ_CASES, URSIM_FUZZ_SECONDS) and seeded (URSIM_FUZZ_SEED):
every case draws its traffic from random.Random(f"{seed}/{case}"), so a failing case reproduces
(URSIM_FUZZ_WORKERS=1 also fixes their order). All traffic goes to one loopback address.
"""
import math
import os
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest

from dpag_engine.ursim import EmulatorProcess, wait_until
from dpag_engine.ursim import protocol as P

rtde_control = pytest.importorskip("rtde_control")
rtde_receive = pytest.importorskip("rtde_receive")

HOST, CONTROL_PORT = "127.0.0.16", 30116
SEED = int(os.environ.get("URSIM_FUZZ_SEED", "17"))
CASES = int(os.environ.get("URSIM_FUZZ_CASES", "1000"))
SECONDS = float(os.environ.get("URSIM_FUZZ_SECONDS", "12"))
WORKERS = int(os.environ.get("URSIM_FUZZ_WORKERS", "4"))
HOME = [0.0, -1.57, 1.57, -1.57, -1.57, 0.0]

# What ur_rtde sends (docs/ur_rtde_protocol.md), as material to mutate.
RECEIVE_OUTPUTS = ["timestamp", "target_q", "target_qd", "actual_q", "actual_qd", "actual_TCP_pose",
                   "robot_mode", "joint_mode", "safety_mode", "runtime_state", "robot_status_bits",
                   "safety_status_bits", "actual_tool_accelerometer", "payload", "payload_cog",
                   "output_int_register_2", "output_double_register_12", "actual_digital_input_bits"]
CONTROL_OUTPUTS = (["timestamp", "robot_status_bits", "safety_status_bits", "runtime_state"]
                   + [f"output_int_register_{k}" for k in range(3)]
                   + [f"output_double_register_{k}" for k in range(6)])
COMMANDS = [0, 1, 2, 3, 4, 6, 9, 10, 11, 12, 15, 16, 24, 31, 33, 34, 35, 255]
DASHBOARD = ["PolyscopeVersion", "get serial number", "is in remote control", "get robot model",
             "stop", "play", "pause", "running", "programState", "get loaded program",
             "load /programs/x.urp", "isProgramSaved", "robotmode", "safetymode", "safetystatus",
             "unlock protective stop", "restart safety", "power on", "power off", "brake release",
             "close popup", "close safety popup", "popup hi", "addToLog fuzz", "setUserRole none",
             "shutdown", "quit"]
RECOVER = b"power on\nbrake release\nunlock protective stop\n"     # back to a RUNNING, NORMAL arm
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.002, 1e-300, 5e-324, 1e308, -1e308, math.inf, -math.inf, math.nan]


def _inputs(off, n_int, n_double, extra=()):
    return ([f"input_int_register_{off + k}" for k in range(n_int)]
            + [f"input_double_register_{off + k}" for k in range(n_double)] + list(extra))


def _number(rng):
    return rng.choice(FLOATS) if rng.random() < 0.3 else rng.uniform(-7, 7)


def _names(names):
    return ",".join(names).encode() + b","


# ------------------------------------------------------------------ traffic
def _rtde_messages(rng):
    """A plausible client session: handshake, input recipes, commands; returns framed messages."""
    off = rng.choice([0, 0, 24])
    msgs = [P.frame(P.REQUEST_PROTOCOL_VERSION, struct.pack(">H", rng.choice([2, 2, 1, 3]))),
            P.frame(P.GET_URCONTROL_VERSION)]
    outputs = rng.choice([RECEIVE_OUTPUTS, CONTROL_OUTPUTS, rng.sample(RECEIVE_OUTPUTS, 3)])
    msgs.append(P.frame(P.SETUP_OUTPUTS, struct.pack(">d", rng.choice([125.0, 500.0, _number(rng)]))
                        + _names(outputs)))
    recipes = [_inputs(off, 1, 8) + [f"input_int_register_{off + 1}"], _inputs(off, 1, 11),
               _inputs(off, 1, 0), _inputs(off, 1, 1), _inputs(off, 8, 18),
               _inputs(off, 1, 6, ["external_force_torque"])]
    chosen = rng.sample(recipes, rng.randint(1, len(recipes)))
    for names in chosen:
        msgs.append(P.frame(P.SETUP_INPUTS, _names(names)))
    msgs.append(P.frame(P.START))
    for _ in range(rng.randint(0, 20)):
        cmd = rng.choice(COMMANDS) if rng.random() < 0.8 else rng.randint(-2**31, 2**31 - 1)
        if rng.random() < 0.7:      # fits recipe `rid` (if every setup above succeeded)
            rid = rng.randint(1, len(chosen))
            n_int = sum(n.startswith("input_int") for n in chosen[rid - 1]) - 1
            n_double = len(chosen[rid - 1]) - n_int - 1 + 5 * ("external_force_torque" in chosen[rid - 1])
        else:                       # any id, any length
            rid, n_int, n_double = rng.randint(0, 30), rng.choice([0, 1, 7]), rng.choice([0, 1, 8, 11, 18])
        msgs.append(P.frame(P.DATA_PACKAGE, struct.pack(
            f">Bi{n_int}i{n_double}d", rid, cmd, *[rng.randint(-3, 3) for _ in range(n_int)],
            *[_number(rng) for _ in range(n_double)])))
    if rng.random() < 0.3:
        msgs.append(P.frame(P.PAUSE))
    return msgs


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:                                # flip bits
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:                                       # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2:                                       # cut
            del data[pos:pos + rng.randint(1, 64)]
        elif op == 3 and len(data) >= pos + 2:              # a size field that lies
            data[pos:pos + 2] = struct.pack(">H", rng.choice([0, 1, 2, 3, 4, 65535, rng.randrange(65536)]))
        elif op == 4:                                       # duplicate a stretch
            data[pos:pos] = data[pos:pos + rng.randint(1, 200)]
        elif op == 5:                                       # truncate
            del data[pos:]
    return bytes(data)


def _oversized(rng):
    kind = rng.randrange(5)
    if kind == 0:
        return P.frame(P.SETUP_OUTPUTS, struct.pack(">d", 500) + b"actual_q," * rng.randint(1360, 7000))
    if kind == 1:
        return P.frame(P.SETUP_OUTPUTS, struct.pack(">d", 125) + b"x," * rng.randint(10000, 32000))
    if kind == 2:
        return P.frame(P.SETUP_INPUTS, rng.choice([b"y" * 65000, b"external_force_torque," * 2900]))
    if kind == 3:   # more input recipes than a one-byte id can number
        return b"".join(P.frame(P.SETUP_INPUTS, b"input_bit_register_%d," % (64 + k % 64)) for k in range(300))
    return P.frame(P.SETUP_OUTPUTS, struct.pack(">d", rng.choice(FLOATS)) + rng.randbytes(rng.randint(0, 2000)))


def _with_start(rng, request):
    """An oversized or odd request, then the rest of a session: start, and maybe data packages."""
    return request + b"".join(m for m in _rtde_messages(rng) if m[2] in (P.START, P.DATA_PACKAGE))


def _dashboard_traffic(rng):
    lines = []
    for _ in range(rng.randint(1, 30)):
        r = rng.random()
        if r < 0.7:
            cmd = rng.choice(DASHBOARD)
            cmd = cmd.upper() if rng.random() < 0.1 else cmd
            lines.append((" " * rng.randint(0, 2) + cmd).encode() + rng.choice([b"\n", b"\r\n"]))
        elif r < 0.95:
            lines.append(rng.randbytes(rng.randint(0, 200)).replace(b"\n", b"") + b"\n")
        else:
            lines.append(b"z" * rng.randint(4000, 70000) + rng.choice([b"", b"\n"]))
    data = b"".join(l for l in lines if not l.startswith(b"quit") or rng.random() < 0.3)
    # Often end on a powered, unfaulted arm, so that scripts and commands reach the emulated program.
    return RECOVER + data + RECOVER if rng.random() < 0.7 else data


def _control_script(rng, offset):
    body = "".join(f"  textmsg({rng.random()})\n" for _ in range(rng.randint(0, 50)))
    return (f"def rtde_control():\n  global reg_offset_int = # int register offset\n{offset}\n"
            f"{body}end\n").encode()


def _script_traffic(rng):
    r = rng.random()
    program = _control_script(rng, rng.choice(["0", "24", "25", "48", "100", "-1", "9" * 5000, "abc", ""]))
    if r < 0.4:
        return program
    if r < 0.6:
        return _mutate(rng, program)
    if r < 0.75:
        return b"".join(f"{rng.choice(['def', 'sec'])} p{k}():\n  sync()\nend\n".encode()
                        for k in range(rng.randint(1, 2000)))
    if r < 0.97:
        return rng.randbytes(rng.randint(1, 30000))
    return b"  sleep(1)\n" * 110_000                       # over 1 MiB without an end


class Fuzzer:
    def __init__(self):
        self.counts = {}
        self.errors = []
        self.lock = threading.Lock()

    def run(self, seconds, cases, workers):
        deadline = time.monotonic() + seconds
        counter = iter(range(cases))

        def worker():
            while time.monotonic() < deadline:
                with self.lock:
                    case = next(counter, None)
                if case is None:
                    return
                try:
                    self.case(case)
                except Exception as e:          # a bug in this test, not in the emulator
                    self.errors.append((case, repr(e)))
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 30)
        return sum(self.counts.values())

    def case(self, case):
        rng = random.Random(f"{SEED}/{case}")
        kind = rng.choices(["rtde_session", "rtde_mutated", "rtde_random", "rtde_oversized",
                            "rtde_silent", "dashboard", "script", "control_session"],
                           [15, 25, 6, 8, 3, 15, 15, 13])[0]
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        port = {"dashboard": 29999, "script": 30003}.get(kind, 30004)
        if kind == "rtde_session":
            data = b"".join(_rtde_messages(rng))
        elif kind == "rtde_mutated":
            data = _mutate(rng, b"".join(_rtde_messages(rng)))
        elif kind == "rtde_random":
            data = rng.randbytes(rng.randint(0, 5000))
        elif kind == "rtde_oversized":
            data = _with_start(rng, b"".join(_rtde_messages(rng)[:2]) + _oversized(rng))
        elif kind == "rtde_silent":         # streams a big recipe at 500 Hz, never reads
            data = P.frame(P.SETUP_OUTPUTS, struct.pack(">d", 500) + b"actual_q," * 200) + P.frame(P.START)
        elif kind == "dashboard":
            data = _dashboard_traffic(rng)
        elif kind == "script":
            data = _script_traffic(rng)
        else:           # recover the arm, start the control script, command it over RTDE
            self.exchange(rng, 29999, RECOVER)
            self.exchange(rng, 30003, _control_script(rng, rng.choice(["0", "24"])))
            data = b"".join(_rtde_messages(rng))
        self.exchange(rng, port, data, silent=kind == "rtde_silent")

    @staticmethod
    def exchange(rng, port, data, silent=False):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if silent:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(2.0)
        try:
            s.connect((HOST, port))
            pos = 0
            while pos < len(data):                          # in random pieces, as TCP may deliver
                n = rng.choice([len(data), rng.randint(1, 4096)])
                s.sendall(data[pos:pos + n])
                pos += n
            if silent:
                time.sleep(rng.uniform(0.2, 0.5))
                return
            s.settimeout(0.02)
            deadline = time.monotonic() + rng.uniform(0.0, 0.1)
            while time.monotonic() < deadline and s.recv(65536):   # read some replies, or none
                pass
        except OSError:
            pass                                            # refused, reset, closed: all fine here
        finally:
            if rng.random() < 0.2:                          # abortive close (RST)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


class Witness:
    """A raw RTDE client streaming `timestamp` at 500 Hz for the whole fuzz run."""

    def __init__(self):
        self.stamps = []
        self.stop = threading.Event()
        self.sock = socket.create_connection((HOST, 30004), timeout=5)
        self.sock.sendall(P.frame(P.SETUP_OUTPUTS, struct.pack(">d", 500) + b"timestamp,"))
        assert self._read()[1][0] == 1
        self.sock.sendall(P.frame(P.START))
        assert self._read() == (P.START, b"\x01")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self):
        head = self._exact(3)
        size, mtype = P.HEADER.unpack(head)
        return mtype, self._exact(size - 3)

    def _exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("emulator closed the witness connection")
            data += chunk
        return data

    def _run(self):
        try:
            while not self.stop.is_set():
                mtype, payload = self._read()
                if mtype == P.DATA_PACKAGE:
                    self.stamps.append(struct.unpack_from(">d", payload, 1)[0])
        except OSError as e:
            self.error = e

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


@pytest.fixture(scope="module")
def emu():
    e = EmulatorProcess(HOST, "5.11", control_port=CONTROL_PORT).start()
    yield e
    assert e.stop() == 0, e.output()


def test_fuzzed_emulator_keeps_streaming_and_serves_ur_rtde(emu):
    rss0 = _rss_mb(emu.proc.pid)
    witness = Witness()
    t0 = time.monotonic()
    fuzzer = Fuzzer()
    n = fuzzer.run(SECONDS, CASES, WORKERS)
    fuzz_s = time.monotonic() - t0
    time.sleep(0.2)
    witness.close()
    rss1 = _rss_mb(emu.proc.pid)
    print(f"\nfuzz seed {SEED}: {n} cases in {fuzz_s:.1f} s {sorted(fuzzer.counts.items())}; "
          f"emulator RSS {rss0:.1f} -> {rss1:.1f} MB")
    assert not fuzzer.errors, fuzzer.errors[:5]
    assert n >= min(CASES, 100), n

    # The emulator is up, no cycle or handler failed unexpectedly, and the stream never stopped.
    assert emu.proc.poll() is None, emu.output()
    snap = emu.control.snapshot()
    problems = [e["event"] for e in emu.control.event_log() if "error" in e["event"]]
    assert snap["tick_errors"] == 0 and snap["handler_errors"] == 0, problems[-10:]
    seen = {k: sum(k in e["event"] for e in emu.control.event_log()) for k in
            ("started (register", "refused", "protective stop", "dropped", "closed", "ignored")}
    print(f"emulator events: {seen}, commands logged: {len(emu.control.command_log())}")
    stamps = np.array(witness.stamps)
    gaps = np.diff(stamps)
    print(f"witness: {len(stamps)} packages, largest gap {gaps.max() * 1000:.1f} ms")
    assert stamps[-1] - stamps[0] > 0.9 * fuzz_s
    assert len(stamps) > 0.5 * 500 * fuzz_s and gaps.max() < 0.5, gaps.max()
    assert rss1 - rss0 < 64, (rss0, rss1)

    # Whatever state the fuzz left (powered off, protective stop, a program running), a real
    # client gets a clean arm after the usual recovery, and then fresh, changing data.
    emu.control.reset_faults()
    emu.control.stop_program()
    emu.control.set_joint_positions(q=HOME)
    assert wait_until(lambda: emu.control.snapshot()["rtde_clients"] == 0, 5.0)
    r = rtde_receive.RTDEReceiveInterface(HOST)
    c = rtde_control.RTDEControlInterface(HOST)
    try:
        assert c.isProgramRunning()
        t_a = r.getTimestamp()
        q = np.array(r.getActualQ())
        assert np.allclose(q, HOME)
        for k in range(100):                                # 0.2 s of 500 Hz servoJ, +0.02 rad
            t_start = c.initPeriod()
            q[0] += 0.0002
            assert c.servoJ(q.tolist(), 0.5, 0.5, 0.002, 0.1, 300)
            c.waitPeriod(t_start)
        assert wait_until(lambda: abs(r.getActualQ()[0] - q[0]) < 1e-6, 2.0)
        assert r.getTimestamp() > t_a + 0.15
        assert c.servoStop(2.0)
        c.stopScript()
        assert wait_until(lambda: r.getRuntimeState() == 1, 2.0)
    finally:
        c.disconnect()
        r.disconnect()
