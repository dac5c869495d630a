"""
Stream scenarios of issue 8: idle watches and the upgrade tunnel.  A program that
reports, never a test.

**10,000 idle watches.**  A purpose-built upstream (a child process: plain
``selectors`` + ``ssl``, TLS like an apiserver) answers ``GET ...?watch=1`` with
``200`` chunked ``application/json`` and holds it.  A client (another child, the same
kind of loop) opens N watches, through the real daemon (``twistd banyan-kproxy``) or
straight to the upstream (``direct``), at most 64 TLS handshakes at a time (the
daemon listens with a backlog of 128).  Once the upstream holds all N, it writes one
``{"type":"ADDED",...}`` event to every watch; the fan-out latency of each watch is the
time from just before the upstream's first write to the moment the client read the
event (both clocks are the system's ``CLOCK_MONOTONIC``): p50, p99 and max over all
N.  Memory: the daemon's ``VmRSS`` once 20 warm-up watches are open and again with
N open, so the per-watch figure is the marginal cost of one more watch; and once the
client has gone, with how many upstream connections the daemon still holds.  The
daemon needs two descriptors a watch: RLIMIT_NOFILE is raised for every child (to
the hard limit where the hard limit cannot be raised, as in a container without
CAP_SYS_RESOURCE); if even that is too few, as many watches are opened as fit and the
10,000-watch memory figure is extrapolated from the measured growth per watch (its
note says so).

**Upgrade tunnel.**  The upstream (a child, blocking ``ssl`` in a thread per
connection) answers an upgrade request (``Connection: Upgrade``, ``Upgrade:
SPDY/3.1``, ``X-Stream-Protocol-Version``) with ``101 Switching Protocols`` and then
is a raw sink (upload: it counts the bytes and acknowledges the last one) or a raw
source (download).  The client (another child) moves 1 GB each way in 1 MiB writes,
through the daemon and ``direct``.  With two or more CPUs the daemon is pinned to
CPU 0 and the client and upstream to CPU 1, so the daemon has a core to itself and
the other two share one (``--no-pin`` turns it off); ``direct`` is measured with the
same pinning (the baseline), and once more with the client on CPU 0 for reference.
Each run reports the CPU each process used (from ``/proc``; on a busy machine the
shares stay well under 100 %).

Runs smaller than the issue's (``--quick``: 1,000 watches, 100 MB) are reported under
their own scenario names, so ``bench.py`` does not judge the full-size goals on them.

Run: ``PYTHONPATH=. python benchmarks/streams.py [--quick] [--watches N]
[--tunnel-mb MB] [--only watches|tunnel] [--workdir DIR]``.  For the optimiser:
``--trace-memory`` runs the watch scenario with the daemon under ``tracemalloc`` and
prints where the memory of the watches was allocated and what is left after they
closed (slow; its figures are not comparable); ``--py-spy PATH [--py-spy-native]``
records the daemon with py-spy during each phase (opening the watches, the fan-out,
each tunnel direction) and prints where the time went.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import resource
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    report: Any = None  # children use the standard library only
else:
    # As bench.py does: this folder and the checkout on sys.path, `report` by its name.
    for _path in (HERE, ROOT):
        if _path not in sys.path:
            sys.path.insert(0, _path)
    import report  # type: ignore[no-redef]

#: Metric names of this module's own (the goals' metrics are report.METRIC_*).
METRIC_RSS_IDLE = "RSS with 20 watches open"
METRIC_RSS_AFTER = "RSS after the watches closed"
METRIC_OPEN_TIME = "time to open all watches"

#: The tunnel's reference run with the client and upstream on different CPUs.
DIRECT_SPREAD = "direct, client and upstream on separate CPUs"

#: Watches opened before the "idle" memory sample, so the daemon's lazy imports and
#: first-connection costs are not charged to the watches.
WARM_WATCHES = 20
#: TLS handshakes the watch client has in flight at once (the daemon's listen backlog
#: is 128).
MAX_IN_FLIGHT = 64
WATCH_PATH = "/api/v1/namespaces/bench/pods?watch=1&resourceVersion=1000&allowWatchBookmarks=true"
EVENT = (
    b'{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":'
    b'{"name":"bench-1","namespace":"bench","uid":"5b7e7a1c-3f7e-4d53-9a55-0d3c2c1f7e01",'
    b'"resourceVersion":"1001"},"spec":{"containers":[{"name":"c","image":"busybox"}]},'
    b'"status":{"phase":"Pending"}}}\n'
)
UPGRADE_PATH = "/api/v1/namespaces/bench/pods/bench-1/exec?command=cat&stdin=true&stdout=true"


# -- the children ---------------------------------------------------------------------
#
# Each runs as ``python streams.py --child NAME JSON``, imports only the standard
# library, talks to the driver with lines on stdin/stdout and exits when its stdin
# closes.


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Conn:
    """
    One non-blocking TLS connection of the watch upstream or client.
    """

    __slots__ = ("sock", "state", "buf", "out", "mask", "head_at", "event_at")

    def __init__(self, sock: Any, state: str) -> None:
        self.sock = sock
        self.state = state
        self.buf = b""
        self.out = b""
        self.mask = 0
        self.head_at = 0.0
        self.event_at = 0.0


class _Loop:
    """
    The part of a ``selectors`` loop both watch children share: handshakes, reads,
    buffered writes, closing.
    """

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.closed = 0

    def want(self, c: _Conn, mask: int) -> None:
        if c.out:
            mask |= selectors.EVENT_WRITE
        if mask != c.mask:
            if c.mask:
                self.sel.modify(c.sock, mask, c)
            else:
                self.sel.register(c.sock, mask, c)
            c.mask = mask

    def close(self, c: _Conn) -> None:
        if c.state == "closed":
            return
        if c.mask:
            self.sel.unregister(c.sock)
            c.mask = 0
        c.sock.close()
        c.state = "closed"
        self.closed += 1
        self.on_close(c)

    def on_close(self, c: _Conn) -> None:
        pass

    def handshake(self, c: _Conn) -> bool:
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want(c, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self.want(c, selectors.EVENT_WRITE)
            return False
        except OSError:
            self.close(c)
            return False
        return True

    def send(self, c: _Conn, data: bytes) -> None:
        c.out += data
        self.flush(c)

    def flush(self, c: _Conn) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except OSError:
                self.close(c)
                return
            c.out = c.out[n:]
        self.want(c, selectors.EVENT_READ)

    def read(self, c: _Conn) -> bytes | None:
        """
        Everything readable now (b"" if nothing), or None if the connection closed.
        """
        chunks = []
        while True:
            try:
                data = c.sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except OSError:
                self.close(c)
                return None
            if not data:
                self.close(c)
                return None
            chunks.append(data)
        return b"".join(chunks)


def _child_watch_upstream(options: dict[str, Any]) -> None:
    """
    The watch upstream: holds every ``?watch=1`` request, writes one event to all of
    them on ``fire``.  Commands on stdin: ``count``, ``fire``; EOF ends it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(options["cert"], options["key"])
    context.set_alpn_protocols(["http/1.1"])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8192)
    listener.setblocking(False)
    loop = _Loop()
    watches: set[_Conn] = set()
    loop.on_close = watches.discard  # type: ignore[method-assign]
    loop.sel.register(listener, selectors.EVENT_READ, "listen")
    loop.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Cache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    _out(f"port {listener.getsockname()[1]}")

    def serve(c: _Conn) -> None:
        if c.state == "handshake":
            if not loop.handshake(c):
                return
            c.state = "head"
        data = loop.read(c)
        if data is None:
            return
        if c.state == "held":
            loop.want(c, selectors.EVENT_READ)
            return
        c.buf += data
        while c.state == "head" and b"\r\n\r\n" in c.buf:
            request, _, c.buf = c.buf.partition(b"\r\n\r\n")
            target = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if b"watch=1" in target:
                c.state = "held"
                watches.add(c)
                loop.send(c, head)
            else:
                loop.send(c, plain)
        loop.want(c, selectors.EVENT_READ)

    control = b""
    while True:
        for key, mask in loop.sel.select(timeout=1.0):
            if key.data == "listen":
                while True:
                    try:
                        raw, _ = listener.accept()
                    except BlockingIOError:
                        break
                    raw.setblocking(False)
                    sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                    serve(_Conn(sock, "handshake"))
            elif key.data == "control":
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    return
                control += data
                while b"\n" in control:
                    line, _, control = control.partition(b"\n")
                    command = line.strip()
                    if command == b"count":
                        _out(f"watches {len(watches)}")
                    elif command == b"fire":
                        started = time.monotonic()
                        for c in list(watches):
                            loop.send(c, chunk)
                        _out(f"fired {started!r} {time.monotonic()!r} {len(watches)}")
            else:
                c = key.data
                if mask & selectors.EVENT_WRITE and c.out:
                    loop.flush(c)
                if c.state != "closed" and mask & selectors.EVENT_READ:
                    serve(c)


def _child_watch_client(options: dict[str, Any]) -> None:
    """
    The watch client: opens ``warm`` watches, prints ``sent <n>``, waits for ``go``,
    opens the rest; prints each event as it comes (``events <n>``) and, on
    ``report``, writes the receive times to ``output`` and prints ``reported``.
    """
    host, port, token = options["host"], options["port"], options["token"]
    context = ssl.create_default_context(cafile=options["ca"])
    context.set_alpn_protocols(["http/1.1"])
    request = (
        f"GET {WATCH_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: application/json\r\nUser-Agent: kproxy-bench/watch\r\n\r\n"
    ).encode()
    loop = _Loop()
    conns: list[_Conn] = []
    state = {"target": options["warm"], "started": 0, "in_flight": 0, "sent": 0,
             "events": 0, "failed": 0, "open_failed": 0, "reported_sent": -1, "said": 0}
    loop.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")

    def on_close(c: _Conn) -> None:
        if c.event_at == 0.0:
            state["failed"] += 1
        if c.state in ("connecting", "handshake"):
            state["in_flight"] -= 1
            state["open_failed"] += 1

    loop.on_close = on_close  # type: ignore[method-assign]

    def start_more() -> None:
        while state["started"] < state["target"] and state["in_flight"] < options["in_flight"]:
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setblocking(False)
            raw.connect_ex((host, port))
            c = _Conn(raw, "connecting")
            conns.append(c)
            state["started"] += 1
            state["in_flight"] += 1
            loop.want(c, selectors.EVENT_WRITE)

    def progress(c: _Conn, mask: int) -> None:
        if c.state == "connecting":
            if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                loop.close(c)
                return
            loop.sel.unregister(c.sock)
            c.mask = 0
            c.sock = context.wrap_socket(
                c.sock, server_hostname=host, do_handshake_on_connect=False
            )
            c.state = "handshake"
        if c.state == "handshake":
            if not loop.handshake(c):
                return
            c.state = "waiting"
            state["in_flight"] -= 1
            state["sent"] += 1
            loop.send(c, request)
            return
        if mask & selectors.EVENT_WRITE and c.out:
            loop.flush(c)
        if c.state == "closed" or not mask & selectors.EVENT_READ:
            return
        data = loop.read(c)
        if not data:
            return
        now = time.monotonic()
        c.buf = (c.buf + data)[-4096:]
        if c.head_at == 0.0 and b"\r\n\r\n" in c.buf:
            c.head_at = now
        if c.event_at == 0.0 and b'"ADDED"' in c.buf:
            c.event_at = now
            state["events"] += 1
            c.buf = b""

    control = b""
    deadline = time.monotonic() + options["timeout"]
    while time.monotonic() < deadline:
        start_more()
        for key, mask in loop.sel.select(timeout=0.2):
            if key.data == "control":
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    return
                control += data
                while b"\n" in control:
                    line, _, control = control.partition(b"\n")
                    if line.strip() == b"go":
                        state["target"] = options["count"]
                    elif line.strip() == b"report":
                        with open(options["output"], "w") as f:
                            json.dump({
                                "events": [c.event_at for c in conns if c.event_at],
                                "heads": [c.head_at for c in conns if c.head_at],
                                "opened": state["sent"],
                                "failed": state["failed"],
                            }, f)
                        _out("reported")
            else:
                progress(key.data, mask)
        done = state["sent"] + state["open_failed"]
        if done != state["reported_sent"] and done == state["target"]:
            state["reported_sent"] = done
            _out(f"sent {state['sent']} failed {state['open_failed']}")
        if state["events"] and not state["said"] and state["events"] + state["failed"] >= len(conns):
            _out(f"events {state['events']} failed {state['failed']}")
            state["said"] = 1


def _child_tunnel_upstream(options: dict[str, Any]) -> None:
    """
    The tunnel upstream: ``101`` to every upgrade request, then a sink
    (``mode=upload``: counts ``bytes`` and answers ``done``) or a source
    (``mode=download``).  EOF on stdin ends it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(options["cert"], options["key"])
    context.set_alpn_protocols(["http/1.1"])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    block = memoryview(os.urandom(1 << 20))

    def handle(raw: socket.socket) -> None:
        raw.settimeout(120)
        with raw:
            try:
                s = context.wrap_socket(raw, server_side=True)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    data = s.recv(65536)
                    if not data:
                        return
                    head += data
                request, _, early = head.partition(b"\r\n\r\n")
                target = request.split(b" ", 2)[1].decode()
                query = dict(p.partition("=")[::2] for p in target.partition("?")[2].split("&"))
                if b"upgrade" not in request.lower():
                    s.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    return
                s.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
                )
                total = int(query["bytes"])
                if query["mode"] == "upload":
                    got = len(early)
                    buf = bytearray(1 << 20)
                    while got < total:
                        n = s.recv_into(buf)
                        if not n:
                            return
                        got += n
                    s.sendall(b"done %d\n" % got)
                else:
                    left = total
                    while left:
                        n = s.send(block[: min(left, len(block))])
                        left -= n
                # Wait for the client to close.
                while s.recv(65536):
                    pass
            except OSError:
                return

    def accept() -> None:
        while True:
            raw, _ = listener.accept()
            threading.Thread(target=handle, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    _out(f"port {listener.getsockname()[1]}")
    while sys.stdin.readline():
        pass


def _child_tunnel_client(options: dict[str, Any]) -> None:
    """
    The tunnel client: one upgrade request, then ``bytes`` up or down; prints a JSON
    line with the transfer's seconds and bytes and its own CPU seconds.
    """
    host, port, total, mode = options["host"], options["port"], options["bytes"], options["mode"]
    context = ssl.create_default_context(cafile=options["ca"])
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection((host, port), timeout=120)
    s = context.wrap_socket(raw, server_hostname=host)
    s.sendall((
        f"POST {UPGRADE_PATH}&mode={mode}&bytes={total} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {options['token']}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
        "X-Stream-Protocol-Version: channel.k8s.io\r\n"
        "User-Agent: kproxy-bench/tunnel\r\nContent-Length: 0\r\n\r\n"
    ).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = s.recv(65536)
        if not data:
            raise SystemExit(f"closed before the response head: {head[:200]!r}")
        head += data
    head, _, early = head.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"no 101: {head[:300]!r}")
    cpu_before = os.times()
    started = time.monotonic()
    if mode == "upload":
        block = memoryview(os.urandom(1 << 20))
        left = total
        while left:
            n = min(left, len(block))
            s.sendall(block[:n])
            left -= n
        answer = b""
        while b"\n" not in answer:
            data = s.recv(64)
            if not data:
                break
            answer += data
        moved = int(answer.split()[1]) if answer.startswith(b"done ") else 0
    else:
        buf = bytearray(1 << 20)
        moved = len(early)
        while moved < total:
            n = s.recv_into(buf)
            if not n:
                break
            moved += n
    seconds = time.monotonic() - started
    cpu_after = os.times()
    s.close()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    _out(json.dumps({"seconds": seconds, "bytes": moved, "cpu": cpu}))


_CHILDREN: dict[str, Callable[[dict[str, Any]], None]] = {
    "watch-upstream": _child_watch_upstream,
    "watch-client": _child_watch_client,
    "tunnel-upstream": _child_tunnel_upstream,
    "tunnel-client": _child_tunnel_client,
}


# -- the driver -------------------------------------------------------------------------


class Child:
    """
    A child process whose stdout lines are read by a thread, with bounded waits.
    """

    def __init__(self, argv: Sequence[str], cpus: set[int] | None = None, **popen: Any) -> None:
        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.process = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            preexec_fn=pin if cpus else None, **popen,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def script(cls, name: str, options: dict[str, Any], cpus: set[int] | None = None) -> Child:
        """
        One of this file's children.
        """
        return cls(
            [sys.executable, os.path.abspath(__file__), "--child", name, json.dumps(options)],
            cpus=cpus,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail = (self.tail + [line])[-20:]
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """
        The next line starting with ``prefix``, within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix!r} line from {self.process.args!r} in {timeout:g}s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(
                    f"child {self.process.args[:4]!r} exited ({self.process.wait()}) waiting for "
                    f"{prefix!r}: {self.tail!r}"
                )
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        """
        Close its stdin, then SIGTERM, then SIGKILL, by PID; bounded.
        """
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                continue


def rss_mib(pid: int) -> float:
    """
    A process's resident set (``VmRSS``) in MiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU seconds a process has used (all its threads).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """
    The ``q`` quantile (0..1) of sorted ``values``, nearest rank.
    """
    if not values:
        return float("nan")
    rank = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[rank]


def pinning(enabled: bool) -> tuple[set[int] | None, set[int] | None]:
    """
    (the daemon's CPUs, the client's and upstream's CPUs), or (None, None).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


class Deployment:
    """
    Certificates, a development OIDC issuer (an HTTPS server in a thread of this
    process), an upstream child, and the real daemon (``twistd banyan-kproxy``).
    """

    def __init__(self, directory: str, daemon_cpus: set[int] | None, trace_memory: bool = False) -> None:
        from banyan_kproxy.testing.certs import CertificateAuthority
        from banyan_kproxy.testing.issuer import OIDCIssuer

        self.directory = directory
        self.daemon_cpus = daemon_cpus
        self.trace_memory = trace_memory
        os.makedirs(directory, exist_ok=True)
        self.ca = CertificateAuthority.generate("kproxy bench CA")
        self.ca_file = self.ca.write_cert(directory, "ca")
        self.cert_file, self.key_file = self._issue("server")
        self.issuer = OIDCIssuer("https://127.0.0.1/v2", fresh_keys=True)
        self._issuer_server: Any = None
        self.daemon: Child | None = None
        self.health_port = 0
        self.proxy_port = 0

    def _issue(self, name: str) -> tuple[str, str]:
        issued = self.ca.issue("127.0.0.1", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        return issued.write(self.directory, name)

    def start_issuer(self) -> None:
        """
        Serve the issuer's discovery document and JWKS over HTTPS from a thread.
        """
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        issuer = self.issuer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = json.dumps(issuer.discovery_document()).encode()
                elif self.path.endswith("/keys"):
                    body = json.dumps(issuer.jwks()).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._issuer_server = server
        self.issuer.issuer_url = f"https://127.0.0.1:{server.server_address[1]}/v2"

    def token(self) -> str:
        """
        An ID token the daemon accepts, valid for a day.
        """
        return self.issuer.token(
            {"email": "bench@example.com", "email_verified": True, "roles": ["bench"]},
            subject="bench@example.com", audience="external-services", expires_in=86400,
        )

    def start_daemon(self, upstream_port: int, max_connections: int, timeout: float = 60.0) -> None:
        """
        Write the INI and start ``twistd banyan-kproxy``; return once ``/ready`` says 200.
        """
        from banyan_kproxy.testing.stack import ini_text, oidc_settings, twistd_command

        token_file = os.path.join(self.directory, "upstream.token")
        with open(token_file, "w") as f:
            f.write("bench-upstream-token\n")
        ini = os.path.join(self.directory, "kproxy.ini")
        with open(ini, "w") as f:
            f.write(ini_text({
                "proxy": {
                    "listen": "127.0.0.1:0",
                    "tls_cert_file": self.cert_file,
                    "tls_key_file": self.key_file,
                    "health_listen": "127.0.0.1:0",
                },
                "oidc": oidc_settings(self.issuer.issuer_url, self.ca_file),
                "upstream": {
                    "server": f"https://127.0.0.1:{upstream_port}",
                    "ca_file": self.ca_file,
                    "token_file": token_file,
                    "max_connections": str(max_connections),
                },
            }))
        if self.trace_memory:
            command = [sys.executable, "-c", _TRACED_TWISTD]
        else:
            command = twistd_command()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        if self.trace_memory:
            env["KPROXY_TRACE_DIR"] = self.directory
        self.daemon = Child(
            [*command, "--nodaemon", "--pidfile=", "banyan-kproxy", "--config", ini],
            cpus=self.daemon_cpus, env=env, cwd=self.directory, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not (self.proxy_port and self.health_port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon did not listen within {timeout:g}s: {self.daemon.tail!r}")
            line = self.daemon.expect("", max(0.1, deadline - time.monotonic()))
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1])
                if "the proxy on" in line:
                    self.proxy_port = port
                elif "health and metrics on" in line:
                    self.health_port = port
        self._drain_daemon_output()
        self.wait_ready(deadline)

    def _drain_daemon_output(self) -> None:
        # Keep reading the daemon's output so it never blocks on a full pipe.
        daemon = self.daemon
        assert daemon is not None

        def drain() -> None:
            path = os.path.join(self.directory, "daemon.log")
            with open(path, "a") as log:
                while True:
                    line = daemon.lines.get()
                    if line is None:
                        return
                    log.write(line + "\n")
                    log.flush()

        threading.Thread(target=drain, daemon=True).start()

    def wait_ready(self, deadline: float) -> None:
        import urllib.request

        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # noqa: BLE001 - poll until the deadline
                last = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not become ready: {last}")

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self._issuer_server is not None:
            self._issuer_server.shutdown()
            self._issuer_server.server_close()


#: ``twistd`` with ``tracemalloc`` on; SIGUSR2 writes a snapshot to $KPROXY_TRACE_DIR.
_TRACED_TWISTD = """
import os, signal, sys, tracemalloc
tracemalloc.start(12)
count = [0]
def dump(signum, frame):
    count[0] += 1
    import gc
    gc.collect()  # count what is still referenced, not garbage awaiting collection
    tracemalloc.take_snapshot().dump(os.path.join(os.environ["KPROXY_TRACE_DIR"], "snapshot-%d" % count[0]))
signal.signal(signal.SIGUSR2, dump)
sys.argv = ["twistd"] + sys.argv[1:]
from twisted.scripts.twistd import run
run()
"""


#: ``py-spy`` to profile the daemon with (``--py-spy PATH``), or None.
PY_SPY: str | None = None
#: More ``py-spy record`` options (``--py-spy-native`` adds ``--native``).
PY_SPY_OPTIONS: list[str] = []


class Profile:
    """
    ``py-spy record`` of the daemon while a phase runs (when `PY_SPY` is set): raw
    collapsed stacks in ``<directory>/profile-<name>.txt``.
    """

    def __init__(self, pid: int, directory: str, name: str) -> None:
        self.path = os.path.join(directory, f"profile-{name}.txt")
        self.process: subprocess.Popen[bytes] | None = None
        if PY_SPY is not None:
            # --native cannot sample without pausing the process.
            options = PY_SPY_OPTIONS or ["--nonblocking"]
            self.process = subprocess.Popen(
                [PY_SPY, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", *options,
                 "--output", self.path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)

    def stop(self) -> None:
        """
        Stop recording (SIGINT makes py-spy write its output), bounded, by PID.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def profile_summary(path: str, limit: int = 20) -> str:
    """
    The functions a raw py-spy profile spent most samples in: by own time and by
    time including what they called.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = others = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            if "Thread._bootstrap" in stack:
                others += count  # the thread pool, idle here
                continue
            total += count
            frames = [_short_frame(frame) for frame in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return f"### {os.path.basename(path)}: no samples of the reactor thread"
    lines = [f"### {os.path.basename(path)}: {total} samples of the reactor thread "
             f"({others} of other threads left out)", "", "own time:"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"  {n / total:6.1%}  {frame}")
    lines += ["", "including callees:"]
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"  {n / total:6.1%}  {frame}")
    return "\n".join(lines)


def _short_frame(frame: str) -> str:
    # "function (/path/to/site-packages/pkg/module.py:123)" -> "function (pkg/module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


def _raise_fd_limit(needed: int) -> tuple[int, int]:
    """
    Raise RLIMIT_NOFILE to ``needed`` (soft and hard; root with CAP_SYS_RESOURCE), or
    else the soft limit to the hard one; children inherit it.  Returns the old limits.
    """
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    if old[0] >= needed:
        return old
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = min(needed, int(f.read()))
    except OSError:
        want = needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, old[1])))
    except (ValueError, OSError):
        # No CAP_SYS_RESOURCE (a container): the hard limit is the ceiling.
        resource.setrlimit(resource.RLIMIT_NOFILE, (old[1], old[1]))
    return old


def watches(
    directory: str, count: int, pin: bool = True, trace_memory: bool = False
) -> list[Any]:
    """
    The idle-watch scenario: ``count`` watches through the daemon and direct.

    The daemon needs two descriptors a watch (client and upstream connection); where
    RLIMIT_NOFILE cannot be raised far enough, as many watches are opened as fit and
    the memory figure for ``count`` is extrapolated from the measured growth per
    watch (the note says so).
    """
    daemon_cpus, other_cpus = pinning(pin)
    old_limits = _raise_fd_limit(2 * count + 4096)
    measurements: list[Any] = []
    # The goal is about 10,000 watches: a run with fewer is reported under another
    # scenario name, so that no goal is judged on it.
    scenario = report.SCENARIO_WATCHES
    if count != 10000:
        scenario = f"{count:,} idle watches"
    deployment = Deployment(os.path.join(directory, "watches"), daemon_cpus, trace_memory)
    upstream = Child.script("watch-upstream", {"cert": deployment.cert_file, "key": deployment.key_file},
                            cpus=other_cpus)
    try:
        upstream_port = int(upstream.expect("port ", 30).split()[1])
        deployment.start_issuer()
        deployment.start_daemon(upstream_port, max_connections=count + 2 * WARM_WATCHES)
        assert deployment.daemon is not None
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        in_use = len(os.listdir(f"/proc/{deployment.daemon.pid}/fd"))
        fits = (limit - in_use - 64) // 2
        measured = min(count, fits)
        if measured < count:
            print(f"# watches: RLIMIT_NOFILE is {limit} and cannot be raised: the daemon can hold "
                  f"{fits} watches; measuring {measured} and extrapolating to {count}", file=sys.stderr)
        token = deployment.token()
        for target, port in ((report.DIRECT, upstream_port), (report.KPROXY, deployment.proxy_port)):
            result = _watch_run(deployment, upstream, target, port, measured, token, other_cpus,
                                trace_memory)
            result["summary"]["fd_limit"] = limit
            measurements += _watch_measurements(scenario, target, count, result)
            print(f"# watches {target}: {json.dumps(result['summary'])}", file=sys.stderr)
    finally:
        upstream.stop()
        deployment.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, old_limits)
    return measurements


def _wait_held(upstream: Child, expected: int, timeout: float) -> int:
    """
    Poll the upstream until it holds ``expected`` watches (bounded); return how many.
    """
    deadline = time.monotonic() + timeout
    held = -1
    while time.monotonic() < deadline:
        upstream.send("count")
        held = int(upstream.expect("watches ", 10).split()[1])
        if held >= expected:
            return held
        time.sleep(0.1)
    return held


def _wait_gone(upstream: Child, timeout: float) -> int:
    """
    Poll the upstream until it holds no watch (bounded); return how many it still holds.
    """
    deadline = time.monotonic() + timeout
    held = -1
    while time.monotonic() < deadline:
        upstream.send("count")
        held = int(upstream.expect("watches ", 10).split()[1])
        if held == 0:
            break
        time.sleep(0.2)
    return held


def _watch_run(
    deployment: Deployment, upstream: Child, target: str, port: int, count: int, token: str,
    cpus: set[int] | None, trace_memory: bool,
) -> dict[str, Any]:
    output = os.path.join(deployment.directory, f"events-{target}.json")
    timeout = 120 + count * 0.05
    client = Child.script("watch-client", {
        "host": "127.0.0.1", "port": port, "token": token, "ca": deployment.ca_file,
        "warm": WARM_WATCHES, "count": count, "in_flight": MAX_IN_FLIGHT, "output": output,
        "timeout": timeout,
    }, cpus=cpus)
    daemon = deployment.daemon
    assert daemon is not None
    proxied = target != report.DIRECT
    summary: dict[str, Any] = {"watches": count}
    try:
        client.expect("sent ", 60)
        held = _wait_held(upstream, WARM_WATCHES, 60)
        if held < WARM_WATCHES:
            raise RuntimeError(f"only {held} warm-up watches reached the upstream")
        time.sleep(0.5)
        if proxied:
            summary["rss_warm"] = rss_mib(daemon.pid)
            summary["cpu_before"] = cpu_seconds(daemon.pid)
            if trace_memory:
                os.kill(daemon.pid, signal.SIGUSR2)
        profile = Profile(daemon.pid, deployment.directory, "watches-open") if proxied else None
        opened = time.monotonic()
        client.send("go")
        sent = client.expect("sent ", timeout).split()
        summary["open_failed"] = int(sent[3])
        held = _wait_held(upstream, count, timeout)
        summary["open_seconds"] = time.monotonic() - opened
        if profile is not None:
            profile.stop()
        summary["held"] = held
        time.sleep(1.0)
        if proxied:
            summary["rss_all"] = rss_mib(daemon.pid)
            summary["cpu_open"] = cpu_seconds(daemon.pid) - summary.pop("cpu_before")
            if trace_memory:
                os.kill(daemon.pid, signal.SIGUSR2)
                time.sleep(5.0)
        profile = Profile(daemon.pid, deployment.directory, "watches-fanout") if proxied else None
        upstream.send("fire")
        _, started, ended, fired = upstream.expect("fired ", 60).split()
        summary["fired"] = int(fired)
        summary["upstream_write_ms"] = (float(ended) - float(started)) * 1000
        try:
            client.expect("events ", 30 + count * 0.01)
        except TimeoutError:
            summary["incomplete"] = True
        if profile is not None:
            profile.stop()
        client.send("report")
        client.expect("reported", 30)
        with open(output) as f:
            received = json.load(f)
        latencies = sorted((t - float(started)) * 1000 for t in received["events"])
        heads = received["heads"]
        summary.update(
            received=len(latencies), failed=received["failed"],
            p50_ms=percentile(latencies, 0.50), p99_ms=percentile(latencies, 0.99),
            max_ms=latencies[-1] if latencies else float("nan"),
            heads_before_event=sum(1 for h in heads if h < float(started)),
        )
    finally:
        client.stop()
    if proxied:
        # The daemon once the client has gone: is the memory given back?
        # Does the daemon notice the client's close and close its upstream connections?
        summary["upstream_held_after_close"] = _wait_gone(upstream, 10.0)
        summary["rss_after"] = rss_mib(daemon.pid)
        if trace_memory:
            os.kill(daemon.pid, signal.SIGUSR2)
            time.sleep(5.0)
    return {"summary": summary}


def _watch_measurements(scenario: str, target: str, count: int, result: dict[str, Any]) -> list[Any]:
    s = result["summary"]
    measured = s["watches"]
    M = report.Measurement
    note = "" if measured == count else f"over {measured:,} watches"
    if s.get("received", 0) < measured:
        note = f"only {s.get('received', 0):,} of {measured:,} watches got the event"
    out = [
        M(scenario, target, METRIC_OPEN_TIME, s["open_seconds"], "s", higher_is_better=False,
          note=f"{measured:,} watches, {MAX_IN_FLIGHT} handshakes in flight"),
        M(scenario, target, report.METRIC_FANOUT_P50, s["p50_ms"], "ms", higher_is_better=False, note=note),
        M(scenario, target, report.METRIC_FANOUT_P99, s["p99_ms"], "ms", higher_is_better=False, note=note),
        M(scenario, target, report.METRIC_FANOUT_MAX, s["max_ms"], "ms", higher_is_better=False, note=note),
    ]
    if "rss_all" in s:
        # VmRSS is in KiB; the goal is in MB (10^6 bytes).
        per_watch = (s["rss_all"] - s["rss_warm"]) * 1024 / max(1, measured - WARM_WATCHES)
        mb = 1024 * 1024 / 1e6
        total = s["rss_all"] * mb
        total_note = f"{count:,} watches"
        if measured < count:
            total += per_watch * 1024 / 1e6 * (count - measured)
            total_note = (
                f"{measured:,} watches measured ({s['rss_all'] * mb:,.0f} MB; RLIMIT_NOFILE "
                f"{s['fd_limit']:,} allows no more) + {count - measured:,} × the growth per watch"
            )
        out += [
            M(scenario, target, METRIC_RSS_IDLE, s["rss_warm"] * mb, "MB", baseline=None,
              higher_is_better=False),
            M(scenario, target, report.METRIC_WATCH_RSS, total, "MB", baseline=None,
              higher_is_better=False, note=total_note),
            M(scenario, target, report.METRIC_WATCH_RSS_PER, per_watch, "KiB", baseline=None,
              higher_is_better=False, note=f"growth from {WARM_WATCHES} to {measured:,} watches"),
            M(scenario, target, METRIC_RSS_AFTER, s["rss_after"] * mb, "MB", baseline=None,
              higher_is_better=False,
              note=f"client gone; upstream connections still open: {s['upstream_held_after_close']:,}"),
        ]
    return out


def tunnel(directory: str, megabytes: int, pin: bool = True) -> list[Any]:
    """
    The upgrade-tunnel scenario: ``megabytes`` each way, through the daemon and direct.
    """
    daemon_cpus, other_cpus = pinning(pin)
    total = megabytes * 1000 * 1000
    # The goals are about 1 GB: a shorter run is reported under another scenario name
    # (as bench.py says, a quick run does not judge the full-size goals).
    scenario = report.SCENARIO_TUNNEL
    if megabytes != 1000:
        scenario = f"upgrade tunnel, {megabytes:,} MB"
    deployment = Deployment(os.path.join(directory, "tunnel"), daemon_cpus)
    upstream = Child.script("tunnel-upstream", {"cert": deployment.cert_file, "key": deployment.key_file},
                            cpus=other_cpus)
    measurements: list[Any] = []
    where = "daemon on CPU 0, client and upstream on CPU 1" if daemon_cpus else "not pinned"
    try:
        upstream_port = int(upstream.expect("port ", 30).split()[1])
        deployment.start_issuer()
        deployment.start_daemon(upstream_port, max_connections=16)
        token = deployment.token()
        daemon = deployment.daemon
        assert daemon is not None
        runs = [(report.DIRECT, upstream_port, other_cpus), (report.KPROXY, deployment.proxy_port, other_cpus)]
        if daemon_cpus:
            # Direct once more with the client on the daemon's CPU: what the client
            # and upstream reach when neither shares a core (no ratio; a reference).
            runs.insert(1, (DIRECT_SPREAD, upstream_port, daemon_cpus))
        for target, port, client_cpus in runs:
            for mode, metric in (("upload", report.METRIC_UPLOAD), ("download", report.METRIC_DOWNLOAD)):
                cpu = {"daemon": cpu_seconds(daemon.pid), "upstream": cpu_seconds(upstream.pid)}
                client = Child.script("tunnel-client", {
                    "host": "127.0.0.1", "port": port, "token": token, "ca": deployment.ca_file,
                    "mode": mode, "bytes": total,
                }, cpus=client_cpus)
                profile = None
                if target == report.KPROXY:
                    profile = Profile(daemon.pid, deployment.directory, f"tunnel-{mode}")
                try:
                    result = json.loads(client.expect("{", 120 + total / 2e6))
                finally:
                    client.stop()
                    if profile is not None:
                        profile.stop()
                used = {name: cpu_seconds(p) - cpu[name]
                        for name, p in (("daemon", daemon.pid), ("upstream", upstream.pid))}
                seconds = result["seconds"]
                if result["bytes"] != total:
                    raise RuntimeError(f"{target} {mode}: moved {result['bytes']} of {total} bytes")
                shares = f"client {result['cpu'] / seconds:.0%}, upstream {used['upstream'] / seconds:.0%}"
                if target == report.KPROXY:
                    shares = f"daemon {used['daemon'] / seconds:.0%}, " + shares
                note = f"CPU: {shares}; {where if target != DIRECT_SPREAD else 'client on CPU 0'}"
                measurements.append(report.Measurement(
                    scenario, target, metric, total / seconds / 1e6, "MB/s",
                    baseline=None if target == DIRECT_SPREAD else report.DIRECT, note=note,
                ))
                print(f"# tunnel {target} {mode}: {total / seconds / 1e6:.1f} MB/s in {seconds:.2f}s; {note}",
                      file=sys.stderr)
    finally:
        upstream.stop()
        deployment.stop()
    return measurements


def run(workdir: str, quick: bool) -> list[Any]:
    """
    Both stream scenarios; ``quick``: 1,000 watches and 100 MB each way.
    """
    measurements: list[Any] = []
    for name, scenario in (
        ("watches", lambda: watches(workdir, 1000 if quick else 10000)),
        ("tunnel", lambda: tunnel(workdir, 100 if quick else 1000)),
    ):
        try:
            measurements += scenario()
        except Exception as e:  # noqa: BLE001 - report the others
            print(f"# {name} scenario FAILED: {e}", file=sys.stderr)
    return measurements


def trace_memory_report(directory: str, limit: int = 25) -> str:
    """
    Where the daemon's memory grew between the snapshots of a ``--trace-memory`` run
    (1: 20 watches open, 2: all open, 3: the client gone): the top allocation sites by
    growth, with the calling frames, and what was still allocated after the close.
    """
    import tracemalloc

    def load(n: int) -> Any:
        return tracemalloc.Snapshot.load(os.path.join(directory, "watches", f"snapshot-{n}"))

    first, second, third = load(1), load(2), load(3)
    lines = ["## tracemalloc (daemon): growth from 20 watches to all watches", ""]
    by_file = second.compare_to(first, "filename")
    lines.append(f"total traced growth: {sum(s.size_diff for s in by_file) / 2**20:.1f} MiB; "
                 f"still traced after the client closed them: "
                 f"{sum(s.size_diff for s in third.compare_to(first, 'filename')) / 2**20:.1f} MiB")
    lines += ["", "by file:"]
    for stat in by_file[:limit]:
        lines.append(f"  {stat.size_diff / 2**20:8.2f} MiB {stat.count_diff:+9d} blocks  "
                     f"{stat.traceback[0].filename}")
    lines += ["", "by line (innermost frame first):"]
    for stat in second.compare_to(first, "traceback")[:limit]:
        lines.append(f"  {stat.size_diff / 2**20:8.2f} MiB {stat.count_diff:+9d} blocks")
        for frame in list(reversed(stat.traceback))[:8]:
            lines.append(f"      {frame.filename}:{frame.lineno}")
    lines += ["", "still allocated after the close, by line:"]
    for stat in third.compare_to(first, "lineno")[:10]:
        frame = stat.traceback[0]
        lines.append(f"  {stat.size_diff / 2**20:8.2f} MiB {stat.count_diff:+9d} blocks  "
                     f"{frame.filename}:{frame.lineno}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the stream scenarios and print the table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 watches, 100 MB each way")
    parser.add_argument("--watches", type=int, help="how many watches (default 10,000; quick 1,000)")
    parser.add_argument("--tunnel-mb", type=int, help="MB each way (default 1,000; quick 100)")
    parser.add_argument("--only", choices=("watches", "tunnel"))
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--trace-memory", action="store_true",
                        help="watches only, daemon under tracemalloc; print where the memory went")
    parser.add_argument("--workdir", help="keep certificates, INI, logs here (default: a temporary dir)")
    parser.add_argument("--py-spy", metavar="PATH",
                        help="profile the daemon with this py-spy during each phase and summarise")
    parser.add_argument("--py-spy-native", action="store_true", help="with --py-spy: native frames too (pauses the daemon to sample)")
    args = parser.parse_args(argv)
    global PY_SPY
    PY_SPY = args.py_spy
    if args.py_spy_native:
        PY_SPY_OPTIONS.append("--native")
    count = args.watches or (1000 if args.quick else 10000)
    megabytes = args.tunnel_mb or (100 if args.quick else 1000)
    with tempfile.TemporaryDirectory(prefix="kproxy-streams-") as scratch:
        workdir = args.workdir or scratch
        measurements: list[Any] = []
        if args.trace_memory:
            measurements += watches(workdir, count, pin=not args.no_pin, trace_memory=True)
            print(report.render_table(measurements))
            print()
            print(trace_memory_report(workdir))
            return
        if args.only in (None, "watches"):
            measurements += watches(workdir, count, pin=not args.no_pin)
        if args.only in (None, "tunnel"):
            measurements += tunnel(workdir, megabytes, pin=not args.no_pin)
        print(report.render_table(measurements))
        if PY_SPY is not None:
            for sub in ("watches", "tunnel"):
                folder = os.path.join(workdir, sub)
                for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
                    if name.startswith("profile-"):
                        print()
                        print(profile_summary(os.path.join(folder, name)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main()
