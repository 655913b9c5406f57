"""Freedrive: the arm in ur_rtde's teach mode, moved by the operator's hand; the recorder samples it.

No velocity device and no servo loop: teach mode is only allowed while the C++ loop is not running
(UR5Robot.teach_mode), so the arm's joint state is read straight from the RTDE receive interface at
the recording rate, and each step's action is the next sample (joint positions, or the TCP pose).

Between episodes the arm is not moved by the recorder: the operator, whose hand is on the arm in
teach mode, brings it back to the start pose (the status line shows how far from home it is). An
automatic move home would mean ending teach mode and servoing the arm while a person may still
hold it; a lab that wants it runs the keyboard or SpaceMouse mode, where the recorder owns the arm.
"""
from __future__ import annotations

from .base import DeviceInput, Teleop
from .spacemouse import TeleopUnavailable


class FreedriveTeleop(Teleop):
    name = "freedrive"

    def __init__(self):
        self.robot = None
        self.engaged = False

    def check(self, robot_class) -> None:
        """Before connecting: the robot driver can put the arm in teach mode."""
        if not callable(getattr(robot_class, "teach_mode", None)):
            raise TeleopUnavailable("--teleop freedrive: this build's UR5Robot has no teach_mode() (ur_rtde "
                                    "teachMode / endTeachMode); record with --teleop keyboard or spacemouse")

    def engage(self, robot) -> None:
        """Teach mode on (the servo loop must not be running)."""
        self.robot = robot
        robot.teach_mode(True)
        self.engaged = True

    def release(self) -> None:
        """Teach mode off, where it is on and the connection allows it; idempotent."""
        if self.engaged and self.robot is not None:
            self.engaged = False
            self.robot.teach_mode(False)

    def read(self, now: float) -> DeviceInput:
        return DeviceInput()

    def describe(self) -> str:
        return "freedrive (teach mode: move the arm by hand)"
