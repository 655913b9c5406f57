"""RTDE wire format (protocol v2) and the variable tables the emulator serves.

Facts from docs/ur_rtde_protocol.md (shared docs): header `>HB` (size incl. header,
type), everything big-endian; ur_rtde unpacks outputs with its own width table,
so the widths below must match it exactly (vectors are 6 wide except the four
3-wide names).
"""
import struct

# Message types (ASCII letters).
REQUEST_PROTOCOL_VERSION = 86   # 'V'
GET_URCONTROL_VERSION = 118     # 'v'
TEXT_MESSAGE = 77               # 'M'
DATA_PACKAGE = 85               # 'U'
SETUP_OUTPUTS = 79              # 'O'
SETUP_INPUTS = 73               # 'I'
START = 83                      # 'S'
PAUSE = 80                      # 'P'

HEADER = struct.Struct(">HB")
# The size field is a uint16 that counts the header: no message, in or out, can be larger.
MAX_PACKAGE_SIZE = 65535

# RTDE type name -> struct format (without byte order).
TYPE_FORMATS = {
    "DOUBLE": "d", "INT32": "i", "UINT32": "I", "UINT64": "Q", "UINT8": "B", "BOOL": "?",
    "VECTOR6D": "6d", "VECTOR3D": "3d", "VECTOR6INT32": "6i", "VECTOR6UINT32": "6I",
}


def frame(msg_type, payload=b""):
    return HEADER.pack(HEADER.size + len(payload), msg_type) + payload


def parse_names(data):
    """'name1,name2,' (setup request) -> names; bytes that are not UTF-8 become U+FFFD, so such a
    name is simply unknown (NOT_FOUND) instead of an error."""
    return [n for n in data.decode("utf-8", "replace").split(",") if n]


def fit_package(types):
    """types, with every field from the first one that would make a data package larger than
    MAX_PACKAGE_SIZE on marked NOT_FOUND: such a recipe could never be sent, so the setup fails
    (id 0) like one with an unknown name, and the reply says which fields did not fit."""
    size, out = HEADER.size + 1, []     # header and recipe id
    for t in types:
        if t in TYPE_FORMATS:
            size += struct.calcsize(">" + TYPE_FORMATS[t])
            if size > MAX_PACKAGE_SIZE:
                t = "NOT_FOUND"
        out.append(t)
    return out


def setup_reply(msg_type, recipe_id, types):
    """Reply to a setup request: uint8 recipe id + "TYPE1,TYPE2,...". A failed setup of tens of
    thousands of names would not fit one package; its list is cut after the last whole type
    that fits (a recipe that can succeed always fits: see fit_package)."""
    text = ",".join(types).encode()
    room = MAX_PACKAGE_SIZE - HEADER.size - 1
    if len(text) > room:
        recipe_id, text = 0, text[:text.rfind(b",", 0, room + 1)]
    return frame(msg_type, struct.pack(">B", recipe_id) + text)


def _output_types():
    t = {name: "DOUBLE" for name in (
        "timestamp", "actual_execution_time", "speed_scaling", "target_speed_fraction",
        "actual_momentum", "actual_main_voltage", "actual_robot_voltage", "actual_robot_current",
        "standard_analog_input0", "standard_analog_input1", "standard_analog_output0",
        "standard_analog_output1", "payload")}
    t.update({name: "VECTOR6D" for name in (
        "target_q", "target_qd", "target_qdd", "target_current", "target_moment", "actual_q",
        "actual_qd", "actual_qdd", "actual_current", "actual_current_as_torque", "actual_moment",
        "joint_control_output", "actual_TCP_pose", "actual_TCP_speed", "actual_TCP_force",
        "target_TCP_pose", "target_TCP_speed", "joint_temperatures", "actual_joint_voltage",
        "ft_raw_wrench", "payload_inertia")})
    t.update({name: "VECTOR3D" for name in (
        "actual_tool_accelerometer", "payload_cog", "elbow_position", "elbow_velocity")})
    t.update({"actual_digital_input_bits": "UINT64", "actual_digital_output_bits": "UINT64",
              "robot_mode": "INT32", "safety_mode": "INT32", "joint_mode": "VECTOR6INT32",
              "runtime_state": "UINT32", "robot_status_bits": "UINT32",
              "safety_status_bits": "UINT32", "output_bit_registers0_to_31": "UINT32",
              "output_bit_registers32_to_63": "UINT32"})
    for n in range(48):
        t[f"output_int_register_{n}"] = "INT32"
        t[f"output_double_register_{n}"] = "DOUBLE"
    return t


def _input_types():
    t = {"external_force_torque": "VECTOR6D", "speed_slider_mask": "UINT32",
         "speed_slider_fraction": "DOUBLE", "input_bit_registers0_to_31": "UINT32",
         "input_bit_registers32_to_63": "UINT32", "standard_analog_output_mask": "UINT8",
         "standard_analog_output_type": "UINT8", "standard_analog_output_0": "DOUBLE",
         "standard_analog_output_1": "DOUBLE"}
    for name in ("standard_digital_output", "configurable_digital_output", "tool_digital_output"):
        t[name] = t[name + "_mask"] = "UINT8"
    for n in range(48):
        t[f"input_int_register_{n}"] = "INT32"
        t[f"input_double_register_{n}"] = "DOUBLE"
    for n in range(64, 128):
        t[f"input_bit_register_{n}"] = "BOOL"
    return t


OUTPUT_TYPES = _output_types()
INPUT_TYPES = _input_types()


def output_available(name, version):
    """Whether a controller of `version` (major, minor, bugfix, build) offers output `name`.

    Mirrors the version gates ur_rtde applies to its default receive recipe, so a
    client asking a CB3 for an e-Series-only variable gets NOT_FOUND like on a real arm.
    """
    if name not in OUTPUT_TYPES:
        return False
    mm = version[:3]
    cb3 = version[0] < 5
    if name in ("payload", "payload_cog"):
        return mm >= (3, 11, 0) if cb3 else mm >= (5, 5, 1)
    if name == "payload_inertia":
        return mm >= (3, 15, 0) if cb3 else mm >= (5, 11, 0)
    if name == "ft_raw_wrench":
        return not cb3 and mm >= (5, 9, 0)
    if name == "actual_current_as_torque":
        return not cb3 and mm >= (5, 23, 0)
    return True


class Recipe:
    """A configured list of variables with a precompiled struct for (un)packing."""

    def __init__(self, recipe_id, names, types):
        self.id = recipe_id
        self.names = names
        self.types = types
        self.struct = struct.Struct(">B" + "".join(TYPE_FORMATS[t] for t in types))
        self.widths = [struct.calcsize(TYPE_FORMATS[t]) // struct.calcsize(TYPE_FORMATS[t][-1])
                       for t in types]

    def pack(self, values):
        """values: dict name -> scalar or sequence; returns a framed data package."""
        flat = [self.id]
        for name, width in zip(self.names, self.widths):
            v = values[name]
            if width == 1:
                flat.append(v)
            else:
                flat.extend(v[:width])
        return frame(DATA_PACKAGE, self.struct.pack(*flat))

    def unpack(self, payload):
        """Payload of an incoming data package -> dict name -> value (tuple for vectors)."""
        flat = self.struct.unpack(payload)[1:]
        out, i = {}, 0
        for name, width in zip(self.names, self.widths):
            out[name] = flat[i] if width == 1 else tuple(flat[i:i + width])
            i += width
        return out
