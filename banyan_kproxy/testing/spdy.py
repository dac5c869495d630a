"""
SPDY/3.1 framing and sessions, for the Kubernetes API stand-in.

Written from the SPDY/3.1 draft: control frames (SYN_STREAM, SYN_REPLY, RST_STREAM,
SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE) and data frames (`encode_frame`,
`FrameDecoder`), header blocks compressed with one zlib stream per direction primed
with the SPDY/3 dictionary (`HeaderCompressor`, `HeaderDecompressor`), and per-stream
flow control windows.  `SpdySession` is one endpoint without I/O (bytes in through
`SpdySession.receive`, bytes out through a ``send`` callable); `SpdyProtocol` puts it
on a Twisted transport.

Flow control, as kubectl's peer library (moby/spdystream) practises it: that
library neither sends nor honours WINDOW_UPDATE, so a session keeps a send window per
stream but only holds data back once the peer has shown it does flow control (sent a
WINDOW_UPDATE or an INITIAL_WINDOW_SIZE setting); ``honour_peer_window=True`` holds
it back from the start.  The receive side sends WINDOW_UPDATE as data is consumed and
tolerates a peer that overruns its window.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attr import define, field, frozen
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

VERSION = 3

#: The default initial window of every stream, both ways (64 KiB).
DEFAULT_WINDOW = 65536

#: The largest window and stream id SPDY allows (31 bits).
MAX_WINDOW = 0x7FFFFFFF

#: Data frames this session sends carry at most this many bytes.
MAX_DATA_CHUNK = 32 * 1024

_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding"
    " accept-language accept-ranges age allow authorization cache-control connection"
    " content-base content-encoding content-language content-length content-location"
    " content-md5 content-range content-type date etag expect expires from host if-match"
    " if-modified-since if-none-match if-range if-unmodified-since last-modified location"
    " max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after"
    " server te trailer transfer-encoding upgrade user-agent vary via warning"
    " www-authenticate method get status |200 OK| version HTTP/1.1 url public set-cookie"
    " keep-alive origin"
)
_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    b"502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
    b"400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
    b"501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct"
    b" Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    b"image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
    b"publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)

#: The zlib dictionary of SPDY/3 header compression (draft 3, 2.6.10.1): the words
#: above, each after its 32-bit length, then the tail; 1423 bytes.
DICTIONARY = b"".join(
    struct.pack("!I", len(word)) + word.encode("ascii")
    for word in (w.strip("|") for w in re.findall(r"\|[^|]*\||\S+", _WORDS))
) + _TAIL


class FrameType(enum.IntEnum):
    """
    SPDY/3 control frame types.
    """

    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9
    CREDENTIAL = 10


class RstStatus(enum.IntEnum):
    """
    RST_STREAM status codes.
    """

    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    INVALID_CREDENTIALS = 10
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    """
    GOAWAY status codes.
    """

    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class Setting(enum.IntEnum):
    """
    SETTINGS ids.
    """

    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_CLEAR_SETTINGS = 0x01


class SpdyProtocolError(Exception):
    """
    The peer broke the protocol; the session answers with GOAWAY PROTOCOL_ERROR.
    """


#: Header blocks as (name, value) pairs; a name may repeat (sent as one name with
#: NUL-separated values).
Headers = tuple[tuple[str, str], ...]


def _headers(value: Iterable[tuple[str, str]] | Mapping[str, str | Sequence[str]]) -> Headers:
    if isinstance(value, Mapping):
        pairs: list[tuple[str, str]] = []
        for name, values in value.items():
            for one in ([values] if isinstance(values, str) else values):
                pairs.append((name, one))
        return tuple(pairs)
    return tuple(value)


@frozen
class DataFrame:
    """
    A DATA frame.
    """

    stream_id: int
    data: bytes = b""
    flags: int = 0

    @property
    def fin(self) -> bool:
        """
        Whether this is the sender's last frame on the stream.
        """
        return bool(self.flags & FLAG_FIN)


@frozen
class SynStream:
    """
    SYN_STREAM: a new stream and its headers.
    """

    stream_id: int
    headers: Headers = field(default=(), converter=_headers)
    associated_to: int = 0
    priority: int = 0
    slot: int = 0
    flags: int = 0


@frozen
class SynReply:
    """
    SYN_REPLY: the recipient accepts a stream.
    """

    stream_id: int
    headers: Headers = field(default=(), converter=_headers)
    flags: int = 0


@frozen
class RstStream:
    """
    RST_STREAM: a stream ends abnormally.
    """

    stream_id: int
    status: int


@frozen
class Settings:
    """
    SETTINGS: (flags, id, value) entries.
    """

    entries: tuple[tuple[int, int, int], ...] = ()
    flags: int = 0


@frozen
class Ping:
    """
    PING, echoed by the recipient.
    """

    id: int


@frozen
class GoAway:
    """
    GOAWAY: the sender accepts no new streams after ``last_good_stream_id``.
    """

    last_good_stream_id: int
    status: int = GoAwayStatus.OK


@frozen
class HeadersFrame:
    """
    HEADERS: more headers for a stream.
    """

    stream_id: int
    headers: Headers = field(default=(), converter=_headers)
    flags: int = 0


@frozen
class WindowUpdate:
    """
    WINDOW_UPDATE: the recipient may send ``delta`` more bytes on the stream.
    """

    stream_id: int
    delta: int


@frozen
class UnknownControl:
    """
    A control frame of a type this module does not know (or a CREDENTIAL frame);
    the draft says to ignore it.
    """

    type: int
    flags: int
    payload: bytes


Frame = (
    DataFrame | SynStream | SynReply | RstStream | Settings | Ping | GoAway | HeadersFrame
    | WindowUpdate | UnknownControl
)


# -- header blocks ---------------------------------------------------------------------


def encode_header_block(headers: Headers) -> bytes:
    """
    The uncompressed name/value block: a 32-bit count, then each name and value
    after its 32-bit length.  Names are lower-cased; repeated names are joined into
    one entry with NUL-separated values.
    """
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), []).append(value)
    out = [struct.pack("!I", len(merged))]
    for name, values in merged.items():
        raw_name = name.encode("utf-8")
        raw_value = "\x00".join(values).encode("utf-8")
        out.append(struct.pack("!I", len(raw_name)) + raw_name)
        out.append(struct.pack("!I", len(raw_value)) + raw_value)
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    """
    Parse an uncompressed name/value block into (name, value) pairs (one pair per
    NUL-separated value); `SpdyProtocolError` when it is malformed.
    """
    try:
        (count,) = struct.unpack_from("!I", block)
        offset = 4
        pairs: list[tuple[str, str]] = []
        for _ in range(count):
            (size,) = struct.unpack_from("!I", block, offset)
            offset += 4
            if size == 0 or offset + size > len(block):
                raise SpdyProtocolError("bad header name length")
            name = block[offset:offset + size].decode("utf-8")
            offset += size
            (size,) = struct.unpack_from("!I", block, offset)
            offset += 4
            if offset + size > len(block):
                raise SpdyProtocolError("bad header value length")
            value = block[offset:offset + size].decode("utf-8")
            offset += size
            if name != name.lower():
                raise SpdyProtocolError(f"header name {name!r} is not lower case")
            for one in value.split("\x00"):
                pairs.append((name, one))
    except (struct.error, UnicodeDecodeError) as e:
        raise SpdyProtocolError(f"malformed header block: {e}") from None
    return tuple(pairs)


class HeaderCompressor:
    """
    Compresses the header blocks one endpoint sends: one zlib stream for the whole
    connection, primed with `DICTIONARY`, sync-flushed after each block.
    """

    def __init__(self, level: int = zlib.Z_DEFAULT_COMPRESSION) -> None:
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                      DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        """
        The compressed block for ``headers``.
        """
        raw = encode_header_block(headers)
        return self._zlib.compress(raw) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """
    Decompresses the header blocks the peer sends (its one zlib stream).
    """

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(15, DICTIONARY)

    def decompress(self, block: bytes) -> Headers:
        """
        The headers in one compressed block.
        """
        try:
            raw = self._zlib.decompress(block)
        except zlib.error as e:
            raise SpdyProtocolError(f"header decompression failed: {e}") from None
        return decode_header_block(raw)


# -- frames ------------------------------------------------------------------------------


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > 0xFFFFFF:
        raise ValueError("frame too large")
    return struct.pack("!HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def encode_frame(frame: Frame, compressor: HeaderCompressor | None = None) -> bytes:
    """
    The wire bytes of ``frame``; frames with headers need the connection's
    ``compressor``.
    """
    if isinstance(frame, DataFrame):
        if len(frame.data) > 0xFFFFFF:
            raise ValueError("data frame too large")
        return struct.pack(
            "!II", frame.stream_id & MAX_WINDOW, (frame.flags << 24) | len(frame.data)
        ) + frame.data
    if isinstance(frame, (SynStream, SynReply, HeadersFrame)):
        if compressor is None:
            raise ValueError("frames with headers need a compressor")
        block = compressor.compress(frame.headers)
        if isinstance(frame, SynStream):
            payload = struct.pack(
                "!IIBB", frame.stream_id & MAX_WINDOW, frame.associated_to & MAX_WINDOW,
                (frame.priority & 7) << 5, frame.slot,
            ) + block
            return _control(FrameType.SYN_STREAM, frame.flags, payload)
        frame_type = FrameType.SYN_REPLY if isinstance(frame, SynReply) else FrameType.HEADERS
        return _control(frame_type, frame.flags,
                        struct.pack("!I", frame.stream_id & MAX_WINDOW) + block)
    if isinstance(frame, RstStream):
        return _control(FrameType.RST_STREAM, 0,
                        struct.pack("!II", frame.stream_id & MAX_WINDOW, frame.status))
    if isinstance(frame, Settings):
        payload = struct.pack("!I", len(frame.entries)) + b"".join(
            struct.pack("!II", (flags << 24) | (ident & 0xFFFFFF), value)
            for flags, ident, value in frame.entries
        )
        return _control(FrameType.SETTINGS, frame.flags, payload)
    if isinstance(frame, Ping):
        return _control(FrameType.PING, 0, struct.pack("!I", frame.id))
    if isinstance(frame, GoAway):
        return _control(FrameType.GOAWAY, 0,
                        struct.pack("!II", frame.last_good_stream_id & MAX_WINDOW, frame.status))
    if isinstance(frame, WindowUpdate):
        return _control(FrameType.WINDOW_UPDATE, 0,
                        struct.pack("!II", frame.stream_id & MAX_WINDOW, frame.delta & MAX_WINDOW))
    if isinstance(frame, UnknownControl):
        return _control(frame.type, frame.flags, frame.payload)
    raise TypeError(f"not a frame: {frame!r}")


class FrameDecoder:
    """
    Decodes frames from a byte stream fed in arbitrary pieces, decompressing header
    blocks with the peer's zlib stream.
    """

    def __init__(self, max_frame_size: int = 0xFFFFFF) -> None:
        self._buffer = bytearray()
        self._decompressor = HeaderDecompressor()
        self._max = max_frame_size

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add bytes; return the frames now complete.  Raises `SpdyProtocolError`.
        """
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 8:
            first, second = struct.unpack_from("!II", self._buffer)
            size = second & 0xFFFFFF
            if size > self._max:
                raise SpdyProtocolError(f"frame of {size} bytes is too large")
            if len(self._buffer) < 8 + size:
                break
            payload = bytes(self._buffer[8:8 + size])
            del self._buffer[:8 + size]
            flags = second >> 24
            if first & 0x80000000:
                frames.append(self._control(first, flags, payload))
            else:
                frames.append(DataFrame(first & MAX_WINDOW, payload, flags))
        return frames

    def _control(self, first: int, flags: int, payload: bytes) -> Frame:
        version = (first >> 16) & 0x7FFF
        frame_type = first & 0xFFFF
        if version != VERSION:
            raise SpdyProtocolError(f"unsupported SPDY version {version}")
        try:
            if frame_type == FrameType.SYN_STREAM:
                stream_id, associated, priority, slot = struct.unpack_from("!IIBB", payload)
                headers = self._decompressor.decompress(payload[10:])
                return SynStream(stream_id & MAX_WINDOW, headers, associated & MAX_WINDOW,
                                 priority >> 5, slot, flags)
            if frame_type in (FrameType.SYN_REPLY, FrameType.HEADERS):
                (stream_id,) = struct.unpack_from("!I", payload)
                headers = self._decompressor.decompress(payload[4:])
                cls = SynReply if frame_type == FrameType.SYN_REPLY else HeadersFrame
                return cls(stream_id & MAX_WINDOW, headers, flags)
            if frame_type == FrameType.RST_STREAM:
                stream_id, status = struct.unpack("!II", payload)
                return RstStream(stream_id & MAX_WINDOW, status)
            if frame_type == FrameType.SETTINGS:
                (count,) = struct.unpack_from("!I", payload)
                if len(payload) != 4 + 8 * count:
                    raise SpdyProtocolError("bad SETTINGS length")
                entries = []
                for index in range(count):
                    packed, value = struct.unpack_from("!II", payload, 4 + 8 * index)
                    entries.append((packed >> 24, packed & 0xFFFFFF, value))
                return Settings(tuple(entries), flags)
            if frame_type == FrameType.PING:
                (ping_id,) = struct.unpack("!I", payload)
                return Ping(ping_id)
            if frame_type == FrameType.GOAWAY:
                last, status = struct.unpack("!II", payload)
                return GoAway(last & MAX_WINDOW, status)
            if frame_type == FrameType.WINDOW_UPDATE:
                stream_id, delta = struct.unpack("!II", payload)
                return WindowUpdate(stream_id & MAX_WINDOW, delta & MAX_WINDOW)
        except struct.error as e:
            raise SpdyProtocolError(f"malformed {FrameType(frame_type).name} frame: {e}") from None
        return UnknownControl(frame_type, flags, payload)


# -- streams and sessions ----------------------------------------------------------------


@define(eq=False)
class SpdyStream:
    """
    One stream of a `SpdySession`.

    ``headers`` are the peer's SYN_STREAM (or our own, for streams we opened);
    set ``on_data``, ``on_end`` (the peer's FIN), ``on_reset`` (RST_STREAM from the
    peer, with its status) and ``on_drained`` (held-back data all sent) to hear about
    it.  `write`, `close` and `reset` send.
    """

    session: SpdySession
    id: int
    headers: Headers
    send_window: int
    recv_window: int
    replied: bool = False
    remote_closed: bool = False
    local_closed: bool = False
    was_reset: bool = False
    reply_headers: Headers = ()
    on_data: Callable[[bytes], Any] | None = None
    on_end: Callable[[], Any] | None = None
    on_reset: Callable[[int], Any] | None = None
    on_reply: Callable[[Headers], Any] | None = None
    on_drained: Callable[[], Any] | None = None
    _pending: bytearray = field(factory=bytearray)
    _pending_fin: bool = False
    _blocked: bool = False
    _consumed: int = 0

    def header(self, name: str) -> str | None:
        """
        The first value of a header of the stream's SYN_STREAM (name case-insensitive).
        """
        wanted = name.lower()
        return next((v for n, v in self.headers if n == wanted), None)

    @property
    def pending(self) -> int:
        """
        Bytes written but held back by the peer's window.
        """
        return len(self._pending)

    def reply(self, headers: Headers | Mapping[str, str] = (), fin: bool = False) -> None:
        """
        Accept the peer's stream with SYN_REPLY.
        """
        self.session._reply(self, _headers(headers), fin)

    def write(self, data: bytes) -> None:
        """
        Send data (held back while the peer's window is closed).
        """
        self.session._write(self, data, fin=False)

    def close(self) -> None:
        """
        Half-close: send FIN once the held-back data has gone.
        """
        self.session._write(self, b"", fin=True)

    def reset(self, status: int = RstStatus.CANCEL) -> None:
        """
        End the stream abruptly with RST_STREAM.
        """
        self.session._reset(self, status)

    @property
    def closed(self) -> bool:
        """
        Both sides finished, or the stream was reset.
        """
        return self.was_reset or (self.remote_closed and self.local_closed)


class SpdySession:
    """
    One endpoint of a SPDY/3.1 connection, without I/O.

    ``on_stream(stream)`` hears of each stream the peer opens (reply to it with
    `SpdyStream.reply`, or reset it); ``on_goaway(frame)`` of the peer's GOAWAY;
    ``on_error(message)`` of a protocol error (after GOAWAY PROTOCOL_ERROR went out;
    the caller closes the connection).  PINGs from the peer are answered.
    ``initial_window`` is the receive window this side advertises for new streams
    (sent in a SETTINGS frame when it is not the default).
    """

    def __init__(
        self,
        send: Callable[[bytes], Any],
        *,
        on_stream: Callable[[SpdyStream], Any] = lambda stream: None,
        on_goaway: Callable[[GoAway], Any] = lambda frame: None,
        on_error: Callable[[str], Any] = lambda message: None,
        on_ping: Callable[[int], Any] = lambda ping_id: None,
        client: bool = False,
        initial_window: int = DEFAULT_WINDOW,
        honour_peer_window: bool | None = None,
    ) -> None:
        self._send = send
        self._on_stream = on_stream
        self._on_goaway = on_goaway
        self._on_error = on_error
        self._on_ping = on_ping
        self.client = client
        self._compressor = HeaderCompressor()
        self._decoder = FrameDecoder()
        self.streams: dict[int, SpdyStream] = {}
        self._next_stream_id = 1 if client else 2
        self._next_ping_id = 1 if client else 2
        self._last_peer_stream = 0
        self.initial_window = initial_window
        self.peer_initial_window = DEFAULT_WINDOW
        self.honour_peer_window = bool(honour_peer_window)
        self._auto_flow_control = honour_peer_window is None
        self.goaway_sent = False
        self.goaway_received = False
        self.failed = False
        self.frames_received: list[Frame] = []
        self.record_frames = False
        if initial_window != DEFAULT_WINDOW:
            self.send_frame(Settings(((0, Setting.INITIAL_WINDOW_SIZE, initial_window),)))

    # -- sending

    def send_frame(self, frame: Frame) -> None:
        """
        Encode and send one frame.
        """
        self._send(encode_frame(frame, self._compressor))

    def open_stream(self, headers: Headers | Mapping[str, str], *, fin: bool = False) -> SpdyStream:
        """
        Open a stream with SYN_STREAM (a client opens odd ids, a server even ones).
        """
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        pairs = _headers(headers)
        stream = SpdyStream(self, stream_id, pairs, self.peer_initial_window, self.initial_window,
                            replied=True, local_closed=fin)
        self.streams[stream_id] = stream
        self.send_frame(SynStream(stream_id, pairs, flags=FLAG_FIN if fin else 0))
        return stream

    def ping(self) -> int:
        """
        Send a PING; return its id (the echo goes to ``on_ping``).
        """
        ping_id = self._next_ping_id
        self._next_ping_id += 2
        self.send_frame(Ping(ping_id))
        return ping_id

    def go_away(self, status: int = GoAwayStatus.OK) -> None:
        """
        Send GOAWAY (once): no new streams from the peer are accepted after it.
        """
        if not self.goaway_sent:
            self.goaway_sent = True
            self.send_frame(GoAway(self._last_peer_stream, status))

    def _reply(self, stream: SpdyStream, headers: Headers, fin: bool) -> None:
        if stream.replied or stream.was_reset:
            return
        stream.replied = True
        stream.local_closed = fin
        self.send_frame(SynReply(stream.id, headers, FLAG_FIN if fin else 0))
        self._forget_if_closed(stream)

    def _write(self, stream: SpdyStream, data: bytes, fin: bool) -> None:
        if stream.local_closed or stream.was_reset or stream._pending_fin:
            return
        stream._pending += data
        stream._pending_fin = fin
        self._flush(stream)

    def _flush(self, stream: SpdyStream) -> None:
        while stream._pending:
            size = min(len(stream._pending), MAX_DATA_CHUNK)
            if self.honour_peer_window:
                size = min(size, stream.send_window)
                if size <= 0:
                    stream._blocked = True
                    return
            chunk = bytes(stream._pending[:size])
            del stream._pending[:size]
            stream.send_window -= size
            last = stream._pending_fin and not stream._pending
            self.send_frame(DataFrame(stream.id, chunk, FLAG_FIN if last else 0))
            if last:
                stream.local_closed = True
        if stream._pending_fin and not stream.local_closed:
            stream.local_closed = True
            self.send_frame(DataFrame(stream.id, b"", FLAG_FIN))
        if stream._blocked:
            stream._blocked = False
            if stream.on_drained is not None:
                stream.on_drained()
        self._forget_if_closed(stream)

    def _reset(self, stream: SpdyStream, status: int) -> None:
        if stream.was_reset:
            return
        stream.was_reset = True
        stream._pending = bytearray()
        self.send_frame(RstStream(stream.id, status))
        self.streams.pop(stream.id, None)

    def _forget_if_closed(self, stream: SpdyStream) -> None:
        if stream.closed:
            self.streams.pop(stream.id, None)

    # -- receiving

    def receive(self, data: bytes) -> None:
        """
        Handle bytes from the peer.
        """
        if self.failed:
            return
        try:
            frames = self._decoder.feed(data)
        except SpdyProtocolError as e:
            self._fail(str(e))
            return
        for frame in frames:
            if self.record_frames:
                self.frames_received.append(frame)
            try:
                self._frame(frame)
            except SpdyProtocolError as e:
                self._fail(str(e))
                return

    def _fail(self, message: str) -> None:
        self.failed = True
        self.go_away(GoAwayStatus.PROTOCOL_ERROR)
        self._on_error(message)

    def _frame(self, frame: Frame) -> None:
        if isinstance(frame, DataFrame):
            self._data(frame)
        elif isinstance(frame, SynStream):
            self._syn_stream(frame)
        elif isinstance(frame, SynReply):
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                return
            stream.reply_headers = frame.headers
            if stream.on_reply is not None:
                stream.on_reply(frame.headers)
            if frame.flags & FLAG_FIN:
                self._remote_fin(stream)
        elif isinstance(frame, HeadersFrame):
            stream = self.streams.get(frame.stream_id)
            if stream is not None and frame.flags & FLAG_FIN:
                self._remote_fin(stream)
        elif isinstance(frame, RstStream):
            stream = self.streams.pop(frame.stream_id, None)
            if stream is not None and not stream.was_reset:
                stream.was_reset = True
                stream._pending = bytearray()
                if stream.on_reset is not None:
                    stream.on_reset(frame.status)
        elif isinstance(frame, Settings):
            for _flags, ident, value in frame.entries:
                if ident == Setting.INITIAL_WINDOW_SIZE:
                    self._peer_window_changed(value)
        elif isinstance(frame, Ping):
            if (frame.id % 2 == 1) == self.client:
                self._on_ping(frame.id)  # our own ping, echoed
            else:
                self.send_frame(frame)
        elif isinstance(frame, GoAway):
            self.goaway_received = True
            self._on_goaway(frame)
        elif isinstance(frame, WindowUpdate):
            self._window_update(frame)

    def _syn_stream(self, frame: SynStream) -> None:
        if frame.stream_id == 0 or (frame.stream_id % 2 == 1) != (not self.client):
            raise SpdyProtocolError(f"stream id {frame.stream_id} has the wrong parity")
        if frame.stream_id <= self._last_peer_stream:
            raise SpdyProtocolError(f"stream id {frame.stream_id} is not increasing")
        self._last_peer_stream = frame.stream_id
        if self.goaway_sent:
            self.send_frame(RstStream(frame.stream_id, RstStatus.REFUSED_STREAM))
            return
        stream = SpdyStream(self, frame.stream_id, frame.headers, self.peer_initial_window,
                            self.initial_window, remote_closed=bool(frame.flags & FLAG_FIN),
                            local_closed=bool(frame.flags & FLAG_UNIDIRECTIONAL))
        self.streams[frame.stream_id] = stream
        self._on_stream(stream)
        if stream.remote_closed and stream.on_end is not None:
            stream.on_end()

    def _data(self, frame: DataFrame) -> None:
        stream = self.streams.get(frame.stream_id)
        if stream is None or stream.remote_closed:
            # Data for a stream that is gone (reset, or never existed): the draft asks
            # for RST_STREAM INVALID_STREAM, which only confuses a peer that raced a
            # reset; drop it.
            return
        size = len(frame.data)
        stream.recv_window -= size
        if frame.data and stream.on_data is not None:
            stream.on_data(frame.data)
        # The data is consumed at once: give the window back in big enough steps.
        stream._consumed += size
        if stream._consumed >= self.initial_window // 2 and not frame.fin:
            self.send_frame(WindowUpdate(stream.id, stream._consumed))
            stream.recv_window += stream._consumed
            stream._consumed = 0
        if frame.fin:
            self._remote_fin(stream)

    def _remote_fin(self, stream: SpdyStream) -> None:
        if stream.remote_closed:
            return
        stream.remote_closed = True
        if stream.on_end is not None:
            stream.on_end()
        self._forget_if_closed(stream)

    def _peer_window_changed(self, value: int) -> None:
        if value > MAX_WINDOW:
            raise SpdyProtocolError("INITIAL_WINDOW_SIZE over 2^31-1")
        delta = value - self.peer_initial_window
        self.peer_initial_window = value
        if self._auto_flow_control:
            self.honour_peer_window = True
        for stream in list(self.streams.values()):
            stream.send_window += delta
            self._flush(stream)

    def _window_update(self, frame: WindowUpdate) -> None:
        if self._auto_flow_control:
            self.honour_peer_window = True
        if frame.delta == 0:
            raise SpdyProtocolError("WINDOW_UPDATE with a zero delta")
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            return
        if stream.send_window + frame.delta > MAX_WINDOW:
            self._reset(stream, RstStatus.FLOW_CONTROL_ERROR)
            return
        stream.send_window += frame.delta
        self._flush(stream)


class SpdyProtocol(Protocol):
    """
    A `SpdySession` on a Twisted transport.

    ``session_factory(send)`` builds the session once connected; a protocol error
    closes the connection after the GOAWAY has gone out.  ``on_lost`` hears when the
    connection ends.
    """

    def __init__(self, session_factory: Callable[[Callable[[bytes], Any], Callable[[str], Any]], SpdySession],
                 on_lost: Callable[[Failure | None], Any] = lambda reason: None) -> None:
        self._factory = session_factory
        self._on_lost = on_lost
        self.session: SpdySession | None = None

    def connectionMade(self) -> None:
        """
        Build the session.
        """
        self.session = self._factory(self.transport.write, self._protocol_error)

    def _protocol_error(self, message: str) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """
        Frames from the peer.
        """
        assert self.session is not None
        self.session.receive(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Tell whoever listens.
        """
        self._on_lost(reason)
