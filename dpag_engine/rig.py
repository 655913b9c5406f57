"""A cell's hardware for one run: the arm, the cameras and the gripper it needs, and the emulator
when the arm is emulated. Serving and recording both measure the cell through it, one `Snapshot`
per policy step (spec_io.py), so a dataset and a served policy see observations built one way.

    rig = Rig.for_cell(cell, robot, camera_names, gripper_needed, resolutions, host, emulator)
    rig.connect()                  # emulator, arm, cameras (first frame), gripper (activated)
    snap = rig.snapshot(t, inputs) # the arm's newest state, the gripper's width, each camera's frame nearest t
    rig.close()                    # every part, each once, whatever failed
A camera or the gripper that stops delivering raises SensorFault; the arm's own faults are the
robot's (robot.py).
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from . import _C
from .cameras import CameraFault, open_camera
from .cameras.sim import SIM_CAMERA_PORT
from .cell import Cell
from .gripper import GripperFault, RobotiqGripper
from .robot import UR5Robot
from .spec_io import Snapshot


class SensorFault(RuntimeError):
    """A camera or the gripper stopped delivering (disconnect, stall, fault code)."""


class Rig:
    def __init__(self, robot: UR5Robot, cameras: dict | None = None, gripper=None, emulator=None):
        self.robot, self.cameras, self.gripper, self.emulator = robot, cameras or {}, gripper, emulator

    @classmethod
    def for_cell(cls, cell: Cell, robot: UR5Robot, camera_names, gripper_needed: bool,
                 resolutions: dict[str, tuple[int, int]], host: str, emulator=None) -> "Rig":
        """The cell's cameras `camera_names` and, if needed, its gripper, none of them opened yet.
        An emulated camera renders at `resolutions[name]` (what the policy or dataset stores) unless
        the config asks for another."""
        cameras = {}
        for name in camera_names:
            c = cell.cameras[name]
            extra = {"address": (host, SIM_CAMERA_PORT)} if c.kind == "sim" else {}
            resolution = c.resolution or (resolutions.get(name) if c.kind == "sim" else None)
            cameras[name] = open_camera(c.source, name, fps=c.fps, resolution=resolution, **extra)
        g = cell.gripper
        gripper = RobotiqGripper(host, g.port, g.model, g.speed, g.force) if gripper_needed and g.kind == "robotiq" else None
        return cls(robot, cameras, gripper, emulator)

    def connect(self) -> None:
        """ConnectionError / RuntimeError from the arm (unreachable, not ready); SensorFault from the rest."""
        if self.emulator is not None:
            self.emulator.start()
            print(f"{self.emulator.banner}", file=sys.stderr)
        self.robot.connect()
        try:
            for cam in self.cameras.values():
                cam.start()
            if self.gripper is not None:
                self.gripper.connect()
        except (CameraFault, GripperFault) as err:
            raise SensorFault(str(err)) from err

    def snapshot(self, t: float, task_inputs: dict) -> Snapshot:
        q, qd = self.robot.joint_state()
        try:
            width = self.gripper.width()[0] if self.gripper is not None else None
            frames = {name: cam.nearest(t) for name, cam in self.cameras.items()}
        except (CameraFault, GripperFault) as err:
            raise SensorFault(str(err)) from err
        return Snapshot(t, q, qd, width, frames, task_inputs)

    def command_gripper(self, width: float) -> None:
        try:
            self.gripper.command(width)
        except GripperFault as err:
            raise SensorFault(str(err)) from err

    def move_home(self, q_home: np.ndarray, dt: float, check=lambda: None, speed: float = 0.5) -> None:
        """A straight joint-space ramp to home at `speed` rad/s through the scheduler (so limited),
        the gripper opening on the way; returns once the arm rests there. `check()` runs while
        waiting (it raises to abandon); TimeoutError if the arm does not get there."""
        if self.gripper is not None:
            self.command_gripper(self.gripper.model.stroke_m)
        robot = self.robot
        q = robot.joint_positions()
        n = max(2, int(math.ceil(np.max(np.abs(q_home - q)) / (speed * dt))) + 1)
        ramp = q + np.linspace(0.0, 1.0, n)[1:, None] * (q_home - q)
        # Repeat the end so the spline's tangent there is zero: the ramp stops at home, no overshoot.
        ramp = np.vstack([ramp, np.repeat(ramp[-1:], 3, axis=0)])
        result = robot.scheduler.submit(ramp, _C.monotonic() + dt, dt)
        if not result.accepted:
            raise RuntimeError(f"home ramp rejected: {result.reason}")
        deadline = time.monotonic() + n * dt + 3.0
        while time.monotonic() < deadline:
            check()
            cmd = robot.scheduler.commanded()
            if cmd is not None and np.max(np.abs(robot.joint_positions() - q_home)) < 2e-3 \
                    and np.max(np.abs(cmd[1])) < 1e-3:
                return
            time.sleep(0.02)
        raise TimeoutError("could not reach the home pose (is the arm tracking its commands?)")

    def close(self) -> None:
        for cam in self.cameras.values():
            cam.stop()
        if self.gripper is not None:
            self.gripper.close()
        self.robot.close()
        if self.emulator is not None:
            self.emulator.stop()
