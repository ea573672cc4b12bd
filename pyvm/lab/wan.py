"""A shaped network path between two pyvm processes: namespaces, veth pairs, tbf, a relay.

``wan_path("rate=100Mbit,delay=10ms,loss=0.001")`` builds, for the life of a ``with``
block (and removes, also on error)::

    netns S (source pyvm)              this process (root ns)               netns D (destination)
    10.231.N.2 --veth-- 10.231.N.1  [relay: delay, loss]  10.231.N.5 --veth-- 10.231.N.6:4444
                                                          tbf rate here (egress toward D)

What shapes what (this kernel has no ``netem`` qdisc):

* **rate** — the kernel: a ``tbf`` qdisc on the relay's veth toward the destination
  (``tc qdisc add ... tbf rate R burst B latency 100ms``);
* **delay** — the relay (:class:`Relay`): every chunk it reads is sent on ``delay``
  seconds later, in each direction (a one-way delay; the round trip is twice it);
* **loss** — the relay too, as a cost rather than a drop (the path carries TCP): each
  1448-byte segment of a chunk is lost with probability ``loss`` and each loss stalls the
  stream for one round trip, as TCP's fast retransmit does.

Addresses are private (10.231.0.0/16) on veth pairs that exist only while the path does;
nothing is routed beyond them.  Network namespaces and ``tc`` need root.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from pyvm.lab.errors import LabError
from pyvm.lab.link import parse_rate, parse_time

PORT = 4444
SEGMENT = 1448              # TCP payload per segment on a 1500-byte MTU
CHUNK = 64 * 1024
#: Socket buffers of the relay's sockets and the least it queues per direction: small,
#: so that the shaped link's backpressure reaches the source as it would over a real
#: path, instead of megabytes vanishing into buffers at loopback speed.
BUFFER = 256 * 1024


@dataclass(frozen=True)
class WanSpec:
    rate: float = 0.0       # bytes/s, 0: unshaped
    delay: float = 0.0      # seconds, one way
    loss: float = 0.0       # per segment

    @classmethod
    def parse(cls, text: str) -> "WanSpec":
        vals: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("rate", "delay", "loss"):
                raise LabError(f"wan '{text}': expected rate=RATE, delay=TIME, loss=FRACTION")
            try:
                vals[key] = (parse_rate(value) if key == "rate" else
                             parse_time(value) if key == "delay" else float(value))
            except ValueError:
                raise LabError(f"wan '{text}': bad value for {key}") from None
        spec = cls(**vals)
        if not 0 <= spec.loss < 1:
            raise LabError(f"wan '{text}': loss must be in [0, 1)")
        return spec


class _Pipe:
    """One direction of one connection: a reader stamps chunks, a sender sends them when
    due.  Bounded: the reader waits while ``QUEUE_BYTES`` are queued."""

    def __init__(self, src: socket.socket, dst: socket.socket, spec: WanSpec,
                 rng: random.Random) -> None:
        self.src, self.dst, self.spec, self.rng = src, dst, spec, rng
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.eof = False
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._send, daemon=True)]
        self.stall_until = 0.0
        # what a real path holds in flight: the bandwidth-delay product (both ways)
        self.cap = max(BUFFER, int(spec.rate * spec.delay * 2))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _penalty(self, nbytes: int) -> float:
        if not self.spec.loss:
            return 0.0
        segments = -(-nbytes // SEGMENT)
        lost = sum(1 for _ in range(segments) if self.rng.random() < self.spec.loss)
        return lost * max(2 * self.spec.delay, 0.001)

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                if not data:
                    break
                with self.cond:
                    while self.queued >= self.cap and not self.eof:
                        self.cond.wait(0.5)
                    now = time.monotonic()
                    self.stall_until = max(self.stall_until, now) + self._penalty(len(data))
                    self.queue.append((max(now + self.spec.delay, self.stall_until), data))
                    self.queued += len(data)
                    self.cond.notify_all()
        except OSError:
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _send(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof:
                        self.cond.wait(0.5)
                    if not self.queue:
                        break
                    due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)     # the chunk's own delivery time
                self.dst.sendall(data)
                with self.cond:
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=5)


class Relay:
    """Accepts on ``listen`` and connects each client to ``target``; delays both
    directions by ``spec.delay`` and charges ``spec.loss`` (see the module docstring).
    :meth:`close` stops and joins every thread."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], spec: WanSpec,
                 seed: int = 1) -> None:
        self.target, self.spec = target, spec
        self.rng = random.Random(seed)
        self.server = socket.create_server(listen)
        # set before accept so the window the source sees is small from the start
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        self.address = self.server.getsockname()[:2]
        self.pipes: list[_Pipe] = []
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.closed:
                    client.close()
                    upstream.close()
                    return
                pipes = [_Pipe(client, upstream, self.spec, self.rng),
                         _Pipe(upstream, client, self.spec, self.rng)]
                self.socks += [client, upstream]
                self.pipes += pipes
            for p in pipes:
                p.start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            socks, pipes = list(self.socks), list(self.pipes)
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.acceptor.join(timeout=5)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for p in pipes:
            with p.cond:
                p.eof = True
                p.cond.notify_all()
            p.join()
        for s in socks:
            s.close()


@dataclass(frozen=True)
class WanPath:
    """How to start the two pyvm processes and migrate between them."""

    src_prefix: tuple[str, ...]
    dst_prefix: tuple[str, ...]
    uri: str
    incoming: str
    spec: WanSpec


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise LabError(f"wan: '{' '.join(cmd)}' failed: {r.stderr.strip()}")


@contextlib.contextmanager
def wan_path(text: str) -> Iterator[WanPath]:
    """The shaped path of the module docstring, for the ``with`` block."""
    spec = WanSpec.parse(text)
    if os.geteuid() != 0:
        raise LabError("wan: network namespaces and tc need root")
    tag = f"{os.getpid() % 100000}"
    net = f"10.231.{os.getpid() % 250}"
    ns_s, ns_d = f"pyvmlab-{tag}-s", f"pyvmlab-{tag}-d"
    s0, s1, d0, d1 = (f"pvl{tag}{x}" for x in ("s0", "s1", "d0", "d1"))
    relay: Relay | None = None
    made: list[tuple[str, ...]] = []
    try:
        for ns in (ns_s, ns_d):
            _run("ip", "netns", "add", ns)
            made.append(("ip", "netns", "del", ns))
        for here, there, ns, a, b in ((s0, s1, ns_s, "1", "2"), (d0, d1, ns_d, "5", "6")):
            _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            made.append(("ip", "link", "del", here))
            _run("ip", "link", "set", there, "netns", ns)
            _run("ip", "addr", "add", f"{net}.{a}/30", "dev", here)
            _run("ip", "link", "set", here, "up")
            _run("ip", "-n", ns, "addr", "add", f"{net}.{b}/30", "dev", there)
            _run("ip", "-n", ns, "link", "set", there, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        if spec.rate:
            burst = max(32 * 1024, int(spec.rate / 250))
            _run("tc", "qdisc", "add", "dev", d0, "root", "tbf", "rate", f"{int(spec.rate)}bps",
                 "burst", str(burst), "latency", "100ms")
        relay = Relay((f"{net}.1", PORT), (f"{net}.6", PORT), spec)
        yield WanPath(("ip", "netns", "exec", ns_s), ("ip", "netns", "exec", ns_d),
                      f"tcp:{net}.1:{PORT}", f"tcp:{net}.6:{PORT}", spec)
    finally:
        if relay is not None:
            relay.close()
        for cmd in reversed(made):
            subprocess.run(cmd, capture_output=True)


def namespaces_left() -> list[str]:
    """The lab's network namespaces that exist now (tests check none is left)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith("pyvmlab-")]
