"""Teleoperation devices for recording demonstrations (python -m dpag_engine.record).

    spacemouse.py  a 3Dconnexion SpaceMouse (pyspacemouse 2.x, imported lazily): 6-DoF TCP velocity
    keyboard.py    the terminal in raw mode (termios): episode control in every mode, and TCP
                   velocities on keys
    freedrive.py   ur_rtde teach mode: the operator moves the arm by hand
    base.py        the device interface, the velocity shaping (deadband, scaling, slew) and the TCP
                   target integrated, kept in the workspace box and solved to joints for the scheduler
"""
from .base import (CLOSE, FRAMES, OPEN, TOGGLE, DeviceInput, TcpTarget, Teleop, TeleopFault, TwistShaper,
                   apply_deadband, continuous_rotvec)
from .freedrive import FreedriveTeleop
from .keyboard import KEY_HELP, KeyboardTeleop, Terminal
from .spacemouse import SpaceMouseTeleop, TeleopUnavailable, parse_axis_map

__all__ = ["CLOSE", "FRAMES", "OPEN", "TOGGLE", "DeviceInput", "TcpTarget", "Teleop", "TeleopFault", "TwistShaper",
           "apply_deadband", "continuous_rotvec", "FreedriveTeleop", "KEY_HELP", "KeyboardTeleop", "Terminal",
           "SpaceMouseTeleop", "TeleopUnavailable", "parse_axis_map"]
