"""
The upstream client: the real kube-apiserver, reached with the proxy's own credential.

The data path uses Twisted's ``Agent`` directly, not treq: treq's ``HTTPClient``
always wraps its agent in a ``CookieAgent`` and a ``ContentDecoderAgent`` (DESIGN §7),
which would share cookies between users, add ``Accept-Encoding: gzip`` and silently
decode bodies.  A transparent proxy must do none of that.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit
from typing import Any

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import client
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse

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
        agent = Agent(
            reactor, contextFactory=policy, connectTimeout=config.connect_timeout, pool=pool
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
    ) -> Deferred[IResponse]:
        """
        Send one request upstream with the proxy's credential and an ``Audit-ID``.

        ``headers`` are already filtered by the header policy; this adds
        ``Authorization`` (bearer-token credential, unless ``credential`` is false
        because the caller's own token is passed through) and ``Audit-ID`` only.
        """
        headers = headers.copy()
        if credential:
            for name, values in self.credential_headers().items():
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(
            b"Audit-ID", [(audit_id or str(uuid.uuid4())).encode("ascii")]
        )
        return self.agent.request(method, self.base_url + path_and_query, headers, body)

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
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.internet.protocol import Factory

        host, port = self.netloc
        assert self.policy is not None and self.reactor is not None
        creator = self.policy.creatorForNetloc(host.encode("idna"), port)
        endpoint = wrapClientTLS(
            creator, HostnameEndpoint(self.reactor, host, port, timeout=self.config.connect_timeout)
        )
        return endpoint.connect(Factory.forProtocol(lambda: protocol))

    def close(self) -> Deferred[None]:
        """
        Close idle persistent connections.
        """
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()
