"""
Server and client TLS: contexts from PEM files, certificate reload, listeners.

`ServerTLS` turns ``tls_cert_file`` / ``tls_key_file`` into an OpenSSL context (TLS
1.2 or newer, ALPN ``http/1.1``, intermediates sent) and swaps in a new one when the
files change, so renewed certificates take effect without a restart;
`CertificateReloader` polls it.  `https_policy` is the client side for
``twisted.web.client.Agent`` and treq: verify the server against a CA bundle or the
system roots, present a client certificate for mutual TLS.  `listen_tls` and
`listen_tcp` bind an `Address`, optionally sharing the port between processes with
``SO_REUSEPORT``.

Noise: Twisted logs nothing for TCP health checks that connect and close, for
plain HTTP sent to the TLS port, or for failed handshakes (measured on Twisted 22.4
and 26.10; ``TLSMemoryBIOFactory`` is not noisy and TLS errors only reach the
protocol's ``connectionLost``), so no suppression layer is needed; ``tests.test_tls``
keeps that true.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attr
from attr import define, field
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.abstract import isIPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .config import Address

__all__ = [
    "TLSConfigError",
    "ServerTLS",
    "CertificateReloader",
    "https_policy",
    "listen_tls",
    "listen_tcp",
]

log = Logger()

#: The ALPN protocols the TLS listeners accept: the proxy and the gateway speak HTTP/1.1.
HTTP11 = (b"http/1.1",)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN ((?:[A-Z]+ )?PRIVATE KEY)-----\r?\n.+?\r?\n-----END \1-----", re.DOTALL
)

# How long after a file's modification time its stat() is not trusted to show a
# later change (timestamps are coarse; the "racy git" problem), seconds.
_RACY_SECONDS = 2.0


class TLSConfigError(Exception):
    """
    A certificate, key or CA file that cannot be used; the message names the file.
    """


def _read(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{what} {path}: cannot read: {e.strerror or e}") from e


def _certificates(what: str, path: str, data: bytes) -> list[x509.Certificate]:
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise TLSConfigError(f"{what} {path}: no PEM certificate found")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise TLSConfigError(
                f"{what} {path}: certificate #{number} is not valid PEM: {e}"
            ) from e
    return certificates


def _private_key(what: str, path: str, data: bytes) -> Any:
    match = _PEM_PRIVATE_KEY.search(data)
    if match is None:
        raise TLSConfigError(f"{what} {path}: no PEM private key found")
    if match.group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in match.group(0):
        raise TLSConfigError(f"{what} {path}: the key is encrypted; give it without a passphrase")
    try:
        return serialization.load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"{what} {path}: not a valid private key: {e}") from e


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_pair(
    key: Any,
    chain: Sequence[x509.Certificate],
    key_what: str,
    key_file: str,
    cert_what: str,
    cert_file: str,
) -> None:
    key_der = _public_der(key.public_key())
    if _public_der(chain[0].public_key()) == key_der:
        return
    hint = ""
    for number, certificate in enumerate(chain[1:], 2):
        if _public_der(certificate.public_key()) == key_der:
            hint = f" (it matches certificate #{number}; the server's own certificate must come first)"
    raise TLSConfigError(
        f"{key_what} {key_file} does not match the certificate in {cert_what} {cert_file}{hint}"
    )


def _not_valid_after(certificate: x509.Certificate) -> datetime.datetime:
    # cryptography < 42 has only the naive UTC accessor.
    aware = getattr(certificate, "not_valid_after_utc", None)
    return aware if aware is not None else _utc(certificate.not_valid_after)


def _not_valid_before(certificate: x509.Certificate) -> datetime.datetime:
    aware = getattr(certificate, "not_valid_before_utc", None)
    return aware if aware is not None else _utc(certificate.not_valid_before)


def _utc(when: datetime.datetime) -> datetime.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _to_openssl(certificates: Iterable[x509.Certificate]) -> list[crypto.X509]:
    return [crypto.X509.from_cryptography(c) for c in certificates]


def _stamp(paths: Iterable[str]) -> tuple[Any, ...]:
    """
    What stat() says about each file; any change means "read them again".
    """
    stamps: list[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            stamps.append((path, e.errno))
        else:
            stamps.append(
                (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            )
    return tuple(stamps)


def _is_racy(stamp: tuple[Any, ...], now: float) -> bool:
    """
    Whether a file changed so recently that a further change may not show in stat().
    """
    return any(len(s) == 6 and now - max(s[4], s[5]) / 1e9 < _RACY_SECONDS for s in stamp)


def _alpn_selector(accepted: Sequence[bytes]) -> Any:
    """
    An ALPN select callback: the first of ``accepted`` the client offers, else none.

    Twisted's own callback answers "no overlap" with an empty protocol name, which
    OpenSSL turns into an ``internal_error`` alert (DESIGN §4); this one lets the
    handshake go on without ALPN, as nginx does.
    """

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in accepted:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


@attr.frozen
class _Material:
    """
    One loaded generation of server TLS files and the context built from them.
    """

    context: SSL.Context
    leaf: x509.Certificate
    contents: tuple[bytes, ...]


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
@define(eq=False)
class ServerTLS:
    """
    The server side of TLS, rebuilt from its files when they change.

    ``cert_file`` holds the server certificate followed by any intermediates, all
    PEM; ``key_file`` its unencrypted PEM private key.  With ``client_ca_file``,
    clients must present a certificate that chains to one of its CAs (mutual TLS).
    With ``require_client_certificate=False`` a client may present none, but one it
    does present must still chain to those CAs (as with kube-apiserver); the
    application reads it from the transport's ``getPeerCertificate()``.
    The constructor loads the files and raises `TLSConfigError` when they cannot
    serve.  Each new connection uses the newest context, so a renewed certificate
    serves new connections at once while open ones keep theirs.  Hand it to
    `listen_tls` (or as the context factory to ``TLSMemoryBIOFactory``).
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    require_client_certificate: bool = field(default=True, kw_only=True)
    alpn_protocols: tuple[bytes, ...] = HTTP11
    _material: _Material = field(init=False)
    _stamp: tuple[Any, ...] = field(init=False)
    _racy: bool = field(init=False)
    _failure: tuple[Any, ...] | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._note_stamp()
        self._material = self._build(self._read())
        self._log_loaded("Loaded")

    @classmethod
    def from_files(
        cls,
        cert_file: str,
        key_file: str,
        client_ca_file: str | None = None,
        *,
        require_client_certificate: bool = True,
    ) -> ServerTLS:
        """
        Load the files, raising `TLSConfigError` (naming the file and the problem)
        when one is missing, unreadable or not PEM, or the key does not match.

        With ``client_ca_file``, ``require_client_certificate`` says whether a
        client without a certificate is refused (the default) or let through.
        """
        return cls(
            cert_file,
            key_file,
            client_ca_file,
            require_client_certificate=require_client_certificate,
        )

    @property
    def certificate(self) -> x509.Certificate:
        """
        The server certificate presented to new connections.
        """
        return self._material.leaf

    @property
    def not_valid_after(self) -> datetime.datetime:
        """
        When the server certificate presented to new connections expires (UTC).
        """
        return _not_valid_after(self._material.leaf)

    def getContext(self) -> SSL.Context:
        """
        The current OpenSSL context (``IOpenSSLContextFactory``).
        """
        return self._material.context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new connection on the current context (``IOpenSSLServerConnectionCreator``).
        """
        connection = SSL.Connection(self._material.context, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def reload_if_changed(self) -> bool:
        """
        Re-read the files if stat() shows a change; True when a new context is in use.

        Files that do not load are logged as one error line (once per change) and
        the current context stays in use.
        """
        stamp = _stamp(self._paths())
        if stamp == self._stamp and not self._racy:
            return False
        self._note_stamp(stamp)
        return self._reload(force=False)

    def reload(self) -> bool:
        """
        Re-read the files now (for SIGHUP); True when a new context is in use.
        """
        self._note_stamp()
        return self._reload(force=True)

    def _paths(self) -> list[str]:
        paths = [self.cert_file, self.key_file]
        if self.client_ca_file:
            paths.append(self.client_ca_file)
        return paths

    def _note_stamp(self, stamp: tuple[Any, ...] | None = None) -> None:
        self._stamp = _stamp(self._paths()) if stamp is None else stamp
        self._racy = _is_racy(self._stamp, time.time())

    def _read(self) -> tuple[bytes, ...]:
        contents = [
            _read("tls_cert_file", self.cert_file),
            _read("tls_key_file", self.key_file),
        ]
        if self.client_ca_file:
            contents.append(_read("client_ca_file", self.client_ca_file))
        return tuple(contents)

    def _reload(self, force: bool) -> bool:
        contents: tuple[bytes, ...] | None = None
        try:
            contents = self._read()
            if not force and contents == self._material.contents:
                self._failure = None
                return False
            material = self._build(contents)
        except TLSConfigError as e:
            failure = (contents, str(e))
            if force or failure != self._failure:
                log.error("Keeping the current TLS certificate: {problem}", problem=str(e))
            self._failure = failure
            return False
        self._failure = None
        self._material = material
        self._log_loaded("Reloaded")
        return True

    def _build(self, contents: tuple[bytes, ...]) -> _Material:
        chain = _certificates("tls_cert_file", self.cert_file, contents[0])
        key = _private_key("tls_key_file", self.key_file, contents[1])
        _check_pair(key, chain, "tls_key_file", self.key_file, "tls_cert_file", self.cert_file)
        options: dict[str, Any] = {}
        if self.client_ca_file:
            cas = _certificates("client_ca_file", self.client_ca_file, contents[2])
            options.update(
                verify=True,
                requireCertificate=self.require_client_certificate,
                caCerts=_to_openssl(cas),
            )
        openssl_chain = _to_openssl(chain)
        try:
            context = ssl.CertificateOptions(
                privateKey=crypto.PKey.from_cryptography_key(key),
                certificate=openssl_chain[0],
                extraCertChain=openssl_chain[1:],
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
                acceptableProtocols=list(self.alpn_protocols),
                **options,
            ).getContext()
        except (SSL.Error, ValueError, TypeError) as e:
            raise TLSConfigError(
                f"tls_cert_file {self.cert_file} / tls_key_file {self.key_file}: "
                f"OpenSSL refused them: {e}"
            ) from e
        context.set_alpn_select_callback(_alpn_selector(self.alpn_protocols))
        return _Material(context=context, leaf=chain[0], contents=contents)

    def _log_loaded(self, verb: str) -> None:
        leaf = self._material.leaf
        not_after = _not_valid_after(leaf)
        now = datetime.datetime.now(datetime.UTC)
        log.info(
            "{verb} TLS certificate {subject} (valid until {not_after}) from {cert_file}",
            verb=verb,
            subject=leaf.subject.rfc4514_string(),
            not_after=not_after.isoformat(),
            cert_file=self.cert_file,
        )
        if not_after < now or _not_valid_before(leaf) > now:
            log.warn(
                "TLS certificate {subject} in {cert_file} is not valid now "
                "(valid {not_before} to {not_after})",
                subject=leaf.subject.rfc4514_string(),
                cert_file=self.cert_file,
                not_before=_not_valid_before(leaf).isoformat(),
                not_after=not_after.isoformat(),
            )


@define(eq=False)
class CertificateReloader(Service):
    """
    A service that calls ``reload_if_changed`` on a `ServerTLS` every ``interval``
    seconds on ``clock``, and never stops for an error.
    """

    server_tls: ServerTLS
    clock: IReactorTime
    interval: float = 5.0
    _loop: LoopingCall | None = field(init=False, default=None)

    def startService(self) -> None:
        """
        Start polling; the first check is one interval from now.
        """
        Service.startService(self)
        loop = LoopingCall(self._check)
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("TLS certificate reloader stopped", f)
        )

    def stopService(self) -> Any:
        """
        Stop polling.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return Service.stopService(self)

    def _check(self) -> None:
        try:
            self.server_tls.reload_if_changed()
        except Exception:
            log.failure("Checking the TLS certificate files for {cert_file} failed",
                        cert_file=self.server_tls.cert_file)


def _trust_root(ca_file: str | None) -> Any:
    if not ca_file:
        return ssl.platformTrust()
    cas = _certificates("ca_file", ca_file, _read("ca_file", ca_file))
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(c) for c in _to_openssl(cas)]
    )


@implementer(IPolicyForHTTPS)
@define(eq=False)
class _HTTPSPolicy:
    """
    Verify servers against a fixed trust root and optionally present a client
    certificate; one connection creator per host and port, made once.
    """

    trust_root: Any
    client_options: dict[str, Any]
    _creators: dict[tuple[str, int], IOpenSSLClientConnectionCreator] = field(
        init=False, factory=dict
    )

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """
        A client connection creator that checks the server's name (DNS name or IP
        address) against its certificate.
        """
        host = hostname.decode("ascii").strip("[]")
        key = (host, port)
        creator = self._creators.get(key)
        if creator is None:
            if len(self._creators) >= 64:
                self._creators.clear()
            creator = ssl.optionsForClientTLS(
                host,
                trustRoot=self.trust_root,
                extraCertificateOptions=dict(self.client_options),
            )
            self._creators[key] = creator
        return creator


def https_policy(
    ca_file: str | None = None,
    client_cert_file: str | None = None,
    client_key_file: str | None = None,
) -> IPolicyForHTTPS:
    """
    A TLS policy for ``twisted.web.client.Agent`` / treq.

    The server's certificate must chain to a CA in ``ca_file`` (a PEM bundle) or,
    when it is None, to the system roots, and must name the URL's host (a DNS name
    or an IP address).  With ``client_cert_file`` (certificate then any
    intermediates) and ``client_key_file`` (may be the same file) the client
    presents that certificate.  TLS 1.2 or newer.  Unusable files raise
    `TLSConfigError` naming the file.
    """
    trust_root = _trust_root(ca_file)
    options: dict[str, Any] = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
    if bool(client_cert_file) != bool(client_key_file):
        given, missing = (
            ("client_cert_file", "client_key_file")
            if client_cert_file
            else ("client_key_file", "client_cert_file")
        )
        raise TLSConfigError(f"{given} is set but {missing} is not; give both or neither")
    if client_cert_file and client_key_file:
        chain = _certificates(
            "client_cert_file", client_cert_file, _read("client_cert_file", client_cert_file)
        )
        key = _private_key(
            "client_key_file", client_key_file, _read("client_key_file", client_key_file)
        )
        _check_pair(
            key, chain, "client_key_file", client_key_file, "client_cert_file", client_cert_file
        )
        openssl_chain = _to_openssl(chain)
        options.update(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=openssl_chain[0],
            extraCertChain=openssl_chain[1:],
        )
    return _HTTPSPolicy(trust_root, options)


#: Bytes an accepted connection reads at a time, and holds unsent before it pauses
#: whatever produces them (Twisted's default is 64 KiB).  One 64 KiB read from the
#: apiserver becomes a little more than 64 KiB of TLS records for the client, so
#: with the default every read paused and resumed the upstream connection (two
#: ``epoll_ctl`` calls and a reactor turn per 64 KiB); a 20 MB list cost about 10 %
#: less CPU with 256 KiB.  Backpressure still holds, at this bound.
CLIENT_BUFFER_SIZE = 256 * 1024


class _ServerTLSProtocol(TLSMemoryBIOFactory.protocol):  # type: ignore[misc, name-defined]
    """
    The TLS protocol of an accepted connection: ``TCP_NODELAY`` and a larger buffer
    (`CLIENT_BUFFER_SIZE`) on its socket, and its local address looked up once.

    ``TCP_NODELAY``: newer Twisted (26.10) sets it from ``HTTPChannel``; Twisted
    22.4 (Debian bookworm's) does not, and tunnels (exec, CONNECT) carry keystrokes.
    ``twisted.web`` asks for the local address of every request (a
    ``getsockname`` call each time); an accepted socket's never changes.
    """

    _local_address: Any = None

    def makeConnection(self, transport: Any) -> None:
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
            transport.bufferSize = CLIENT_BUFFER_SIZE
        super().makeConnection(transport)

    def getHost(self) -> Any:
        if self._local_address is None:
            self._local_address = super().getHost()
        return self._local_address


class _ServerTLSFactory(TLSMemoryBIOFactory):
    """
    ``TLSMemoryBIOFactory`` that leaves ALPN to `ServerTLS` (and makes
    `_ServerTLSProtocol` connections).

    Older Twisted (22.4, Debian bookworm's) copies the wrapped factory's ALPN list
    onto the shared context on every connection, replacing `ServerTLS`'s callback
    with one that answers ``internal_error`` when nothing overlaps (and a ``Site``
    offers ``h2`` when the h2 package is installed); the proxy and gateway speak
    HTTP/1.1 only, so that step is skipped.  Newer Twisted has no such method.
    """

    protocol = _ServerTLSProtocol

    def _applyProtocolNegotiation(self, connection: Any) -> None:
        return None


def _interface(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _reuse_port_socket(address: Address, backlog: int) -> socket.socket:
    if not hasattr(socket, "SO_REUSEPORT"):
        raise CannotListenError(
            _interface(address.host), address.port, OSError("SO_REUSEPORT is not available here")
        )
    family = socket.AF_INET6 if isIPv6Address(address.host) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError(_interface(address.host), address.port, e) from e
    return sock


#: Connections the kernel queues before they are accepted (it caps this at
#: ``net.core.somaxconn``).  Twisted's default, 50, and the former 128 overflowed
#: when a thousand watch clients reconnected at once (after a restart or a drain):
#: the kernel dropped SYNs and clients waited for their retransmission.
LISTEN_BACKLOG = 1024


def listen_tcp(
    reactor: Any,
    address: Address,
    factory: IProtocolFactory,
    reuse_port: bool = False,
    backlog: int = LISTEN_BACKLOG,
) -> IListeningPort:
    """
    Listen for TCP on ``address`` (IPv4 or IPv6 literal).

    With ``reuse_port`` the socket is made here with ``SO_REUSEPORT`` and adopted
    by the reactor, so that several processes can share the port.  A failed bind
    raises ``CannotListenError`` whose message names the address.
    """
    if not reuse_port:
        try:
            return IReactorTCP(reactor).listenTCP(
                address.port, factory, backlog=backlog, interface=address.host
            )
        except CannotListenError as e:
            raise CannotListenError(_interface(address.host), address.port, e.socketError) from e
    sock = _reuse_port_socket(address, backlog)
    try:
        return IReactorSocket(reactor).adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        # The reactor has its own duplicate of the descriptor.
        sock.close()


def listen_tls(
    reactor: Any,
    address: Address,
    factory: IProtocolFactory,
    server_tls: ServerTLS,
    reuse_port: bool = False,
    backlog: int = LISTEN_BACKLOG,
) -> IListeningPort:
    """
    Listen for TLS on ``address``, serving ``factory``'s protocol inside TLS from
    ``server_tls`` (whose current certificate each new connection gets).
    """
    tls_factory = _ServerTLSFactory(server_tls, False, factory)
    return listen_tcp(reactor, address, tls_factory, reuse_port=reuse_port, backlog=backlog)
