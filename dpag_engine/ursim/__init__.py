"""UR controller emulator (RTDE 30004, dashboard 29999, script 30003) for testing with ur_rtde.

    python -m dpag_engine.ursim --host 127.0.0.1 --version 3.15

Run it out of process when the ur_rtde client lives in the same program (EmulatorProcess):
ur_rtde's Python constructors hold the GIL and deadlock against an in-process emulator.
"""
from .control import ControlClient, ControlServer, EmulatorProcess, wait_until
from .emulator import URControllerEmulator, parse_version
from ..kinematics import UR5_LIMITS, JointLimits   # the emulated arm's limits (URControllerEmulator(limits=))

__all__ = ["URControllerEmulator", "EmulatorProcess", "ControlClient", "ControlServer",
           "wait_until", "parse_version", "UR5_LIMITS", "JointLimits"]
