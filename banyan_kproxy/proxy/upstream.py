"""
The upstream client: the real kube-apiserver, reached with the proxy's own credential.

The data path uses Twisted's ``Agent`` directly, not treq: treq's ``HTTPClient``
always wraps its agent in a ``CookieAgent`` and a ``ContentDecoderAgent`` (DESIGN §7),
which would share cookies between users, add ``Accept-Encoding: gzip`` and silently
decode bodies.  A transparent proxy must do none of that.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import uuid
from urllib.parse import urlsplit
from typing import Any

import attr
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web import client
from twisted.web.client import Agent, HTTPConnectionPool, URI
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from banyan_kproxy.config import UpstreamConfig


class _QuietClientFactory(client._HTTP11ClientFactory):  # type: ignore[name-defined, misc]
    """
    The pool's connection factory without its "Starting factory" log line per
    upstream connection.
    """

    noisy = False


def quiet_pool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """
    An ``HTTPConnectionPool`` that does not log every connection it opens.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    return pool


@implementer(IStreamClientEndpoint)
@attr.s(auto_attribs=True)
class _NoDelayEndpoint:
    """
    A TCP endpoint whose connections send small writes at once (``TCP_NODELAY``).

    Newer Twisted (26.10) sets it from the HTTP client protocol; Twisted 22.4
    (Debian bookworm's) does not, and tunnels to the apiserver (exec, port-forward)
    carry keystrokes.
    """

    wrapped: Any

    def connect(self, factory: Any) -> Deferred[Any]:
        """
        Connect, then switch Nagle's algorithm off on the TCP transport.
        """

        def no_delay(protocol: Any) -> Any:
            transport = getattr(protocol, "transport", None)
            if transport is not None and hasattr(transport, "setTcpNoDelay"):
                transport.setTcpNoDelay(True)
            return protocol

        return self.wrapped.connect(factory).addCallback(no_delay)


@implementer(IAgentEndpointFactory)
@attr.s(auto_attribs=True)
class ApiserverEndpoints:
    """
    The endpoints the upstream ``Agent`` connects with: one per scheme, host and
    port, made once.

    ``Agent``'s own factory builds a new ``HostnameEndpoint`` for every request,
    IDNA-encoding the host name each time; profiling the proxy under load put about
    12 % of the HTTP client's CPU time there.  Endpoints are reusable (each
    ``connect`` is independent), so they are kept.
    """

    reactor: Any
    policy: IPolicyForHTTPS
    connect_timeout: float | None = None
    _endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = attr.ib(
        factory=dict, init=False
    )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """
        TLS (``https``) or plain TCP (``http``) to ``uri``'s host and port.
        """
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self.endpoint(uri.scheme, uri.host, uri.port)
            if len(self._endpoints) >= 64:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint

    def endpoint(self, scheme: bytes, host: bytes, port: int) -> IStreamClientEndpoint:
        """
        A new endpoint for ``scheme://host:port``.
        """
        from twisted.internet.abstract import isIPAddress, isIPv6Address
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

        name = host.decode("ascii")
        # An address needs no resolution, and HostnameEndpoint would take its attempt
        # delay (0.3 s) to give up on a refused connection: a fast 503 when the
        # apiserver is down.
        raw: Any
        if isIPAddress(name):
            raw = TCP4ClientEndpoint(self.reactor, name, port, timeout=self.connect_timeout or 30)
        elif isIPv6Address(name):
            raw = TCP6ClientEndpoint(self.reactor, name, port, timeout=self.connect_timeout or 30)
        else:
            raw = HostnameEndpoint(self.reactor, name, port, timeout=self.connect_timeout)
        tcp = _NoDelayEndpoint(raw)
        if scheme == b"http":
            return tcp
        if scheme != b"https":
            raise SchemeNotSupported(f"Unsupported scheme: {scheme!r}")
        return wrapClientTLS(self.policy.creatorForNetloc(host, port), tcp)


#: What Twisted's HTTP client accepts in a request URL (``_newclient._VALID_URI``).
_VALID_URL = re.compile(rb"\A[\x21-\x7e]+\Z")


def _host_value(url: URI) -> bytes:
    """
    The ``Host`` header for ``url`` as ``Agent`` computes it (no default port).
    """
    host = url.host
    if isIPv6Address(host.decode("ascii")):
        host = b"[" + host + b"]"
    if (url.scheme, url.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, url.port)


#: The parameters of ``Agent._requestWithEndpoint`` (Twisted 22.4 to 26.10) that
#: `ApiserverAgent` calls it with.
_REQUEST_WITH_ENDPOINT = (
    "self", "key", "endpoint", "method", "parsedURI", "headers", "bodyProducer", "requestPath",
)


def _fast_path_available() -> bool:
    """
    Whether this Twisted's ``Agent`` has the private method `ApiserverAgent` uses,
    with the parameters it passes; if not, every request takes ``Agent.request``.
    """
    method = getattr(Agent, "_requestWithEndpoint", None)
    if method is None:
        return False
    try:
        names = tuple(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return False
    return names == _REQUEST_WITH_ENDPOINT


class ApiserverAgent(Agent):
    """
    Twisted's ``Agent``, with a shorter path for requests to the one server it is
    made for.

    ``Agent.request`` parses every URL it is given (``urlparse`` and ``urlunparse``
    through a deprecation proxy): profiling put about 4 % of the proxy's CPU time
    per request there.  For a URL under `server_url` this agent takes the scheme,
    host and port parsed once and sends the rest as the request target; it checks
    the URL as ``Agent`` does, and adds the ``Host`` header ``Agent`` would add to
    the headers it is given instead of to a copy of them (`Upstream.request` hands
    it headers made for the one request).  Other URLs (and those with a fragment,
    which ``Agent`` drops) take ``Agent``'s own path, as do all URLs when
    ``Agent._requestWithEndpoint``, the private method this relies on, is not as
    in Twisted 22.4 to 26.10.  Make it with `ApiserverAgent.for_server`.
    """

    _server: tuple[bytes, Any, tuple[bytes, bytes, int], Any, bytes] | None = None

    @classmethod
    def for_server(
        cls, reactor: Any, endpoints: IAgentEndpointFactory, pool: HTTPConnectionPool, server_url: bytes
    ) -> ApiserverAgent:
        """
        An agent connecting with ``endpoints`` through ``pool``, fast for
        ``server_url`` (``scheme://host[:port]``; any path is ignored).
        """
        agent = cls.usingEndpointFactory(reactor, endpoints, pool)
        if not _fast_path_available():
            return agent
        parsed = URI.fromBytes(server_url)
        origin = parsed.scheme + b"://" + parsed.netloc
        root = URI(parsed.scheme, parsed.netloc, parsed.host, parsed.port, b"/", b"", b"", b"")
        agent._server = (
            origin,
            root,
            (parsed.scheme, parsed.host, parsed.port),
            endpoints.endpointForURI(root),
            _host_value(parsed),
        )
        return agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        ``Agent.request``, without parsing ``uri`` again when it is on the server.
        """
        server = self._server
        if server is not None:
            origin, root, key, endpoint, host = server
            target = uri[len(origin):]
            if (
                uri.startswith(origin)
                and target.startswith(b"/")
                and b"#" not in target
                and _VALID_URL.match(uri)
            ):
                if headers is None:
                    headers = Headers()
                if not headers.hasHeader(b"host"):
                    headers.setRawHeaders(b"Host", [host])
                parsed = URI(root.scheme, root.netloc, root.host, root.port, target, b"", b"", b"")
                return self._requestWithEndpoint(
                    key, endpoint, method, parsed, headers, bodyProducer, target
                )
        return super().request(method, uri, headers, bodyProducer)


class CredentialError(Exception):
    """
    The proxy's own credential for the apiserver cannot be read.
    """


@attr.s(auto_attribs=True)
class TokenFile:
    """
    A bearer token kept in a file and re-read when the file changes.

    Projected service-account tokens are rotated by the kubelet, which replaces the
    file; the change is noticed within ``check_interval`` seconds.  A file that
    becomes empty or unreadable keeps the last good token and is logged.
    """

    path: str
    clock: IReactorTime
    check_interval: float = 1.0
    _token: bytes | None = None
    _stamp: tuple[int, int, float] | None = None
    _checked_at: float | None = None
    log = Logger()

    def load(self) -> None:
        """
        Read the token now; raise L{CredentialError} if there is none.
        """
        self._reload(raise_errors=True)

    def current(self) -> bytes:
        """
        The token, re-read when the file changed since the last look.
        """
        now = self.clock.seconds()
        if self._checked_at is None or now - self._checked_at >= self.check_interval:
            self._checked_at = now
            self._reload(raise_errors=self._token is None)
        if self._token is None:
            raise CredentialError(f"no token in {self.path}")
        return self._token

    def _reload(self, raise_errors: bool) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime)
            if stamp == self._stamp:
                return
            with open(self.path, "rb") as f:
                token = f.read().strip()
            if not token or b"\n" in token or b"\r" in token:
                raise CredentialError(f"{self.path} does not hold a single token")
        except (OSError, CredentialError) as e:
            if raise_errors:
                raise CredentialError(f"cannot read the upstream token: {e}") from None
            self.log.error(
                "Keeping the previous upstream token: {path} could not be re-read: {error}",
                path=self.path,
                error=str(e),
            )
            return
        if self._token is not None:
            self.log.info("Upstream token re-read from {path}", path=self.path)
        self._token = token
        self._stamp = stamp


@attr.s(auto_attribs=True)
class Upstream:
    """
    The kube-apiserver the proxy forwards to.
    """

    config: UpstreamConfig
    agent: Any  # IAgent
    token: TokenFile | None
    pool: HTTPConnectionPool | None = None
    reactor: Any = None
    policy: IPolicyForHTTPS | None = None

    @classmethod
    def from_config(
        cls, config: UpstreamConfig, reactor: Any, policy: IPolicyForHTTPS
    ) -> Upstream:
        """
        An upstream with a persistent connection pool at least as large as the
        concurrency it is configured for (DESIGN §7: a small pool doubled p99).
        """
        pool = quiet_pool(reactor)
        pool.maxPersistentPerHost = config.max_connections
        pool.retryAutomatically = True
        agent = ApiserverAgent.for_server(
            reactor,
            ApiserverEndpoints(reactor, policy, config.connect_timeout),
            pool,
            config.server.encode("ascii"),
        )
        token = None
        if config.token_file:
            token = TokenFile(config.token_file, reactor)
            token.load()
        return cls(config, agent, token, pool, reactor, policy)

    @property
    def base_url(self) -> bytes:
        """
        The server URL without a trailing slash.
        """
        return self.config.server.rstrip("/").encode("ascii")

    def request(
        self,
        method: bytes,
        path_and_query: bytes,
        headers: Headers,
        body: IBodyProducer | None = None,
        audit_id: str | None = None,
        credential: bool = True,
        reuse_headers: bool = False,
    ) -> Deferred[IResponse]:
        """
        Send one request upstream with the proxy's credential and an ``Audit-ID``.

        ``headers`` are already filtered by the header policy; this adds
        ``Authorization`` (bearer-token credential, unless ``credential`` is false
        because the caller's own token is passed through), ``Audit-ID`` and
        ``Host`` only: to a copy of ``headers``, or with ``reuse_headers`` (the
        caller built them for this one request) to ``headers`` themselves.
        """
        if not reuse_headers:
            headers = headers.copy()
        if credential:
            for name, values in self.credential_headers().items():
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(
            b"Audit-ID", [(audit_id or str(uuid.uuid4())).encode("ascii")]
        )
        return self.agent.request(method, self._base_url + path_and_query, headers, body)

    @functools.cached_property
    def _base_url(self) -> bytes:
        return self.base_url

    @property
    def netloc(self) -> tuple[str, int]:
        """
        The apiserver's host and port.
        """
        url = urlsplit(self.config.server)
        return url.hostname or "", url.port or 443

    @property
    def host_header(self) -> bytes:
        """
        The ``Host`` header value for the apiserver.
        """
        return urlsplit(self.config.server).netloc.encode("ascii")

    def credential_headers(self) -> dict[bytes, list[bytes]]:
        """
        The proxy's own credential as request headers (none for a client certificate).
        """
        if self.token is None:
            return {}
        return {b"Authorization": [b"Bearer " + self.token.current()]}

    def connect(self, protocol: Any) -> Deferred[Any]:
        """
        Open a raw TLS connection to the apiserver speaking ``protocol`` (for
        upgrades, which Twisted's HTTP client cannot carry).
        """
        from twisted.internet.protocol import Factory

        host, port = self.netloc
        assert self.policy is not None and self.reactor is not None
        endpoint = ApiserverEndpoints(self.reactor, self.policy, self.config.connect_timeout).endpoint(
            b"https", host.encode("idna"), port
        )
        return endpoint.connect(Factory.forProtocol(lambda: protocol))

    def close(self) -> Deferred[None]:
        """
        Close idle persistent connections.
        """
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()
