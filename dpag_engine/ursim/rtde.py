"""RTDE sessions on port 30004, over the wire format in protocol.py.

Each connection (RtdeConnection) has its own recipes: one output recipe streamed at the rate it
asked for (capped by the controller's), and up to 255 input recipes. An input variable belongs
to the connection that set it up first; another connection's recipe with it gets IN_USE. Only
setup requests are answered (and recorded in the setup log); a malformed one gets the failure
reply (accepted 0, recipe id 0), unknown message types are ignored, and a data package for no
recipe of the connection, or of the wrong size, is dropped.

stream() is the timing thread's side: a phase accumulator sends a client at f Hz a package on
f of every `rate` cycles, through the connection's bounded, never-blocking send buffer.
"""
import struct

from . import protocol as P
from .logs import describe_error, loggable
from .server import BufferedSender

# The requests the controller answers (and the setup log records); data packages aside.
SETUP_TYPES = {P.REQUEST_PROTOCOL_VERSION, P.GET_URCONTROL_VERSION, P.SETUP_OUTPUTS, P.SETUP_INPUTS,
               P.START, P.PAUSE}


class RtdeConnection(BufferedSender):
    """One RTDE client: its recipes and its outgoing bytes (number: 1, 2, ... per emulator)."""

    def __init__(self, sock, addr, number, on_drop=None):
        super().__init__(sock, f"rtde client {number}", on_drop)
        self.addr, self.number = addr, number
        self.output = None          # Recipe streamed to this client
        self.frequency = 0.0
        self.phase = 0.0
        self.inputs = []            # input recipes; id = index + 1 (ur_rtde hard-codes 1..23)
        self.started = False


class RtdeServer:
    """The RTDE connections of one controller (version tuple, cycle rate in Hz).

    on_data(conn, payload) receives every data package; `chunks` is Servers.chunks.
    """

    def __init__(self, version, rate, lock, logs, chunks, on_data):
        self.version, self.rate = version, rate
        self._lock, self._logs, self._chunks, self._on_data = lock, logs, chunks, on_data
        self.conns = set()
        self._input_owner = {}                          # input name -> RtdeConnection
        self._count = 0

    def client(self, sock, addr):
        sock.setblocking(False)     # see BufferedSender
        with self._lock:
            self._count += 1
            conn = RtdeConnection(sock, addr, self._count, on_drop=self._logs.event)
            self.conns.add(conn)
        buf = bytearray()
        try:
            for chunk in self._chunks(sock):
                buf += chunk
                while len(buf) >= P.HEADER.size:
                    size, mtype = P.HEADER.unpack_from(buf)
                    if size < P.HEADER.size:
                        return              # corrupt stream: drop the client like a controller would
                    if len(buf) < size:
                        break
                    payload = bytes(buf[P.HEADER.size:size])
                    del buf[:size]
                    self._message(conn, mtype, payload)
        finally:
            with self._lock:
                self.conns.discard(conn)
                for name in [n for n, c in self._input_owner.items() if c is conn]:
                    del self._input_owner[name]

    def _message(self, conn, mtype, payload):
        if mtype == P.DATA_PACKAGE:
            self._on_data(conn, payload)
            return
        if mtype not in SETUP_TYPES:
            return                  # text messages from a client, unknown types: ignored, not answered
        entry = self._logs.setup(conn.number, mtype)
        if mtype == P.REQUEST_PROTOCOL_VERSION:
            ok = len(payload) >= 2 and struct.unpack_from(">H", payload)[0] == 2   # only v2 framing
            conn.send(P.frame(mtype, struct.pack(">B", ok)))
        elif mtype == P.GET_URCONTROL_VERSION:
            conn.send(P.frame(mtype, struct.pack(">IIII", *self.version)))
        elif mtype == P.SETUP_OUTPUTS:
            self._setup_outputs(conn, payload, entry)
        elif mtype == P.SETUP_INPUTS:
            self._setup_inputs(conn, payload, entry)
        elif mtype == P.START:
            conn.send(P.frame(mtype, b"\x01"))   # reply before the first data package
            conn.started = True
        elif mtype == P.PAUSE:
            conn.started = False
            conn.send(P.frame(mtype, b"\x01"))

    def _setup_outputs(self, conn, payload, entry):
        if len(payload) < 8:                        # not even the frequency
            entry.update(names=[], n_names=0, frequency=None, recipe_id=0)
            conn.send(P.setup_reply(P.SETUP_OUTPUTS, 0, []))
            return
        (freq,) = struct.unpack_from(">d", payload)
        names = P.parse_names(payload[8:])
        types = P.fit_package([P.OUTPUT_TYPES[n] if P.output_available(n, self.version)
                               else "NOT_FOUND" for n in names])
        ok = bool(names) and "NOT_FOUND" not in types and freq > 0     # (NaN fails too)
        if ok:
            conn.output = P.Recipe(1, names, types)
            # Stream at the requested rate, capped by the controller's limit.
            conn.frequency, conn.phase = min(freq, self.rate), float(self.rate)
        entry.update(names=loggable(names), n_names=len(names), frequency=freq,
                     recipe_id=1 if ok else 0)
        conn.send(P.setup_reply(P.SETUP_OUTPUTS, 1 if ok else 0, types))

    def _setup_inputs(self, conn, payload, entry):
        names = P.parse_names(payload)
        with self._lock:
            types = []
            for n in names:
                owner = self._input_owner.get(n)
                types.append("NOT_FOUND" if n not in P.INPUT_TYPES
                             else "IN_USE" if owner is not None and owner is not conn
                             else P.INPUT_TYPES[n])
            types = P.fit_package(types)
            # Recipe ids are one byte: a connection can configure at most 255 input recipes.
            ok = names and not {"NOT_FOUND", "IN_USE"} & set(types) and len(conn.inputs) < 255
            rid = 0
            if ok:
                rid = len(conn.inputs) + 1
                conn.inputs.append(P.Recipe(rid, names, types))
                for n in names:
                    self._input_owner[n] = conn
            entry.update(names=loggable(names), n_names=len(names), recipe_id=rid)
        conn.send(P.setup_reply(P.SETUP_INPUTS, rid, types))

    def unpack_inputs(self, conn, payload):
        """A data package's {name: value} by the connection's input recipe; None if it is for
        no recipe of the connection or has the wrong size (logged)."""
        if not payload:
            return None
        rid = payload[0]
        if not 1 <= rid <= len(conn.inputs):
            return None
        recipe = conn.inputs[rid - 1]
        if len(payload) != recipe.struct.size:
            self._logs.event(f"ignored data package for recipe {rid}: {len(payload)} bytes, "
                             f"expected {recipe.struct.size}")
            return None
        return recipe.unpack(payload)

    def stream(self, c, values):
        """One controller cycle of client c's stream, packed from the output table `values`."""
        # Phase accumulator: a client at f Hz gets a package on f of every `rate` ticks.
        due = c.started and c.output is not None
        if due:
            c.phase += c.frequency
            due = c.phase >= self.rate
        if not due:
            if c.backlog:
                c.send()            # what the kernel could not take yet (setup replies, data)
            return
        c.phase -= self.rate
        try:
            package = c.output.pack(values)
        except Exception as e:      # setup checked the recipe; a last resort, for this client only
            self._logs.tick_error()
            c.drop(f"cannot pack its recipe: {describe_error(e)}")
            return
        c.send(package)
