"""
RFC 6455 WebSocket framing and connections, for the Kubernetes API stand-in.

Written from the RFC, without a library: `encode_frame` and `FrameParser` carry the
wire format (FIN and RSV bits, opcodes, 7/16/64-bit payload lengths, masking);
`WebSocketConnection` is one endpoint of an open connection without I/O (bytes in
through `WebSocketConnection.receive`, bytes out through a ``send`` callable): it
reassembles fragmented messages, answers pings with pongs, validates UTF-8 text and
close frames, and runs the closing handshake.  `WebSocketProtocol` puts a connection
on a Twisted transport, and `handshake_response` answers an upgrade request.

Only what a server for ``kubectl`` needs, and what tests need to play the client:
no extensions (a frame with an RSV bit set is a protocol error).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol as TypingProtocol

from attr import frozen
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

#: The GUID RFC 6455 appends to ``Sec-WebSocket-Key``.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Control frames carry at most this much payload.
MAX_CONTROL_PAYLOAD = 125


def lose_connection(transport: Any) -> None:
    """
    Close ``transport`` once its buffered bytes are sent, as a server does.

    Twisted's TLS transport defers ``loseConnection`` for as long as a producer is
    registered on it, and an upgraded connection has one (`upgrades.Flow`): without
    letting go of it first the connection would never close from this side.
    """
    if getattr(transport, "producer", None) is not None or getattr(transport, "_producer", None) is not None:
        transport.unregisterProducer()
    transport.loseConnection()

class Opcode(enum.IntEnum):
    """
    WebSocket frame opcodes.
    """

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """
    The close status codes this module sends or checks.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


_DATA_OPCODES = frozenset({Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY})
_CONTROL_OPCODES = frozenset({Opcode.CLOSE, Opcode.PING, Opcode.PONG})
# Codes an endpoint may put in a close frame (RFC 6455 7.4.1, 7.4.2).
_SENDABLE_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1012)) | frozenset(
    range(3000, 5000)
)


class WebSocketProtocolError(Exception):
    """
    The peer broke RFC 6455; ``code`` is the close code to fail the connection with.
    """

    def __init__(self, message: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def accept_key(key: str | bytes) -> str:
    """
    The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``.

    >>> accept_key("dGhlIHNhbXBsZSBub25jZQ==")
    's3pPLMBiTxaQ9kYGzzhZRbK+xOo='
    """
    raw = key.encode("ascii") if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw.strip() + GUID).digest()).decode("ascii")


def mask(payload: bytes, key: bytes) -> bytes:
    """
    XOR ``payload`` with the four-byte masking ``key`` (masking and unmasking are the
    same operation).
    """
    if len(key) != 4:
        raise ValueError("a masking key has four bytes")
    size = len(payload)
    if size == 0:
        return b""
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


@frozen
class Frame:
    """
    One WebSocket frame: ``opcode``, unmasked ``payload``, the FIN bit and the three
    RSV bits (as a number 0-7).
    """

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0


def encode_frame(frame: Frame, mask_key: bytes | None = None) -> bytes:
    """
    The wire bytes of ``frame``: masked with ``mask_key`` when given (as a client must),
    unmasked otherwise (as a server must).
    """
    first = (0x80 if frame.fin else 0) | ((frame.rsv & 7) << 4) | (frame.opcode & 0x0F)
    size = len(frame.payload)
    mask_bit = 0x80 if mask_key is not None else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 0x10000:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if mask_key is None:
        return header + frame.payload
    return header + mask_key + mask(frame.payload, mask_key)


class FrameParser:
    """
    Decodes frames from a byte stream fed in arbitrary pieces.

    ``masked`` is what the peer must do: ``True`` on a server (client frames are
    masked), ``False`` on a client, ``None`` to accept both.  Frames over
    ``max_frame_size`` raise `WebSocketProtocolError` with code 1009.
    """

    def __init__(self, *, masked: bool | None = True, max_frame_size: int = 64 * 1024 * 1024) -> None:
        self._masked = masked
        self._max_frame_size = max_frame_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add bytes; return the frames now complete.  Raises `WebSocketProtocolError`
        on the first frame that breaks the RFC.
        """
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        fin = bool(first & 0x80)
        rsv = (first >> 4) & 7
        opcode = first & 0x0F
        masked = bool(second & 0x80)
        size = second & 0x7F
        offset = 2
        if rsv:
            raise WebSocketProtocolError("RSV bits set without a negotiated extension")
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
            raise WebSocketProtocolError(f"unknown opcode {opcode:#x}")
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise WebSocketProtocolError("fragmented control frame")
            if size > MAX_CONTROL_PAYLOAD:
                raise WebSocketProtocolError("control frame payload over 125 bytes")
        if self._masked is not None and masked != self._masked:
            raise WebSocketProtocolError(
                "unmasked frame from a client" if self._masked else "masked frame from a server"
            )
        if size == 126:
            if len(buffer) < 4:
                return None
            (size,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif size == 127:
            if len(buffer) < 10:
                return None
            (size,) = struct.unpack_from("!Q", buffer, 2)
            if size >> 63:
                raise WebSocketProtocolError("64-bit payload length with the top bit set")
            offset = 10
        if size > self._max_frame_size:
            raise WebSocketProtocolError(
                f"frame of {size} bytes is over the limit", CloseCode.MESSAGE_TOO_BIG
            )
        key = b""
        if masked:
            if len(buffer) < offset + 4:
                return None
            key = bytes(buffer[offset:offset + 4])
            offset += 4
        if len(buffer) < offset + size:
            return None
        payload = bytes(buffer[offset:offset + size])
        del buffer[:offset + size]
        if masked:
            payload = mask(payload, key)
        return Frame(opcode, payload, fin, rsv)


def close_payload(code: int | None, reason: str = "") -> bytes:
    """
    A close frame's payload: the code (none for ``None``) and the UTF-8 reason.
    """
    if code is None:
        return b""
    data = struct.pack("!H", code) + reason.encode("utf-8")
    if len(data) > MAX_CONTROL_PAYLOAD:
        raise ValueError("close reason too long")
    return data


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """
    The code and reason of a close frame's payload (``(None, "")`` when empty);
    `WebSocketProtocolError` when the payload is malformed.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise WebSocketProtocolError("close frame with a one-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if code not in _SENDABLE_CLOSE_CODES:
        raise WebSocketProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketProtocolError("close reason is not UTF-8", CloseCode.INVALID_PAYLOAD)
    return code, reason


class WebSocketConnection:
    """
    One endpoint of an open WebSocket, without I/O.

    Bytes from the peer go to `receive`; bytes for the peer go to ``send``.  Complete
    messages are handed to ``on_message(payload, binary)``; ``on_close(code, reason)``
    is called once, when the closing handshake completes or the connection fails
    (the caller then closes the TCP connection: a server does so first).  A client
    endpoint (``client=True``) masks what it sends and expects unmasked frames.
    """

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"

    def __init__(
        self,
        send: Callable[[bytes], Any],
        *,
        on_message: Callable[[bytes, bool], Any],
        on_close: Callable[[int | None, str], Any],
        on_pong: Callable[[bytes], Any] | None = None,
        client: bool = False,
        max_message_size: int = 64 * 1024 * 1024,
    ) -> None:
        self._send = send
        self._on_message = on_message
        self._on_close = on_close
        self._on_pong = on_pong
        self._client = client
        self._max_message_size = max_message_size
        self._parser = FrameParser(masked=not client, max_frame_size=max_message_size)
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._fragment_opcode: int | None = None
        self.state = self.OPEN
        self.close_code: int | None = None
        self.close_reason = ""

    def receive(self, data: bytes) -> None:
        """
        Handle bytes from the peer.
        """
        if self.state == self.CLOSED:
            return
        try:
            for frame in self._parser.feed(data):
                self._frame(frame)
                if self.state == self.CLOSED:
                    return
        except WebSocketProtocolError as e:
            self.fail(e.code, str(e))

    def send_message(self, data: bytes, *, binary: bool = True, fragment_size: int | None = None) -> None:
        """
        Send one message, in fragments of ``fragment_size`` bytes when given.
        Ignored once this side has sent its close frame.
        """
        if self.state != self.OPEN:
            return
        opcode = Opcode.BINARY if binary else Opcode.TEXT
        if not fragment_size or len(data) <= fragment_size:
            self._write(Frame(opcode, data))
            return
        pieces = [data[i:i + fragment_size] for i in range(0, len(data), fragment_size)]
        for index, piece in enumerate(pieces):
            self._write(Frame(
                opcode if index == 0 else Opcode.CONTINUATION, piece, index == len(pieces) - 1
            ))

    def ping(self, payload: bytes = b"") -> None:
        """
        Send a ping; the peer's pong goes to ``on_pong``.
        """
        if self.state == self.OPEN:
            self._write(Frame(Opcode.PING, payload))

    def close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> None:
        """
        Start the closing handshake (or finish it, when the peer started it).
        """
        if self.state != self.OPEN:
            return
        self.state = self.CLOSING
        self.close_code, self.close_reason = code, reason
        self._write(Frame(Opcode.CLOSE, close_payload(code, reason)))

    def fail(self, code: int, reason: str) -> None:
        """
        Fail the connection: send a close frame with ``code`` (if none was sent yet)
        and report the connection closed.
        """
        if self.state == self.CLOSED:
            return
        if self.state == self.OPEN:
            self._write(Frame(Opcode.CLOSE, close_payload(code, reason[:100])))
        self._closed(code, reason)

    def connection_lost(self) -> None:
        """
        The TCP connection ended; report an abnormal closure if the handshake had not
        completed.
        """
        if self.state != self.CLOSED:
            self._closed(CloseCode.ABNORMAL, "connection lost")

    def _write(self, frame: Frame) -> None:
        key = os.urandom(4) if self._client else None
        self._send(encode_frame(frame, key))

    def _closed(self, code: int | None, reason: str) -> None:
        self.state = self.CLOSED
        self.close_code, self.close_reason = code, reason
        self._fragments = []
        self._on_close(code, reason)

    def _frame(self, frame: Frame) -> None:
        if frame.opcode == Opcode.PING:
            if self.state == self.OPEN:
                self._write(Frame(Opcode.PONG, frame.payload))
            return
        if frame.opcode == Opcode.PONG:
            if self._on_pong is not None:
                self._on_pong(frame.payload)
            return
        if frame.opcode == Opcode.CLOSE:
            code, reason = parse_close_payload(frame.payload)
            if self.state == self.OPEN:
                # Echo the code, as RFC 6455 5.5.1 asks.
                self._write(Frame(Opcode.CLOSE, close_payload(code)))
            self._closed(code if code is not None else CloseCode.NO_STATUS, reason)
            return
        if frame.opcode == Opcode.CONTINUATION:
            if self._fragment_opcode is None:
                raise WebSocketProtocolError("continuation frame outside a message")
        elif self._fragment_opcode is not None:
            raise WebSocketProtocolError("new message inside a fragmented message")
        else:
            self._fragment_opcode = frame.opcode
        self._fragment_size += len(frame.payload)
        if self._fragment_size > self._max_message_size:
            raise WebSocketProtocolError("message too big", CloseCode.MESSAGE_TOO_BIG)
        self._fragments.append(frame.payload)
        if not frame.fin:
            return
        opcode = self._fragment_opcode
        payload = b"".join(self._fragments)
        self._fragments, self._fragment_size, self._fragment_opcode = [], 0, None
        if opcode == Opcode.TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketProtocolError("text message is not UTF-8", CloseCode.INVALID_PAYLOAD)
        if self.state == self.OPEN:
            self._on_message(payload, opcode == Opcode.BINARY)


# -- the opening handshake -----------------------------------------------------------


class HandshakeError(Exception):
    """
    An upgrade request that is not a valid WebSocket opening handshake.
    """


def split_header_list(values: Sequence[str]) -> list[str]:
    """
    The comma-separated entries of every line of a header, stripped, empties dropped.
    """
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]


def handshake_response(
    method: str,
    headers: Callable[[str], Sequence[str]],
    choose_protocol: Callable[[list[str]], str | None],
) -> list[tuple[str, str]]:
    """
    Check a server-side opening handshake and return the 101 response's headers.

    ``headers(name)`` returns every value of a request header; ``choose_protocol``
    gets the offered ``Sec-WebSocket-Protocol`` entries (in the client's order) and
    returns the one to accept, or ``None`` to accept none.  Raises `HandshakeError`
    when the request is not a valid version 13 handshake.
    """
    if method != "GET":
        raise HandshakeError("WebSocket upgrades use GET")
    if "websocket" not in [v.lower() for v in split_header_list(headers("Upgrade"))]:
        raise HandshakeError("missing Upgrade: websocket")
    if "upgrade" not in [v.lower() for v in split_header_list(headers("Connection"))]:
        raise HandshakeError("missing Connection: Upgrade")
    versions = split_header_list(headers("Sec-WebSocket-Version"))
    if versions != ["13"]:
        raise HandshakeError("unsupported Sec-WebSocket-Version")
    keys = headers("Sec-WebSocket-Key")
    if len(keys) != 1:
        raise HandshakeError("missing Sec-WebSocket-Key")
    try:
        decoded = base64.b64decode(keys[0].strip(), validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) != 16:
        raise HandshakeError("Sec-WebSocket-Key is not 16 bytes of base64")
    response = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(keys[0])),
    ]
    protocol = choose_protocol(split_header_list(headers("Sec-WebSocket-Protocol")))
    if protocol is not None:
        response.append(("Sec-WebSocket-Protocol", protocol))
    return response


# -- on a Twisted transport ----------------------------------------------------------


class WebSocketHandler(TypingProtocol):
    """
    What a `WebSocketProtocol` tells its application.
    """

    def websocket_opened(self, protocol: WebSocketProtocol) -> None:
        """The connection is open; ``protocol`` sends."""

    def message_received(self, payload: bytes, binary: bool) -> None:
        """A complete message arrived."""

    def websocket_closed(self, code: int | None, reason: str) -> None:
        """The connection closed (code 1006 when it was cut without a handshake)."""


class WebSocketProtocol(Protocol):
    """
    A `WebSocketConnection` on a Twisted transport, after the opening handshake.

    The server side closes the TCP connection once the closing handshake completes,
    or ``close_timeout`` seconds after it sent its close frame if the peer never
    answers.
    """

    def __init__(
        self,
        handler: WebSocketHandler,
        clock: IReactorTime,
        *,
        client: bool = False,
        close_timeout: float = 10.0,
    ) -> None:
        self.handler = handler
        self._clock = clock
        self._client = client
        self._close_timeout = close_timeout
        self._timer: IDelayedCall | None = None
        self._reported = False
        self.connection: WebSocketConnection | None = None

    def connectionMade(self) -> None:
        """
        Start the WebSocket connection and tell the handler.
        """
        self.connection = WebSocketConnection(
            self.transport.write,
            on_message=self.handler.message_received,
            on_close=self._closed,
            client=self._client,
        )
        self.handler.websocket_opened(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Frames from the peer.
        """
        assert self.connection is not None
        self.connection.receive(data)

    def send(self, payload: bytes, binary: bool = True) -> None:
        """
        Send one message.
        """
        if self.connection is not None:
            self.connection.send_message(payload, binary=binary)

    def close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> None:
        """
        Start the closing handshake; the TCP connection closes when it completes or
        after the close timeout.
        """
        if self.connection is None or self.connection.state != WebSocketConnection.OPEN:
            return
        self.connection.close(code, reason)
        self._timer = self._clock.callLater(self._close_timeout, self._give_up)

    def _give_up(self) -> None:
        self._timer = None
        lose_connection(self.transport)

    def _closed(self, code: int | None, reason: str) -> None:
        self._cancel_timer()
        if not self._client:
            lose_connection(self.transport)
        self._report(code, reason)

    def _report(self, code: int | None, reason: str) -> None:
        if not self._reported:
            self._reported = True
            self.handler.websocket_closed(code, reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        The TCP connection ended: stop the timer and tell the handler (once).
        """
        self._cancel_timer()
        if self.connection is not None:
            self.connection.connection_lost()
        self._report(CloseCode.ABNORMAL, "connection lost")
