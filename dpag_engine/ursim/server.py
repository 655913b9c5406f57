"""TCP plumbing of the emulator: listening sockets, one thread per connection, bounded send buffers.

Servers listens on the emulator's ports (one accept thread each), hands every connection to its
protocol's handler on a thread of its own and closes the connection when the handler returns.
It bounds what a client can cost: at most MAX_CLIENTS open connections (all ports together),
an unexpected handler error closes that one connection (counted and logged), and a
refusal window ("connection dropped") closes the listeners so reconnects are refused.

BufferedSender is the sending side of a connection the timing thread writes to: it never blocks,
and a client that stops reading is dropped once SEND_BACKLOG bytes wait for it.
"""
import select
import socket
import threading
import time

SEND_BACKLOG = 64 * 1024            # bytes a client may leave unread beyond the kernel's buffer
MAX_CLIENTS = 64                    # open connections, all ports together (one thread each)


class Servers:
    """The listeners and connection threads of one emulator on `host`.

    `lock` is the emulator's lock, `stopping` the event that ends every loop, `logs` the
    emulator's Logs (connection events and handler errors).
    """

    def __init__(self, host, lock, stopping, logs):
        self.host, self._lock, self._stopping, self._logs = host, lock, stopping, logs
        self.threads = []                               # every thread of the emulator
        self.refuse_until = 0.0                         # monotonic time; see refuse()
        self._listeners = {}                            # port -> socket (None while refusing)
        self._client_socks = set()

    def listen(self, port, name, handler):
        """Serve `port`: handler(sock, addr) runs on its own thread per connection (`name` is
        what the event log calls its connections)."""
        self._listeners[port] = self._bind(port)
        self.spawn(self._serve, port, name, handler)

    def spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"ursim-{fn.__name__}")
        t.start()
        with self._lock:    # forget finished client threads: a long run opens many connections
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
        return t

    def stop(self):
        """After `stopping` is set: close every connection, wait for the threads, stop listening."""
        self.close_clients()
        for t in self.threads:
            t.join(timeout=2.0)
        for s in self._listeners.values():
            if s is not None:
                s.close()
        self._listeners.clear()

    def refuse(self, seconds):
        """Refuse new connections for `seconds` (call with the lock held). The listeners close
        now: a reconnect in the next few ms must be refused, not queued in the kernel backlog."""
        self.refuse_until = time.monotonic() + seconds
        if seconds > 0:
            for port, s in list(self._listeners.items()):
                if s is not None:
                    s.close()
                    self._listeners[port] = None

    def close_clients(self):
        with self._lock:
            socks = list(self._client_socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def chunks(self, sock):
        """Data as it arrives, until the peer closes or the emulator stops (the poll timeout lets
        the loop check for stop; it works for blocking and non-blocking sockets alike)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(500):
                continue
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            if not chunk:
                return
            yield chunk

    def _bind(self, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(8)
        s.settimeout(0.1)   # accept() wakes up to notice stop() and refusal windows
        return s

    def _serve(self, port, name, handler):
        while not self._stopping.is_set():
            if time.monotonic() < self.refuse_until:
                # "Connection dropped": nobody listens, so reconnect attempts are refused.
                if self._listeners.get(port) is not None:
                    self._listeners[port].close()
                    self._listeners[port] = None
                time.sleep(0.05)
                continue
            if self._listeners.get(port) is None:
                try:
                    self._listeners[port] = self._bind(port)
                except OSError:
                    time.sleep(0.1)
                    continue
            try:
                sock, addr = self._listeners[port].accept()
            except (socket.timeout, OSError, AttributeError):   # AttributeError: just closed
                continue
            with self._lock:
                full = len(self._client_socks) >= MAX_CLIENTS
                if not full:
                    self._client_socks.add(sock)
            if full:    # a client leaking connections must not cost a thread each, without end
                self._logs.event(f"too many connections: {addr[0]}:{addr[1]} on {port} closed")
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(0.5)    # dashboard replies; RTDE sockets are made non-blocking
            self.spawn(self._client, name, handler, sock, addr)

    def _client(self, name, handler, sock, addr):
        try:
            handler(sock, addr)
        except OSError:
            pass                    # the peer went away
        except Exception as e:      # an input nobody foresaw: it closes this connection only
            self._logs.handler_error(f"{name} {addr[0]}:{addr[1]}", e)
        finally:
            with self._lock:
                self._client_socks.discard(sock)
            sock.close()


class BufferedSender:
    """The sending side of a connection that two threads write to (replies and a stream).

    The socket is non-blocking: what the kernel does not take at once waits in a backlog of at
    most SEND_BACKLOG bytes. Past that the client is not reading and is dropped, so a silent
    client can never block the writer (the timing thread, and with it every other client).
    """

    def __init__(self, sock, name, on_drop=None):
        self.sock, self.name, self.on_drop = sock, name, on_drop
        self.send_lock = threading.Lock()
        self.backlog = bytearray()
        self.dropped = False

    def send(self, data=b""):
        """Queue data and write what the socket takes now; never blocks. False once dropped."""
        with self.send_lock:
            if self.dropped:
                return False
            self.backlog += data
            try:
                while self.backlog:
                    del self.backlog[:self.sock.send(self.backlog)]
            except (BlockingIOError, InterruptedError):
                pass                # kernel buffer full: the rest goes out on a later call
            except OSError as e:
                return self.drop(f"send failed ({e})")
            if len(self.backlog) > SEND_BACKLOG:
                return self.drop(f"not reading ({len(self.backlog)} bytes waiting)")
            return True

    def drop(self, reason):
        self.dropped = True
        self.backlog = bytearray()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # the reader thread sees EOF and cleans up
        except OSError:
            pass
        if self.on_drop:
            self.on_drop(f"{self.name} dropped: {reason}")
        return False
