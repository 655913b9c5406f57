"""The TCP-server scaffolding of the emulator's cell servers (robotiq.py, cameras.py).

A Listener owns one listening socket, the thread that accepts on it, one thread per connection,
one background thread (the gripper's model, the cameras' render ticks), and the bookkeeping that
lets stop() end all of them. A subclass gives what differs:

    _serve(sock, addr)   one connection, on its own thread; the connection is closed when it returns
    _loop()              the background thread, until self._stopping is set
    thread_prefix        what its threads are called (tests look for leaked threads by name)
    max_clients          open connections at most; more are closed at once (and counted "refused")
    client_timeout_s     each connection's socket timeout: how often a blocked read notices stop()
    _on_stop()           optional: what to wake before the connections are shut down

Counters live in self._counts (a Counter; "accepted" and "refused" are counted here), under
self._lock, which the subclass shares for its own state.

server.py's Servers is not built on this: it serves several ports under one connection limit,
with the emulator's lock and stop event, and closes and re-binds its listeners for refusal windows.
"""
import collections
import socket
import threading


class Listener:
    """One TCP port served by a thread per connection (see the module docstring).

    port=0 binds a free port (read .port after start()). start() returns self; a started
    Listener cannot start again, even once stopped. stop() is idempotent and a no-op before start().
    """

    thread_prefix = "listener-"
    max_clients = 16
    client_timeout_s = 0.5

    def __init__(self, host, port, counters=()):
        """counters: the stats keys that read 0 before anything is counted (others appear when
        first counted)."""
        self.host, self._port = host, port
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._listener = None
        self._acceptor = None
        self._threads = []              # live threads only (see _spawn)
        self._clients = set()           # open connections' sockets
        self._counts = collections.Counter(dict.fromkeys(counters, 0))

    @property
    def port(self):
        """The bound port (the one asked for until start())."""
        return self._port

    def start(self):
        if self._listener is not None or self._stopping.is_set():
            raise RuntimeError(f"{type(self).__name__} already started (a stopped one cannot restart)")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.host, self._port))
            s.listen(8)
        except OSError:
            s.close()
            raise
        s.settimeout(0.1)       # accept() wakes up to notice stop()
        self._listener, self._port = s, s.getsockname()[1]
        self._acceptor = self._spawn(self._accept)
        self._spawn(self._loop)
        return self

    def stop(self):
        """Close every connection and the listener; wait for the threads. Idempotent."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=2.0)        # no new connections from here on
        self._on_stop()
        self.drop_connections()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=2.0)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def drop_connections(self):
        """Close every client connection now (new ones are still accepted)."""
        with self._lock:
            socks = list(self._clients)
        for s in socks:
            try:
                # shutdown, not close: the connection's thread is blocked in recv/send on it and
                # wakes with EOF or an error, then cleans up and closes the socket itself.
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------------ for subclasses
    def _serve(self, sock, addr):
        raise NotImplementedError

    def _loop(self):
        raise NotImplementedError

    def _on_stop(self):
        pass

    def _count(self, what):
        with self._lock:
            self._counts[what] += 1

    # ------------------------------------------------------------------ threads
    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"{self.thread_prefix}{fn.__name__}")
        t.start()
        with self._lock:    # forget finished client threads: a long run opens many connections
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        return t

    def _accept(self):
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:    # the limit and the counts agree with what stats() reads
                full = len(self._clients) >= self.max_clients
                self._counts["refused" if full else "accepted"] += 1
                if not full:
                    self._clients.add(sock)
            if full:            # a client leaking connections must not cost a thread each
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.client_timeout_s)
            self._spawn(self._client, sock, addr)

    def _client(self, sock, addr):
        try:
            self._serve(sock, addr)
        except OSError:
            pass                # the peer went away or stopped reading
        finally:
            with self._lock:
                self._clients.discard(sock)
            sock.close()
