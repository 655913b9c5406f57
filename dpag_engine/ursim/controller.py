"""The emulated controller's state machine: robot and safety modes, the program's run state and the
registers, around one Arm (arm.py).

What changes these states: the dashboard (play, pause, power, unlock ...), the side channel's
injected faults (protective and emergency stops, program stops), the control script's commands
(script.py) and the arm itself (a joint limit reached). A protective stop halts the arm and
pauses a running program; a program end brakes the arm to a stop. Teach mode (freedrive, the
script's teach_mode() / end_teach_mode()) lasts until end_teach_mode, the program's end or a
safety stop; while it lasts the operator's hand moves the arm (Arm.teach_path) and the script's
motion commands are ignored (script.py counts them in teach_ignored). publish() writes the state
as RTDE output variables, the table every RTDE stream is packed from.

Nothing here locks: every caller holds the emulator's lock.
"""
import time

from . import protocol as P

# Runtime states, robot modes, safety modes (UR enums).
STOPPED, PLAYING, PAUSED = 1, 2, 4
POWER_OFF, IDLE, RUNNING = 3, 5, 7
NORMAL, PROTECTIVE_STOP, ROBOT_EMERGENCY_STOP = 1, 3, 7
SAFETY_MODE_NAMES = {NORMAL: "NORMAL", PROTECTIVE_STOP: "PROTECTIVE_STOP",
                     ROBOT_EMERGENCY_STOP: "ROBOT_EMERGENCY_STOP"}
ROBOT_MODE_NAMES = {POWER_OFF: "POWER_OFF", IDLE: "IDLE", RUNNING: "RUNNING"}
RUNTIME_NAMES = {STOPPED: "STOPPED", PLAYING: "PLAYING", PAUSED: "PAUSED"}
# safety_status_bits: 0 normal, 2 protective stopped, 6 robot e-stopped, 7 emergency
# stopped, 10 stopped due to safety.
SAFETY_BITS = {NORMAL: 1 << 0, PROTECTIVE_STOP: (1 << 2) | (1 << 10),
               ROBOT_EMERGENCY_STOP: (1 << 6) | (1 << 7) | (1 << 10)}
# The control script's signal in output_int_register_<offset>.
SIGNAL_READY, SIGNAL_DONE = 1, 2

_INT_REGISTER, _DOUBLE_REGISTER = "input_int_register_", "input_double_register_"


class Controller:
    """The modes, the program and the 48 + 48 input and output registers; `log_event` takes the
    event log's text."""

    def __init__(self, arm, log_event):
        self.arm = arm
        self._event = log_event
        self.robot_mode, self.safety_mode = RUNNING, NORMAL
        # The program (what rtde_control.script keeps in its globals).
        self.runtime_state = STOPPED
        self.program_name = None
        self.reg_off = 0
        self.executing = False      # a command is being executed (until the client clears it)
        self.blocking = False       # inside a blocking call: done when the arm is idle
        self._wd_freq, self._wd_last = 0.0, 0.0
        self.in_int, self.in_double = [0] * 48, [0.0] * 48
        self.out_int, self.out_double = [0] * 48, [0.0] * 48
        self.inputs = {}            # other input variables (IO, external_force_torque ...)
        self.teach_ignored = 0      # script passes that ignored a motion command in teach mode (ever)

    def can_run(self):
        return self.robot_mode == RUNNING and self.safety_mode == NORMAL

    def step(self, t=None):
        """The arm's motion for one cycle at controller time t; a joint limit reached is a
        protective stop."""
        if not self.arm.step(self.can_run(), t):
            self.protective_stop("joint position limit reached")

    def event(self, text):
        """A line in the event log (for the control script)."""
        self._event(text)

    # --------------------------------------------------------------- teach mode
    def teach_mode(self, on):
        """Freedrive on or off (the control script's teach_mode() / end_teach_mode())."""
        if bool(on) != self.arm.teaching:
            self.arm.teach(on)
            self._event("teach mode (freedrive) on: the operator's hand moves the arm" if on else
                        "teach mode ended (end_teach_mode)")

    def _teach_ends(self, why):
        if self.arm.teaching:
            self._event(f"teach mode ended: {why}")

    # ------------------------------------------------------------------- safety
    def protective_stop(self, reason):
        """Halt the arm and pause a running program (once: nothing happens in a safety stop)."""
        if self.safety_mode != NORMAL:
            return
        self.safety_mode = PROTECTIVE_STOP
        self._teach_ends("protective stop")
        self.arm.halt()
        if self.runtime_state == PLAYING:
            self.runtime_state = PAUSED     # a protective stop pauses the running program
        self._event(f"protective stop: {reason}")

    def unlock_protective_stop(self):
        if self.safety_mode != PROTECTIVE_STOP:
            return False
        self.safety_mode = NORMAL
        self._event("protective stop unlocked from dashboard")
        return True

    def emergency_stop(self, reason):
        self.safety_mode = ROBOT_EMERGENCY_STOP
        self.power_off(f"emergency stop: {reason}")

    def restart_safety(self):
        self.safety_mode, self.robot_mode = NORMAL, POWER_OFF
        self.end_program("safety restarted")

    def reset_faults(self):
        """Back to a powered, brake-released, unfaulted arm (the program is not restarted)."""
        self.safety_mode, self.robot_mode = NORMAL, RUNNING

    def power_on(self):
        if self.robot_mode == POWER_OFF and self.safety_mode == NORMAL:
            self.robot_mode = IDLE

    def brake_release(self):
        if self.robot_mode == IDLE:
            self.robot_mode = RUNNING

    def power_off(self, reason="powered off"):
        self.robot_mode = POWER_OFF
        self._teach_ends(reason)
        self.arm.halt()
        self.end_program(reason)

    # ------------------------------------------------------------------ program
    def start_program(self, name, reg_off):
        self.program_name, self.reg_off = name, reg_off
        self.runtime_state = PLAYING
        self.executing = self.blocking = False
        self._wd_freq = 0.0
        self.out_int[reg_off] = SIGNAL_READY
        self.out_int[reg_off + 2] = 0
        self._event(f"program {name} started (register offset {reg_off})")

    def end_program(self, reason):
        if self.runtime_state != STOPPED:
            self._event(reason)
        self.runtime_state = STOPPED
        self.out_int[self.reg_off] = 0
        self.executing = self.blocking = False
        self._wd_freq = 0.0
        self._teach_ends(f"the program ended ({reason})")
        self.arm.brake()            # like a real program end: brake to a stop (ends teach mode)

    def stop_program(self, reason):
        """End the program; False if none is running or paused."""
        if self.runtime_state == STOPPED:
            return False
        self.end_program(reason)
        return True

    def play(self):
        """Resume the paused program or start the loaded one again; False if there is none or
        the robot cannot run."""
        if self.program_name is None or not self.can_run():
            return False
        if self.runtime_state == STOPPED:
            self.start_program(self.program_name, self.reg_off)
        self.runtime_state = PLAYING
        return True

    def pause(self):
        if self.runtime_state != PLAYING:
            return False
        self.runtime_state = PAUSED
        return True

    def set_watchdog(self, frequency):
        """The RTDE watchdog: the program ends when the command register is not written for
        longer than 1 / frequency (0: off)."""
        self._wd_freq, self._wd_last = frequency, time.monotonic()

    def check_watchdog(self):
        # (elapsed * f > 1, not elapsed > 1 / f: any float the client sent is safe here)
        if (self.runtime_state == PLAYING and self._wd_freq > 0
                and (time.monotonic() - self._wd_last) * self._wd_freq > 1.0):
            self.end_program("RTDE watchdog expired")

    # ---------------------------------------------------------------- registers
    def write_inputs(self, values):
        """An RTDE input package's values into the registers and inputs. Returns the command
        register's name if the package wrote it (that feeds the watchdog), else None."""
        for name, value in values.items():
            if name.startswith(_INT_REGISTER):
                self.in_int[int(name[19:])] = value
            elif name.startswith(_DOUBLE_REGISTER):
                self.in_double[int(name[22:])] = value
            else:
                self.inputs[name] = value
        cmd_reg = f"{_INT_REGISTER}{self.reg_off}"
        if cmd_reg not in values:
            return None
        self._wd_last = time.monotonic()    # the watchdog watches this register
        return cmd_reg

    def publish(self, v, t, exec_time):
        """The state as RTDE output variables into v (controller time t, the last cycle's
        execution time in ms); constants and what is not modelled are filled on the first call."""
        arm = self.arm
        pose, speed = arm.tcp()
        powered = self.robot_mode != POWER_OFF
        v.update({
            "timestamp": t, "actual_q": arm.q, "target_q": arm.q, "actual_qd": arm.qd,
            "target_qd": arm.qd, "actual_qdd": arm.qdd, "target_qdd": arm.qdd,
            "actual_TCP_pose": pose, "target_TCP_pose": pose,
            "actual_TCP_speed": speed, "target_TCP_speed": speed,
            "robot_mode": self.robot_mode, "safety_mode": self.safety_mode,
            "runtime_state": self.runtime_state,
            "joint_mode": [253 if self.robot_mode == RUNNING else (255 if powered else 239)] * 6,
            "robot_status_bits": (1 if powered else 0) | (2 if self.runtime_state == PLAYING else 0),
            "safety_status_bits": SAFETY_BITS[self.safety_mode],
            "actual_execution_time": exec_time,
            "actual_main_voltage": 48.0 if powered else 0.0,
            "actual_robot_voltage": 48.0 if powered else 0.0,
            "actual_joint_voltage": [48.0 if powered else 0.0] * 6,
        })
        for n in range(48):
            v[f"output_int_register_{n}"] = self.out_int[n]
            v[f"output_double_register_{n}"] = self.out_double[n]
        if "speed_scaling" not in v:    # constants and quantities this emulator does not model
            zeros6, zeros3 = [0.0] * 6, [0.0] * 3
            for name, typ in P.OUTPUT_TYPES.items():
                if name not in v:
                    v[name] = {"VECTOR6D": zeros6, "VECTOR3D": zeros3, "VECTOR6INT32": [0] * 6}.get(
                        typ, 0.0 if typ == "DOUBLE" else 0)
            v.update({"speed_scaling": 1.0, "target_speed_fraction": 1.0,
                      "joint_temperatures": [30.0] * 6, "actual_tool_accelerometer": [0.0, 0.0, 9.81]})
