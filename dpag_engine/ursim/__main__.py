"""python -m dpag_engine.ursim --host 127.0.0.1 [--version 3.15|5.11] [--control-port 30100]"""
import argparse
import gc
import os
import signal
import sys
import threading

from .control import DEFAULT_CONTROL_PORT, ControlServer
from .emulator import URControllerEmulator
from ..cameras.sim import SIM_CAMERA_PORT
from .logs import COMMAND_LOG_SIZE
from .robotiq import ROBOTIQ_PORT


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dpag_engine.ursim",
                                 description="UR5 controller emulator for the ur_rtde client")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (127.0.0.N)")
    ap.add_argument("--version", default="3.15",
                    help="controller version to report: 3.15 (CB3, 125 Hz) or 5.11 (e-Series, 500 Hz)")
    ap.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                    help="JSON-lines test side channel port (0 disables)")
    ap.add_argument("--q0", type=float, nargs=6, default=None, help="initial joint positions (rad)")
    ap.add_argument("--servo-horizon", type=float, default=0.04,
                    help="protective stop if a servo target is farther than v_max * this from actual q")
    ap.add_argument("--preload", action="store_true",
                    help="start with the control script already running (clients that do not upload)")
    ap.add_argument("--log-size", type=int, default=COMMAND_LOG_SIZE,
                    help="commands the command log keeps (a ring: older ones are dropped and counted)")
    ap.add_argument("--gripper-port", type=int, default=ROBOTIQ_PORT,
                    help="the emulated Robotiq gripper's URCap socket (0: a free port; -1: no gripper)")
    ap.add_argument("--camera-port", type=int, default=SIM_CAMERA_PORT,
                    help="the rendered cameras' stream (the sim: camera source; 0: a free port; -1: none)")
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="exit when this process is no longer our parent (EmulatorProcess passes it, so "
                         "an emulator never outlives a crashed test run and keeps its ports)")
    args = ap.parse_args(argv)

    emu = URControllerEmulator(args.host, args.version, q0=args.q0,
                               servo_horizon_s=args.servo_horizon, preload=args.preload,
                               log_size=args.log_size,
                               gripper_port=None if args.gripper_port < 0 else args.gripper_port,
                               camera_port=None if args.camera_port < 0 else args.camera_port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    emu.start()
    # A controller does not pause. A full collection of this process took 100-300 ms on a loaded
    # 2-core machine, long enough to stall the RTDE stream: keep what startup loaded out of it, and
    # make full collections rare (young generations still run, and cycles here are few).
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 1000)
    # A thread that wants the GIL waits up to one switch interval while another computes (a
    # control-port reply, a client's setup): 1 ms instead of 5 keeps the 2 ms cycle on time.
    sys.setswitchinterval(0.001)
    control = ControlServer(emu, args.control_port).start() if args.control_port else None
    where = f", control {args.control_port}" if control else ""
    print(f"ursim: {emu.describe()}{where}; listening", flush=True)
    while not done.wait(0.5):
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            print("ursim: parent process gone", flush=True)
            break
    if control:
        control.stop()
    emu.stop()
    print("ursim: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
