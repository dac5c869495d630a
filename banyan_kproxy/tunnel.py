"""
The byte splice: two connections joined so that what one receives the other sends.

Shared by the upgrade tunnel (exec, attach, port-forward), and later by the connect
service and the gateway.  It follows ``twisted/protocols/portforward.py``: an end
that is connected before its peer exists is paused; once both exist each transport
is registered as the streaming producer of the other, so a peer that cannot keep up
pauses the side feeding it and memory stays bounded; when either side closes, the
other is closed after its pending writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class SpliceEnd(Protocol):
    """
    One connection of a splice.

    Bytes that arrive before the peer is joined are kept (the transport is paused
    as soon as it connects, so there are few) and sent when the splice is made.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.peer: SpliceEnd | None = None
        self.received = 0
        self.closed = False
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()
        self._pending: list[bytes] = []

    def connectionMade(self) -> None:
        if self.peer is None:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.write(data)
        elif self.peer is None:
            self._pending.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.reason = reason
        peer = self.peer
        if peer is not None and not peer.closed and peer.transport is not None:
            peer.transport.loseConnection()
        self.lost.callback(None)

    def take_pending(self) -> bytes:
        """
        The bytes received before the splice was made (and forget them).
        """
        data, self._pending = b"".join(self._pending), []
        return data


class Splice:
    """
    Two connected L{SpliceEnd}s joined with flow control both ways.

    ``done`` fires (with this splice) once both connections are closed; ``sent``
    tells how many bytes went from each end to the other.
    """

    def __init__(
        self,
        left: SpliceEnd,
        right: SpliceEnd,
        on_done: Callable[[Splice], Any] | None = None,
    ) -> None:
        self.left = left
        self.right = right
        self.done: Deferred[Splice] = Deferred()
        left.peer, right.peer = right, left
        # Each side's reading is paused while the other side's send buffer is full.
        left.transport.registerProducer(right.transport, True)
        right.transport.registerProducer(left.transport, True)
        for end in (left, right):
            early = end.take_pending()
            if early and not end.peer.closed:  # type: ignore[union-attr]
                end.peer.transport.write(early)  # type: ignore[union-attr]
        for end in (left, right):
            if end.closed and not end.peer.closed:  # type: ignore[union-attr]
                end.peer.transport.loseConnection()  # type: ignore[union-attr]
        for end in (left, right):
            if not end.closed:
                end.transport.resumeProducing()

        def _both_lost(_: object) -> None:
            if on_done is not None:
                on_done(self)
            self.done.callback(self)

        gatherResults([left.lost, right.lost]).addCallback(_both_lost)

    def bytes_from(self, end: SpliceEnd) -> int:
        """
        How many bytes ``end`` received and passed to its peer.
        """
        return end.received
