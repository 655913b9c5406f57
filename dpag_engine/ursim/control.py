"""Test side channel: a JSON-lines control port, its client, and a process launcher.

The emulator has to run in its own process (ur_rtde's constructors hold the GIL), so
tests reach its fault-injection API through a small TCP port on the same loopback
address: one JSON object per line in, one per line out.

    {"op": "protective_stop"}                      -> {"ok": true, "result": null}
    {"op": "command_log", "args": {"since": 1.5}}  -> {"ok": true, "result": [...]}
    {"op": "teach_path", "args": {"q": [[...6], ...], "dt": 0.02}} -> {"ok": true, "result": t0}
    (outside teach mode: {"ok": false, "error": "ValueError: teach_path refused: ..."};
    ControlClient raises RuntimeError with that text)
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

DEFAULT_CONTROL_PORT = 30100
MAX_REQUEST = 1 << 20       # bytes of one JSON request line

# The emulator methods the control port exposes (everything else is refused).
OPS = ("protective_stop", "emergency_stop", "stop_program", "freeze_stream", "unfreeze_stream",
       "drop_connections", "reset_faults", "set_joint_positions", "command_log",
       "clear_command_log", "event_log", "clear_event_log", "setup_log", "snapshot", "now",
       "gripper_freeze", "gripper_drop", "set_gripper_object", "camera_freeze", "camera_delay",
       "teach_path", "teach_path_done")


class ControlServer:
    """Serves the OPS of one emulator on (emulator.host, port)."""

    def __init__(self, emulator, port=DEFAULT_CONTROL_PORT):
        self.emulator, self.port = emulator, port
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((emulator.host, port))
        self._sock.listen(4)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="ursim-control")

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        conn.settimeout(0.5)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    conn.sendall(_encode(self._handle(line)))
                if len(buf) > MAX_REQUEST:      # no request is this long: hang up, do not buffer it
                    return

    def _handle(self, line):
        try:
            req = json.loads(line)
            op = req["op"]
            if op not in OPS:
                return {"ok": False, "error": f"unknown op {op!r}"}
            return {"ok": True, "result": getattr(self.emulator, op)(**req.get("args", {}))}
        except Exception as e:  # report to the caller rather than killing the port
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _encode(reply, slice_len=500):
    """One JSON line. json.dumps holds the GIL for its whole call, and encoding a full command log
    (20k entries) in one call stalled the emulator's 500 Hz stream for ~100 ms: encode a long
    list in slices, so the timing thread gets the GIL between them."""
    result = reply.get("result")
    if not isinstance(result, list) or len(result) <= slice_len:
        return json.dumps(reply).encode() + b"\n"
    parts = [json.dumps(result[i:i + slice_len])[1:-1] for i in range(0, len(result), slice_len)]
    return ('{"ok": true, "result": [' + ", ".join(parts) + "]}\n").encode()


class ControlClient:
    """Calls the emulator's side-channel methods over the control port.

    client.protective_stop(); client.command_log(since=t); client.snapshot() ...
    """

    def __init__(self, host="127.0.0.1", port=DEFAULT_CONTROL_PORT, timeout=5.0):
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rb")
        self._lock = threading.Lock()

    def call(self, op, **args):
        with self._lock:
            self._sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            line = self._file.readline()
        if not line:
            raise ConnectionError("emulator control port closed")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def __getattr__(self, op):
        if op in OPS:
            return lambda **args: self.call(op, **args)
        raise AttributeError(op)

    def close(self):
        self._file.close()
        self._sock.close()


class EmulatorProcess:
    """Runs `python -m dpag_engine.ursim` as a child process and connects its control port.

        with EmulatorProcess("127.0.0.3", version="5.11") as emu:
            rtde_receive.RTDEReceiveInterface(emu.host) ...
            emu.control.protective_stop()
    """

    def __init__(self, host="127.0.0.1", version="3.15", control_port=DEFAULT_CONTROL_PORT,
                 extra_args=(), start_timeout=20.0):
        self.host, self.version, self.control_port = host, version, control_port
        self.extra_args, self.start_timeout = list(extra_args), start_timeout
        self.proc = None
        self.control = None
        self.banner = ""

    def start(self):
        cmd = [sys.executable, "-m", "dpag_engine.ursim", "--host", self.host, "--version",
               str(self.version), "--control-port", str(self.control_port), "--parent-pid", str(os.getpid()),
               *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Wait for the "listening" line on a helper thread so a stuck child cannot hang us.
        ready = threading.Event()
        lines = []

        def read_output():
            for line in self.proc.stdout:
                lines.append(line)
                if "listening" in line:
                    ready.set()
        threading.Thread(target=read_output, daemon=True).start()
        if not ready.wait(self.start_timeout):
            self.stop()
            raise RuntimeError(f"emulator did not start on {self.host}: {''.join(lines)[-2000:]}")
        self.banner = lines[-1].strip()
        self._output = lines
        # control_port 0: no test side channel (what `serve --robot sim` runs).
        self.control = ControlClient(self.host, self.control_port) if self.control_port else None
        return self

    def output(self):
        """Everything the child printed so far."""
        return "".join(self._output)

    def stop(self):
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
        return self.proc.returncode if self.proc is not None else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wait_until(predicate, timeout, interval=0.01):
    """Poll predicate() until true or timeout; returns its last value (tests use this)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
