"""
The server side of HTTP ``CONNECT``, shared by the gateway (mTLS, at the edge) and
the device-side connect service (plain, on loopback).

`ConnectServerProtocol` is a small line-mode protocol: it reads one bounded request
head (at most ``max_head_bytes`` and ``max_header_lines``), accepts only
``CONNECT host:port`` in authority form, and asks an `IConnectPolicy` for a
*connected* `SpliceEnd` to the destination.  Only when that connection is up does it
answer ``200 Connection established``, switch to raw mode and join both connections
with `banyan_kproxy.tunnel.Splice` (bytes the client sent after its head are kept and
forwarded).  Anything else is answered with one short ``text/plain`` status and the
connection is closed.  While the policy works, the client's connection is still read
(its early bytes are held, up to a bound), so a client that goes away cancels the
policy's work.

`ConnectServerFactory` holds what the connections share: the policy, the clock, the
timeouts, the connection limits (per client and global), the metrics and the
``on_tunnel_opened`` / ``on_tunnel_closed`` callbacks, which get a `TunnelRecord`
(client identity, destination, bytes each way, duration, outcome) for the log and
the audit trail.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attr
from attr import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from zope.interface import Interface

from banyan_kproxy.health import Metrics
from banyan_kproxy.tunnel import Splice, SpliceEnd

__all__ = [
    "ClientIdentity",
    "ConnectRequest",
    "ConnectRefused",
    "IConnectPolicy",
    "TunnelRecord",
    "ConnectMetrics",
    "ConnectionLimits",
    "ConnectServerProtocol",
    "ConnectServerFactory",
    "client_identity",
    "parse_authority",
    "log_tunnel",
    "describe_peer",
    "MAX_HEAD_BYTES",
    "MAX_HEADER_LINES",
]

log = Logger()

#: Seconds to wait, after the drain deadline closed what was left, for it to be gone.
DRAIN_CUT_GRACE = 1.0
#: The largest request head read (request line, header lines and line ends).
MAX_HEAD_BYTES = 16 * 1024
#: The most header lines a request head may have.
MAX_HEADER_LINES = 100
#: Bytes a client may send after its head before the tunnel exists; then it is paused.
MAX_EARLY_BYTES = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\Z"
)
_PORT = re.compile(r"[0-9]{1,5}\Z")


@frozen
class ClientIdentity:
    """
    Who the client is, from its verified TLS client certificate.

    ``common_name`` is the subject CN (None when the subject has none); ``sans``
    the certificate's DNS and email subject alternative names, in certificate order.
    """

    common_name: str | None
    sans: tuple[str, ...] = ()
    #: SHA-256 of the certificate (DER), lowercase hex.
    fingerprint: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """
        The CN (if any) followed by the SANs: every name client patterns are matched against.
        """
        return ((self.common_name,) if self.common_name else ()) + self.sans

    @property
    def name(self) -> str | None:
        """
        The name to show for this client: the CN, else the first SAN.
        """
        names = self.names
        return names[0] if names else None

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> ClientIdentity:
        """
        Read the CN and the DNS / email SANs of a ``cryptography`` certificate.
        """
        cns = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(cns[0].value) if cns else None
        sans: list[str] = []
        try:
            extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            pass
        else:
            for general_name in extension.value:
                if isinstance(general_name, x509.DNSName | x509.RFC822Name):
                    sans.append(general_name.value)
        return cls(common_name, tuple(sans), certificate.fingerprint(hashes.SHA256()).hex())


def client_identity(transport: Any) -> ClientIdentity | None:
    """
    The identity in the TLS client certificate the transport's peer presented
    (verified by the TLS layer), or None for plain TCP or a client without one.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    peer = transport.getPeerCertificate()
    if peer is None:
        return None
    return ClientIdentity.from_certificate(peer.to_cryptography())


@frozen
class ConnectRequest:
    """
    A parsed ``CONNECT`` request: the destination, who asked and what they sent.
    """

    host: str
    port: int
    peer: Any  # IAddress of the client connection
    headers: Headers = attr.field(eq=False)
    client: ClientIdentity | None = None

    @property
    def target(self) -> str:
        """
        ``host:port`` (``[v6]:port`` for IPv6), as in the request line.
        """
        return format_target(self.host, self.port)


def format_target(host: str, port: int) -> str:
    """
    ``host:port``, with brackets around an IPv6 address.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectRefused(Exception):
    """
    A policy's answer that the tunnel will not be made: the HTTP status ``code``
    (400, 403, 405, 407, 429, 502, 503, 504, ...), a one-line ``reason`` sent as the
    body, and extra response ``headers`` (``Proxy-Authenticate`` for a 407).
    """

    def __init__(self, code: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.headers = tuple(headers)

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"


class IConnectPolicy(Interface):
    """
    Decides whether a ``CONNECT`` is allowed and makes the destination connection.
    """

    def open(request: ConnectRequest) -> Deferred[SpliceEnd]:  # type: ignore[misc]
        """
        A Deferred firing with a *connected* `SpliceEnd` to the destination, or
        failing with `ConnectRefused` (other failures: connection refused or a DNS
        failure give 502, a timeout 504).  It is cancelled when the client goes away.
        """


@frozen
class TunnelRecord:
    """
    What happened to one ``CONNECT`` request, for the log and the audit trail.

    ``outcome``: ``open`` (in ``on_tunnel_opened``), then one of ``closed``,
    ``idle_timeout`` (a tunnel that was made), ``bad_request``, ``forbidden``,
    ``limited``, ``unreachable``, ``timeout``, ``refused`` (the status ``code``
    says which) or ``cancelled`` (the client left before the answer; ``code`` 0).
    ``bytes_up`` went from the client to the destination, ``bytes_down`` back.
    Times are the clock's seconds.
    """

    tunnel_id: str
    peer: Any
    client: ClientIdentity | None
    host: str | None
    port: int | None
    code: int
    outcome: str
    reason: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    started: float = 0.0
    established: float | None = None
    ended: float | None = None
    user_agent: str | None = None

    @property
    def target(self) -> str | None:
        """
        ``host:port`` of the destination, None when the request did not name one.
        """
        if self.host is None or self.port is None:
            return None
        return format_target(self.host, self.port)

    @property
    def duration(self) -> float:
        """
        Seconds from the request to the end (or to now-known ``established``).
        """
        end = self.ended if self.ended is not None else self.established
        return max(0.0, (end if end is not None else self.started) - self.started)


#: Reason phrases (RFC 9110 and 6585) for the codes this module sends; Twisted's
#: table lacks some and spells others the RFC 2616 way.
_PHRASES = {
    200: b"Connection established",
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

#: The outcome for a refusal with this status code.
_REFUSAL_OUTCOMES = {
    400: "bad_request",
    405: "bad_request",
    408: "bad_request",
    431: "bad_request",
    505: "bad_request",
    403: "forbidden",
    407: "forbidden",
    429: "limited",
    503: "limited",
    502: "unreachable",
    504: "timeout",
}

#: Every outcome label value.
OUTCOMES = (
    "closed", "idle_timeout", "bad_request", "forbidden", "limited",
    "unreachable", "timeout", "refused", "cancelled",
)


def refusal_outcome(code: int) -> str:
    """
    The `TunnelRecord` outcome for a refusal with status ``code``.
    """
    return _REFUSAL_OUTCOMES.get(code, "refused")


@attr.s(auto_attribs=True, frozen=True)
class ConnectMetrics:
    """
    Handles on a CONNECT listener's series; `create` registers them under a prefix.
    """

    tunnels: Any
    open_tunnels: Any
    bytes: Any
    duration: Any
    handshake_failures: Any

    @classmethod
    def create(cls, metrics: Metrics | None = None, prefix: str = "kproxy_connect") -> ConnectMetrics:
        """
        Register ``<prefix>_tunnels_total{outcome}``, ``<prefix>_open_tunnels``,
        ``<prefix>_tunnel_bytes_total{direction}``, ``<prefix>_tunnel_duration_seconds``
        and ``<prefix>_tls_handshake_failures_total`` in ``metrics`` (a private
        registry when None).
        """
        metrics = metrics if metrics is not None else Metrics()
        made = cls(
            tunnels=metrics.counter(
                f"{prefix}_tunnels_total",
                "CONNECT requests answered, by outcome (closed and idle_timeout: tunnels made).",
                ("outcome",),
            ),
            open_tunnels=metrics.gauge(f"{prefix}_open_tunnels", "Tunnels open now."),
            bytes=metrics.counter(
                f"{prefix}_tunnel_bytes_total",
                "Bytes carried by tunnels: up (client to destination) and down.",
                ("direction",),
            ),
            duration=metrics.histogram(
                f"{prefix}_tunnel_duration_seconds",
                "How long tunnels stayed open.",
                buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400),
            ),
            handshake_failures=metrics.counter(
                f"{prefix}_tls_handshake_failures_total",
                "TLS handshakes that failed (no or untrusted client certificate, not TLS, ...).",
            ),
        )
        for outcome in OUTCOMES:
            made.tunnels.labels(outcome=outcome)
        for direction in ("up", "down"):
            made.bytes.labels(direction=direction)
        return made


@attr.s(auto_attribs=True, eq=False)
class ConnectionLimits:
    """
    How many requests (waiting for their destination, or tunnelled) may be open at
    once, in all (``max_total``, else 503) and per client key (``max_per_client``,
    else 429).  None: no limit.
    """

    max_total: int | None = None
    max_per_client: int | None = None
    total: int = 0
    per_client: dict[str, int] = attr.Factory(dict)

    def acquire(self, key: str) -> ConnectRefused | None:
        """
        Take a slot for ``key``, or say why not (the slot is then not taken).
        """
        if self.max_total is not None and self.total >= self.max_total:
            return ConnectRefused(503, f"too many tunnels open (limit {self.max_total})")
        count = self.per_client.get(key, 0)
        if self.max_per_client is not None and count >= self.max_per_client:
            return ConnectRefused(
                429, f"too many tunnels open for {key} (limit {self.max_per_client})"
            )
        self.total += 1
        self.per_client[key] = count + 1
        return None

    def release(self, key: str) -> None:
        """
        Give back a slot taken by `acquire`.
        """
        self.total -= 1
        count = self.per_client.get(key, 0) - 1
        if count > 0:
            self.per_client[key] = count
        else:
            self.per_client.pop(key, None)


def default_client_key(request: ConnectRequest) -> str:
    """
    What the per-client limit counts by: the certificate identity, else the peer's IP.
    """
    if request.client is not None and request.client.name:
        return request.client.name
    return str(getattr(request.peer, "host", request.peer))


class _BadRequest(Exception):
    """
    The request head cannot be served; ``code`` and ``reason`` say why.
    """

    def __init__(self, code: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.headers = tuple(headers)


def parse_authority(target: str) -> tuple[str, int]:
    """
    An authority-form request target, ``host:port`` or ``[v6]:port``, as a
    lower-cased host (trailing dot removed) and a port; `ValueError` saying why not.
    """
    if "/" in target or "@" in target or "?" in target or "#" in target:
        raise ValueError(f"the target must be host:port, not {target!r}")
    if target.startswith("["):
        host, sep, port = target[1:].partition("]")
        if not sep:
            raise ValueError(f"{target!r} has no closing bracket")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if not port.startswith(":"):
            raise ValueError(f"{target!r} has no port")
        port = port[1:]
    else:
        host, sep, port = target.rpartition(":")
        if not sep:
            raise ValueError(f"{target!r} has no port")
        if ":" in host:
            raise ValueError(f"{target!r}: an IPv6 address must be in brackets")
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not a host name or address")
    if not _PORT.match(port) or not 0 < int(port) < 65536:
        raise ValueError(f"{port!r} is not a port number")
    return host, int(port)


def _parse_head(request_line: bytes, header_lines: Iterable[bytes]) -> tuple[str, int, Headers]:
    """
    The destination and headers of a request head; `_BadRequest` when it is not a
    well-formed HTTP/1.x ``CONNECT host:port``.
    """
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    match = _VERSION.match(version)
    if match is None:
        raise _BadRequest(400, "malformed request line")
    if match.group(1) != b"1":
        raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    headers = Headers()
    for line in header_lines:
        if line[:1] in (b" ", b"\t"):
            raise _BadRequest(400, "folded header lines are not allowed")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise _BadRequest(400, "malformed header line")
        headers.addRawHeader(name, value.strip(b" \t"))
    if method != b"CONNECT":
        raise _BadRequest(405, "only CONNECT is supported here", (("Allow", "CONNECT"),))
    try:
        host, port = parse_authority(target.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadRequest(400, f"CONNECT needs host:port: {e}") from None
    return host, port, headers


def describe_peer(peer: Any) -> str:
    """
    ``host:port`` of an address (``[v6]:port``), for log lines.
    """
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is None:
        return str(peer)
    return format_target(host, port) if port is not None else host


def _tls_error_text(failure: Failure) -> str:
    """
    The OpenSSL reasons in an ``SSL.Error``, joined; the repr otherwise.
    """
    args = getattr(failure.value, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(item[-1]) for item in args[0] if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return str(failure.value) or failure.value.__class__.__name__


def _is_tls_error(failure: Failure) -> bool:
    return failure.check(SSL.Error) is not None


class ConnectServerProtocol(LineReceiver):
    """
    One client connection: a bounded ``CONNECT`` head, then either a refusal or,
    once the destination is connected, ``200`` and a splice.
    """

    delimiter = b"\n"

    def __init__(self, factory: ConnectServerFactory) -> None:
        self.factory = factory
        self.MAX_LENGTH = factory.max_head_bytes
        # "head" -> "opening" -> "tunnel"; "done" after a refusal; "gone" once lost.
        self.state = "head"
        self._head_bytes = 0
        self._request_line: bytes | None = None
        self._header_lines: list[bytes] = []
        self._head_timer: Any = None
        self._received_any = False
        self._request: ConnectRequest | None = None
        self._client: ClientIdentity | None = None
        self._opening: Deferred[SpliceEnd] | None = None
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._client_end: SpliceEnd | None = None
        self._dest_end: SpliceEnd | None = None
        self._limit_key: str | None = None
        self._tunnel_id = uuid.uuid4().hex
        self._started = 0.0
        self._established: float | None = None
        self._code = 0
        self._outcome = ""
        self._reason = ""
        self._idle: _IdleWatch | None = None
        self._finished = False
        self._peer: Any = None

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._peer = self.transport.getPeer()
        self._head_timer = self.factory.clock.callLater(self.factory.head_timeout, self._head_timed_out)
        self.factory.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        self._received_any = True
        if self.state in ("done", "gone"):
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_head_timer()
        state, self.state = self.state, "gone"
        if state == "head":
            # Gone before a whole head arrived: nothing to answer or record, but a
            # failed TLS handshake is worth one line.
            if reason is not None and _is_tls_error(reason):
                self.factory.handshake_failed(self._peer, reason)
            self.factory.connection_gone(self)
            return
        if state == "opening":
            self._outcome, self._code = "cancelled", 0
            self._reason = "the client went away before the destination answered"
            opening, self._opening = self._opening, None
            if opening is not None:
                opening.cancel()
            self._finish()
        elif state == "tunnel":
            assert self._client_end is not None
            self._client_end.connectionLost(reason)
        else:
            self._finish()

    # -- the request head ---------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.state != "head":
            return
        self._head_bytes += len(line) + len(self.delimiter)
        if self._head_bytes > self.factory.max_head_bytes:
            self._too_large("the request head is too large")
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._request_line is None:
            if line:
                self._request_line = line
            return
        if line:
            if len(self._header_lines) >= self.factory.max_header_lines:
                self._too_large("the request has too many header lines")
                return
            self._header_lines.append(line)
            return
        self.setRawMode()
        self._head_complete()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large("the request head is too large")

    def rawDataReceived(self, data: bytes) -> None:
        if self.state == "tunnel":
            assert self._client_end is not None
            self._client_end.dataReceived(data)
        elif self.state == "opening":
            self._early.append(data)
            self._early_bytes += len(data)
            if self._early_bytes > MAX_EARLY_BYTES:
                # Stop reading until the tunnel exists; the splice resumes it.
                self.transport.pauseProducing()

    def _too_large(self, reason: str) -> None:
        self._cancel_head_timer()
        self._refuse(431, reason)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.state != "head":
            return
        if self._received_any and self._request_line is not None:
            self._refuse(408, "the request head did not arrive in time")
        else:
            # Nothing (or only a TLS handshake) arrived: nothing to answer.
            self.state = "done"
            self.transport.loseConnection()

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_complete(self) -> None:
        self._cancel_head_timer()
        self._started = self.factory.clock.seconds()
        assert self._request_line is not None
        try:
            client = self._client = self.factory.identify(self.transport)
        except Exception:
            log.failure("Reading the client certificate of {peer} failed", peer=describe_peer(self._peer))
            client = None
        try:
            host, port, headers = _parse_head(self._request_line, self._header_lines)
        except _BadRequest as e:
            self._refuse(e.code, e.reason, e.headers)
            return
        request = self._request = ConnectRequest(host, port, self._peer, headers, client)
        key = self.factory.client_key(request)
        refused = self.factory.limits.acquire(key)
        if refused is not None:
            self._refuse(refused.code, refused.reason, refused.headers)
            return
        self._limit_key = key
        self.state = "opening"
        opening = maybeDeferred(self.factory.policy.open, request)
        self._opening = opening
        if self.factory.open_timeout is not None:
            opening.addTimeout(self.factory.open_timeout, self.factory.clock)
        opening.addCallbacks(self._opened, self._open_failed)
        opening.addErrback(
            lambda f: log.failure("CONNECT {target}: making the tunnel failed", f, target=request.target)
        )

    # -- the answer ---------------------------------------------------------

    def _opened(self, destination: SpliceEnd) -> None:
        self._opening = None
        if self.state != "opening":
            # The client went away meanwhile.
            if destination.transport is not None:
                destination.transport.loseConnection()
            return
        self.state = "tunnel"
        self._established = self.factory.clock.seconds()
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client_end = self._client_end = SpliceEnd("client")
        client_end.makeConnection(self.transport)
        early, self._early = b"".join(self._early), []
        if early:
            client_end.dataReceived(early)
        self._dest_end = destination
        splice = Splice(client_end, destination)
        if self.factory.idle_timeout:
            self._idle = _IdleWatch(self, self.factory.idle_timeout)
        self.factory.tunnel_opened(self._record("open"))
        splice.done.addCallback(self._tunnel_done)

    def _open_failed(self, failure: Failure) -> None:
        self._opening = None
        if self.state != "opening":
            return None
        if failure.check(ConnectRefused):
            e = failure.value
            self._refuse(e.code, e.reason, e.headers)
        elif failure.check(CancelledError, DeferredTimeoutError, neterror.TimeoutError):
            self._refuse(504, "the destination did not answer in time")
        elif failure.check(neterror.ConnectionRefusedError):
            self._refuse(502, "the destination refused the connection")
        elif failure.check(neterror.DNSLookupError):
            self._refuse(502, "the destination's name does not resolve")
        elif failure.check(neterror.ConnectError):
            self._refuse(502, f"cannot connect to the destination: {failure.getErrorMessage()}")
        else:
            log.failure("CONNECT policy failed", failure)
            self._refuse(502, "cannot connect to the destination")
        return None

    def _refuse(self, code: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.state = "done"
        self._code = code
        self._outcome = refusal_outcome(code)
        self._reason = reason = " ".join(reason.split())
        if not self._started:
            self._started = self.factory.clock.seconds()
        body = (reason + "\n").encode("utf-8", "replace")
        phrase = _PHRASES.get(code) or RESPONSES.get(code, b"Error")
        lines = [
            b"HTTP/1.1 %d %s" % (code, phrase),
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Length: %d" % (len(body),),
            b"Connection: close",
        ]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.loseConnection()

    # -- the tunnel ---------------------------------------------------------

    def idle_timed_out(self) -> None:
        """
        Close a tunnel in which nothing moved for ``idle_timeout`` seconds.
        """
        self._outcome = "idle_timeout"
        for end in (self._client_end, self._dest_end):
            if end is not None and not end.closed and end.transport is not None:
                end.transport.loseConnection()

    def tunnel_bytes(self) -> tuple[int, int]:
        """
        Bytes so far from the client (up) and from the destination (down).
        """
        up = self._client_end.received if self._client_end is not None else 0
        down = self._dest_end.received if self._dest_end is not None else 0
        return up, down

    def _tunnel_done(self, splice: Splice) -> None:
        if not self._outcome:
            self._outcome = "closed"
        self._code = 200
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            if self._idle is not None:
                self._idle.stop()
            elif self._established is not None:
                self.factory.count_bytes(*self.tunnel_bytes())
            if self._limit_key is not None:
                self.factory.limits.release(self._limit_key)
                self._limit_key = None
            if self._request is None and not self._code:
                return  # nothing was asked or answered
            self.factory.tunnel_closed(self._record(self._outcome), self._established is not None)
        finally:
            # Only once recorded: a drain waiting for this connection may let the
            # audit pipeline stop.
            self.factory.connection_gone(self)

    def _record(self, outcome: str) -> TunnelRecord:
        request = self._request
        up, down = self.tunnel_bytes()
        user_agent = None
        if request is not None:
            values = request.headers.getRawHeaders(b"user-agent")
            if values:
                user_agent = values[0].decode("latin-1")
        return TunnelRecord(
            tunnel_id=self._tunnel_id,
            peer=self._peer,
            client=self._client,
            host=request.host if request is not None else None,
            port=request.port if request is not None else None,
            code=200 if outcome == "open" else self._code,
            outcome=outcome,
            reason=self._reason,
            bytes_up=up,
            bytes_down=down,
            started=self._started,
            established=self._established,
            ended=None if outcome == "open" else self.factory.clock.seconds(),
            user_agent=user_agent,
        )


class _IdleWatch:
    """
    Closes a tunnel once no byte moved either way for ``timeout`` seconds.

    It looks at the byte counts every quarter of the timeout (so a tunnel closes
    between 1 and 1.25 timeouts after its last byte) and adds what moved to the
    byte counters, so long tunnels show in the metrics before they end.
    """

    def __init__(self, protocol: ConnectServerProtocol, timeout: float) -> None:
        self.protocol = protocol
        self.clock = protocol.factory.clock
        self.timeout = timeout
        self.interval = timeout / 4
        self.counted = (0, 0)
        self.last_active = self.clock.seconds()
        self.call: Any = self.clock.callLater(self.interval, self._tick)

    def _count(self) -> bool:
        up, down = self.protocol.tunnel_bytes()
        old_up, old_down = self.counted
        if (up, down) == self.counted:
            return False
        self.protocol.factory.count_bytes(up - old_up, down - old_down)
        self.counted = (up, down)
        return True

    def _tick(self) -> None:
        self.call = None
        now = self.clock.seconds()
        if self._count():
            self.last_active = now
        elif now - self.last_active >= self.timeout * (1 - 1e-9):
            self.protocol.idle_timed_out()
            return
        self.call = self.clock.callLater(self.interval, self._tick)

    def stop(self) -> None:
        """
        Count the last bytes and stop looking.
        """
        self._count()
        call, self.call = self.call, None
        if call is not None and call.active():
            call.cancel()


class ConnectServerFactory(Factory):
    """
    Makes `ConnectServerProtocol`s sharing a policy, a clock, timeouts, limits,
    metrics and the tunnel callbacks.

    ``head_timeout``: how long a client has to send its request head;
    ``idle_timeout``: a tunnel in which nothing moves this long is closed;
    ``open_timeout``: an upper bound on the policy's work (None: the policy's own);
    ``max_connections`` / ``max_connections_per_client``: open requests at once
    (None: unlimited), counted per ``client_key(request)`` (the certificate name,
    else the peer's address); ``identify(transport)``: the `ClientIdentity`.
    ``on_tunnel_opened(record)`` is called when a tunnel is made,
    ``on_tunnel_closed(record)`` once for every request answered (refused or
    tunnelled), when its connection is gone.
    """

    protocol = ConnectServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        policy: IConnectPolicy,
        clock: Any,
        *,
        head_timeout: float = 30.0,
        idle_timeout: float = 3600.0,
        open_timeout: float | None = None,
        max_connections: int | None = None,
        max_connections_per_client: int | None = None,
        client_key: Callable[[ConnectRequest], str] = default_client_key,
        metrics: ConnectMetrics | None = None,
        on_tunnel_opened: Callable[[TunnelRecord], Any] | None = None,
        on_tunnel_closed: Callable[[TunnelRecord], Any] | None = None,
        on_handshake_failed: Callable[[Any, str], Any] | None = None,
        identify: Callable[[Any], ClientIdentity | None] = client_identity,
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_header_lines: int = MAX_HEADER_LINES,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.open_timeout = open_timeout
        self.limits = ConnectionLimits(max_connections, max_connections_per_client)
        self.client_key = client_key
        self.metrics = metrics if metrics is not None else ConnectMetrics.create()
        self.on_tunnel_opened = on_tunnel_opened
        self.on_tunnel_closed = on_tunnel_closed
        self.on_handshake_failed = on_handshake_failed
        self.identify = identify
        self.max_head_bytes = max_head_bytes
        self.max_header_lines = max_header_lines
        # Connections until their request is recorded (or they went without one).
        self.connections: set[ConnectServerProtocol] = set()
        self._drained: Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> ConnectServerProtocol:
        """
        A protocol for a new client connection.
        """
        return ConnectServerProtocol(self)

    def connection_made(self, protocol: ConnectServerProtocol) -> None:
        """
        ``protocol``'s connection is open.
        """
        self.connections.add(protocol)

    def connection_gone(self, protocol: ConnectServerProtocol) -> None:
        """
        ``protocol``'s connection is gone and its request (if any) recorded.
        """
        self.connections.discard(protocol)
        if not self.connections and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        The graceful stop, once the listener no longer accepts: let the open
        connections (tunnels) end by themselves for up to ``timeout`` seconds, then
        close what is left.  Fires once every connection is gone and recorded (so
        the tunnels' closing audit events come before the audit pipeline stops), or
        `DRAIN_CUT_GRACE` seconds after the cut at the latest.
        """
        if not self.connections:
            return succeed(None)
        started = self.clock.seconds()
        log.info(
            "Draining {count} connections for up to {timeout:g}s",
            count=len(self.connections), timeout=timeout,
        )
        drained: Deferred[None] = Deferred()
        self._drained = drained
        timers: list[Any] = []

        def cut() -> None:
            log.warn(
                "Drain deadline ({timeout:g}s): closing {count} connections",
                timeout=timeout, count=len(self.connections),
            )
            for protocol in list(self.connections):
                protocol.transport.abortConnection()
            timers.append(self.clock.callLater(DRAIN_CUT_GRACE, give_up))

        def give_up() -> None:
            if self._drained is drained:
                self._drained = None
                log.warn("{count} connections were still open after the drain", count=len(self.connections))
                drained.callback(None)

        def finished(result: None) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            log.info("Drain finished after {elapsed:.1f}s", elapsed=self.clock.seconds() - started)
            return result

        timers.append(self.clock.callLater(timeout, cut))
        return drained.addCallback(finished)

    def count_bytes(self, up: int, down: int) -> None:
        """
        Add tunnel bytes to the counters.
        """
        if up:
            self.metrics.bytes.labels(direction="up").inc(up)
        if down:
            self.metrics.bytes.labels(direction="down").inc(down)

    def tunnel_opened(self, record: TunnelRecord) -> None:
        """
        A tunnel was made: count it open and tell ``on_tunnel_opened``.
        """
        self.metrics.open_tunnels.inc()
        self._call(self.on_tunnel_opened, record)

    def tunnel_closed(self, record: TunnelRecord, was_open: bool) -> None:
        """
        A request is over: count it and tell ``on_tunnel_closed``.
        """
        self.metrics.tunnels.labels(outcome=record.outcome).inc()
        if was_open:
            self.metrics.open_tunnels.dec()
            if record.established is not None and record.ended is not None:
                self.metrics.duration.observe(record.ended - record.established)
        self._call(self.on_tunnel_closed, record)

    def handshake_failed(self, peer: Any, failure: Failure) -> None:
        """
        A TLS handshake failed: count it and log one line (at info) with the peer.
        """
        self.metrics.handshake_failures.inc()
        text = _tls_error_text(failure)
        if self.on_handshake_failed is not None:
            self._call(self.on_handshake_failed, peer, text)
        else:
            log.info("TLS handshake from {peer} failed: {error}", peer=describe_peer(peer), error=text)

    @staticmethod
    def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.failure("A CONNECT tunnel callback failed")


def describe_client(record: TunnelRecord) -> str:
    """
    ``name (peer)`` for the log: the certificate name (if any) and the peer address.
    """
    peer = describe_peer(record.peer)
    name = record.client.name if record.client is not None else None
    return f"{name} ({peer})" if name else peer


def log_tunnel(record: TunnelRecord, logger: Logger | None = None, what: str = "CONNECT") -> None:
    """
    One log line for a `TunnelRecord`: info for tunnels and client errors, warn when
    the destination could not be reached.
    """
    logger = logger if logger is not None else log
    target = record.target or "(no destination)"
    client = describe_client(record)
    if record.outcome == "open":
        logger.info(
            "{what} {target} from {client}: tunnel open",
            what=what, target=target, client=client, tunnel_id=record.tunnel_id,
        )
    elif record.outcome in ("closed", "idle_timeout"):
        logger.info(
            "{what} {target} from {client}: tunnel {how} after {duration:.3f}s, "
            "{up} bytes up, {down} bytes down",
            what=what, target=target, client=client, duration=record.duration,
            how="closed" if record.outcome == "closed" else "closed when idle",
            up=record.bytes_up, down=record.bytes_down, tunnel_id=record.tunnel_id,
        )
    elif record.outcome == "cancelled":
        logger.info(
            "{what} {target} from {client}: the client went away after {duration:.3f}s, "
            "before the destination answered",
            what=what, target=target, client=client, duration=record.duration,
            tunnel_id=record.tunnel_id,
        )
    else:
        emit = logger.warn if record.code in (502, 504) else logger.info
        emit(
            "{what} {target} from {client} refused with {code}: {reason}",
            what=what, target=target, client=client, code=record.code, reason=record.reason,
            tunnel_id=record.tunnel_id,
        )
