"""
The proxy's graceful stop (SIGTERM): the *drain*.

twistd stops the application on SIGTERM.  The ``proxy`` listener then stops
accepting connections and runs `Drain.drain`, which ends what is open the way
kube-apiserver's own graceful termination does:

- idle keep-alive connections are closed at once;
- requests in flight go on, up to ``[proxy] drain_timeout``; each is answered with
  ``Connection: close`` (a response whose head already went out closes the
  connection when it is complete);
- watches are ended cleanly at once, between two events: the chunked response is
  terminated, so clients re-list and re-watch (through another replica).  Like
  kube-apiserver (``ShutdownWatchTerminationGracePeriod``), they are ended at
  max(200, n / drain_timeout) a second, so a thousand clients do not all come back
  in the same instant;
- upgraded connections (exec, attach, port-forward) run on until the deadline and
  are then closed;
- a connection accepted just before the stop that has not sent a request yet has
  `NEW_CONNECTION_GRACE` seconds to send one (as Go's ``http.Server.Shutdown``
  treats new connections);
- at the deadline whatever is left is cut: its connection is aborted, so a
  truncated response cannot pass for a whole one.

One line is logged when the drain starts and one when it ends.  Only after the
drain does the stop go on: the ``audit`` service waits for the listener's stop
(``ListeningService.when_stopped``), so the audit events of the drained requests
are spooled and flushed with the rest.

`ProxySite` reports connections and request heads, `KubeProxyResource` reports
watches and tunnels; both hold the same `Drain`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from banyan_kproxy.audit.spool import observe

__all__ = ["Drain", "StreamFraming", "NEW_CONNECTION_GRACE", "WATCH_END_RATE", "CUT_GRACE"]

#: Seconds a connection accepted before the drain has to send its first request.
NEW_CONNECTION_GRACE = 5.0
#: Least number of watches ended per second (kube-apiserver's floor).
WATCH_END_RATE = 200.0
#: Seconds to wait, after the deadline cut, for the cut connections to be gone.
CUT_GRACE = 1.0


class StreamFraming:
    """
    Where the messages of a watch stream end, so that it can be ended between two.

    JSON watch streams (and ``Table`` ones) are one event per line: JSON encoders
    escape newlines inside strings.  Protobuf watch streams
    (``application/vnd.kubernetes.protobuf;stream=watch``) are frames with a 4-byte
    big-endian length prefix.
    """

    def __init__(self, length_prefixed: bool = False) -> None:
        self.length_prefixed = length_prefixed
        # Newline framing: whether the last byte seen ended a line.
        self._line_done = True
        # Length-prefixed framing: body bytes still due, and a partial prefix.
        self._need = 0
        self._prefix = b""

    @classmethod
    def for_response(cls, content_type: bytes | None, content_encoding: bytes | None) -> StreamFraming | None:
        """
        The framing of a watch response, or None when it cannot be known (a
        compressed body).
        """
        if content_encoding and content_encoding.strip().lower() not in (b"", b"identity"):
            return None
        kind = (content_type or b"").lower()
        return cls(length_prefixed=b"protobuf" in kind)

    @property
    def at_boundary(self) -> bool:
        """
        Whether everything seen so far ends with a whole message.
        """
        if self.length_prefixed:
            return self._need == 0 and not self._prefix
        return self._line_done

    def feed(self, data: bytes) -> None:
        """
        Note ``data`` as relayed.
        """
        if not data:
            return
        if self.length_prefixed:
            _, self._need, self._prefix = self._scan(data, first=False)
        else:
            self._line_done = data.endswith(b"\n")

    def boundary_in(self, data: bytes) -> int | None:
        """
        How many bytes of ``data`` complete the message in progress (None: ``data``
        does not complete it).  The state is not changed.
        """
        if self.length_prefixed:
            end, _, _ = self._scan(data, first=True)
            return end
        newline = data.find(b"\n")
        return None if newline < 0 else newline + 1

    def _scan(self, data: bytes, first: bool) -> tuple[int | None, int, bytes]:
        need, prefix = self._need, self._prefix
        boundary = None
        at, size = 0, len(data)
        while at < size:
            if need == 0:
                take = min(4 - len(prefix), size - at)
                prefix += data[at : at + take]
                at += take
                if len(prefix) < 4:
                    break
                need, prefix = int.from_bytes(prefix, "big"), b""
                if need:
                    continue
            else:
                take = min(need, size - at)
                need -= take
                at += take
                if need:
                    continue
            boundary = at
            if first:
                break
        return boundary, need, prefix


class Drain:
    """
    What is open on the proxy listener, and the drain that ends it.

    ``timeout``: the drain's deadline in seconds (``[proxy] drain_timeout``).
    """

    log = Logger()

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.draining = False
        # Open HTTP channels -> whether a request head has arrived on them.
        self._connections: dict[Any, bool] = {}
        # Watch relays (with ``end()``) being relayed now.
        self._watches: set[Any] = set()
        # Upgraded connections: one key (the client's splice end) -> both ends.
        self._tunnels: dict[Any, tuple[Any, ...]] = {}
        self._done: Deferred[None] | None = None
        self._started = 0.0
        self._calls: list[Any] = []
        self._cut_requests = 0
        self._cut_tunnels = 0
        self._fresh_closed = False

    # -- what the listener and the resource report ----------------------------

    def connection_made(self, channel: Any) -> None:
        """
        An HTTP channel is connected.
        """
        self._connections[channel] = False
        if self.draining and self._fresh_closed:
            channel.loseConnection()

    def connection_lost(self, channel: Any) -> None:
        """
        An HTTP channel's connection is gone.
        """
        if self._connections.pop(channel, None) is not None:
            self._check()

    def request_started(self, request: Any) -> None:
        """
        A request head is complete: while draining it is answered with
        ``Connection: close``.
        """
        channel = request.channel
        if channel in self._connections:
            self._connections[channel] = True
        if self.draining:
            _close_after(channel, request)

    def watch_started(self, watch: Any) -> None:
        """
        A watch response is being relayed; ``watch.end()`` ends it between events.
        """
        self._watches.add(watch)
        if self.draining:
            watch.end()

    def watch_ended(self, watch: Any) -> None:
        """
        A watch response is over.
        """
        self._watches.discard(watch)

    def tunnel_opened(self, channel: Any, *ends: Any) -> None:
        """
        ``channel``'s connection became an upgraded tunnel between ``ends``
        (splice ends; the first is the key for `tunnel_closed`).
        """
        self._connections.pop(channel, None)
        self._tunnels[ends[0]] = ends

    def tunnel_closed(self, key: Any) -> None:
        """
        The tunnel whose first end is ``key`` is closed.
        """
        if self._tunnels.pop(key, None) is not None:
            self._check()

    # -- the drain --------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """
        End everything open (see the module docstring); fires when nothing is left,
        at most ``timeout`` (+ `CUT_GRACE`) seconds from now.
        """
        if self._done is not None:
            return observe(self._done)
        self.draining = True
        self._started = self.clock.seconds()
        self._done = Deferred()
        watches = list(self._watches)
        in_flight = sum(len(getattr(channel, "requests", ())) for channel in self._connections)
        self.log.info(
            "Draining {requests} requests, {watches} watches, {tunnels} tunnels "
            "for up to {timeout:g}s",
            requests=max(0, in_flight - len(watches)),
            watches=len(watches),
            tunnels=len(self._tunnels),
            timeout=self.timeout,
        )
        for channel, used in list(self._connections.items()):
            requests = list(getattr(channel, "requests", ()))
            if requests:
                for request in requests:
                    _close_after(channel, request)
            elif used:
                channel.loseConnection()  # an idle keep-alive connection
        rate = max(WATCH_END_RATE, len(watches) / self.timeout if self.timeout > 0 else 0.0)
        for n, watch in enumerate(watches):
            if n == 0:
                watch.end()
            else:
                self._calls.append(self.clock.callLater(n / rate, watch.end))
        self._calls.append(
            self.clock.callLater(min(NEW_CONNECTION_GRACE, self.timeout), self._close_fresh)
        )
        self._calls.append(self.clock.callLater(self.timeout, self._cut))
        done = observe(self._done)
        self._check()
        return done

    def _close_fresh(self) -> None:
        """
        Close the connections that never sent a request.
        """
        self._fresh_closed = True
        for channel in list(self._connections):
            if not getattr(channel, "requests", ()):
                channel.loseConnection()

    def _cut(self) -> None:
        """
        The deadline: abort what is left, wait a moment for it to be gone.
        """
        self._fresh_closed = True
        for channel in list(self._connections):
            self._cut_requests += len(getattr(channel, "requests", ()))
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        for ends in list(self._tunnels.values()):
            self._cut_tunnels += 1
            for end in ends:
                if not end.closed and end.transport is not None:
                    end.transport.abortConnection()
        self.log.warn(
            "Drain deadline ({timeout:g}s): cut {requests} requests and {tunnels} tunnels",
            timeout=self.timeout,
            requests=self._cut_requests,
            tunnels=self._cut_tunnels,
        )
        self._calls.append(self.clock.callLater(CUT_GRACE, self._finish))
        self._check()

    def _check(self) -> None:
        if self.draining and not self._connections and not self._tunnels:
            self._finish()

    def _finish(self) -> None:
        done = self._done
        if done is None or done.called:
            return
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        left = len(self._connections) + len(self._tunnels)
        self.log.info(
            "Drain finished after {seconds:.1f}s: {how}",
            seconds=self.clock.seconds() - self._started,
            how=(
                "everything in flight completed"
                if not (self._cut_requests or self._cut_tunnels)
                else f"{self._cut_requests} requests and {self._cut_tunnels} tunnels were cut"
                + (f", {left} connections still closing" if left else "")
            ),
        )
        done.callback(None)


def _close_after(channel: Any, request: Any) -> None:
    """
    End ``channel``'s connection after ``request``'s response, and say so in its
    head if it has not gone out yet.
    """
    channel.persistent = False
    if not request.startedWriting:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
