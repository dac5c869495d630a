"""
Where audit events go: sinks behind one `IAuditSink` interface.

- `WebhookSink`: POSTs ``EventList`` JSON to a target described by a
  kubeconfig-format file, as kube-apiserver's ``--audit-webhook-config-file``.
- `LogFileSink`: appends one ``Event`` JSON per line to a file, reopened on
  request (SIGHUP) so logrotate can move it away.
- `BanyanSink`: the Banyan REST API: a refresh token exchanged for an access token,
  then batches tagged with the service name.

A sink's ``send`` fires once the receiver has the events (a 2xx answer; for the
log file, written and fsync'd) and fails otherwise; the pump retries.  Sinks never
log credentials: errors name the URL and the status only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attr
import treq
import yaml
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived
from zope.interface import Attribute, Interface, implementer

from banyan_kproxy.audit.backend import SinkRejected
from banyan_kproxy.audit.errors import AuditConfigError
from banyan_kproxy.audit.event import event_list
from banyan_kproxy.config import BanyanConfig

__all__ = [
    "IAuditSink",
    "WebhookSink",
    "WebhookTarget",
    "LogFileSink",
    "BanyanSink",
    "load_webhook_target",
    "banyan_body",
]

#: Longest wait for a receiver's answer to one batch.
REQUEST_TIMEOUT = 30.0
#: How much of an error answer's body goes into the log line.
_SNIPPET = 200


class IAuditSink(Interface):
    """
    A destination for audit events.
    """

    name = Attribute("Short fixed name: the metric label and the spool's .ack file name.")

    def send(events):
        """
        Deliver ``events`` (a sequence of encoded ``Event`` JSON bytes, in order).

        :return: a ``Deferred`` that fires once the receiver has them all, or fails
            (they are then sent again).
        """

    def reopen():
        """
        Reopen files (after logrotate moved them); nothing for network sinks.
        """

    def close():
        """
        Release files and connections; may return a ``Deferred``.
        """


def _snippet(body: bytes) -> str:
    text = body[:_SNIPPET].decode("utf-8", "replace")
    return " ".join(text.split())


async def _post(http: Any, clock: Any, url: str, body: bytes, headers: dict[bytes, list[bytes]]) -> tuple[int, bytes]:
    """
    POST and read the whole (small) answer, within `REQUEST_TIMEOUT`.

    A pooled connection the receiver closed while idle fails before any answer
    (``RequestTransmissionFailed`` / ``ResponseNeverReceived``); that is tried once
    more at once on a new connection rather than waiting out a backoff.  (A repeat
    is harmless: delivery is at least once.)
    """
    for attempt in (1, 2):
        d = http.post(url, data=body, headers=headers)
        d.addTimeout(REQUEST_TIMEOUT, clock)
        try:
            response = await d
        except (RequestTransmissionFailed, ResponseNeverReceived):
            if attempt == 2:
                raise
            continue
        break
    content = treq.content(response)
    content.addTimeout(REQUEST_TIMEOUT, clock)
    return response.code, await content


def _check(url: str, code: int, body: bytes) -> None:
    if 200 <= code < 300:
        return
    raise SinkRejected(f"{url} answered {code}: {_snippet(body)}", code=code, too_large=code == 413)


# -- webhook -------------------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class WebhookTarget:
    """
    The receiver a kubeconfig-format file describes.

    ``tls`` is the ``IPolicyForHTTPS`` for an ``https`` server (None for ``http``).
    ``token_file`` is re-read when it changes, as client-go does.
    """

    server: str
    source: str
    tls: Any = None
    token: str | None = None
    token_file: str | None = None
    username: str | None = None
    password: str | None = None


def _pick(entries: Any, name: str, kind: str, source: str) -> dict[str, Any]:
    if not isinstance(entries, list):
        raise AuditConfigError(f"{source}: {kind}s must be a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(kind)
            if not isinstance(value, dict):
                raise AuditConfigError(f"{source}: {kind} {name!r} has no {kind} mapping")
            return value
    raise AuditConfigError(f"{source}: no {kind} named {name!r}")


def _select(doc: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The cluster and user of the current context (or of the only context, or the
    only cluster and user), as client-go picks them for a webhook.
    """
    contexts = doc.get("contexts") or []
    current = doc.get("current-context")
    if not current and isinstance(contexts, list) and len(contexts) == 1:
        current = (contexts[0] or {}).get("name")
    if current:
        context = _pick(contexts, current, "context", source)
        cluster = _pick(doc.get("clusters") or [], context.get("cluster"), "cluster", source)
        user_name = context.get("user")
        user = _pick(doc.get("users") or [], user_name, "user", source) if user_name else {}
        return cluster, user
    clusters = doc.get("clusters") or []
    users = doc.get("users") or []
    if isinstance(clusters, list) and len(clusters) == 1 and isinstance(users, list) and len(users) <= 1:
        cluster = (clusters[0] or {}).get("cluster")
        user = ((users[0] or {}).get("user") if users else {}) or {}
        if isinstance(cluster, dict) and isinstance(user, dict):
            return cluster, user
    raise AuditConfigError(f"{source}: no current-context, and not exactly one cluster to use")


def _material(
    entry: dict[str, Any], key: str, base: str, scratch: str, source: str
) -> str | None:
    """
    A PEM file path from ``key`` (relative to the kubeconfig) or ``key-data``
    (base64, written to a private scratch file).
    """
    path = entry.get(key)
    data = entry.get(f"{key}-data")
    if path and data:
        raise AuditConfigError(f"{source}: give {key} or {key}-data, not both")
    if path:
        path = os.path.expanduser(str(path))
        return path if os.path.isabs(path) else os.path.join(base, path)
    if data:
        try:
            raw = base64.b64decode(str(data), validate=True)
        except ValueError:
            raise AuditConfigError(f"{source}: {key}-data is not base64") from None
        target = os.path.join(scratch, key)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return target
    return None


def load_webhook_target(path: str) -> WebhookTarget:
    """
    Read a kubeconfig-format webhook file: ``server``, ``certificate-authority``
    (or ``-data``), and a client certificate (``client-certificate``/``client-key``
    or ``-data``), a ``token``/``tokenFile``, or ``username``/``password``.

    @raise AuditConfigError: naming the file and what is wrong with it.
    """
    from banyan_kproxy.tls import TLSConfigError, https_policy

    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise AuditConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise AuditConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise AuditConfigError(f"{path}: not a kubeconfig (expected a mapping with clusters)")
    cluster, user = _select(doc, path)
    server = cluster.get("server")
    if not isinstance(server, str) or urlsplit(server).scheme not in ("http", "https") or not urlsplit(server).hostname:
        raise AuditConfigError(f"{path}: cluster server {server!r} is not an http(s):// URL")
    for unsupported in ("insecure-skip-tls-verify", "proxy-url", "tls-server-name"):
        if cluster.get(unsupported):
            raise AuditConfigError(f"{path}: cluster {unsupported} is not supported")
    for unsupported in ("exec", "auth-provider", "as", "as-groups"):
        if user.get(unsupported):
            raise AuditConfigError(f"{path}: user {unsupported} is not supported for the audit webhook")
    base = os.path.dirname(os.path.abspath(path))
    scratch = tempfile.mkdtemp(prefix="banyan-kproxy-webhook-")
    try:
        ca = _material(cluster, "certificate-authority", base, scratch, path)
        cert = _material(user, "client-certificate", base, scratch, path)
        key = _material(user, "client-key", base, scratch, path)
        tls = None
        if urlsplit(server).scheme == "https":
            try:
                tls = https_policy(ca, cert, key)
            except TLSConfigError as e:
                raise AuditConfigError(f"{path}: {e}") from None
        elif cert or key:
            raise AuditConfigError(f"{path}: a client certificate needs an https:// server")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    token_file = user.get("tokenFile")
    if token_file:
        token_file = os.path.join(base, os.path.expanduser(str(token_file)))
        if not os.path.isfile(token_file):
            raise AuditConfigError(f"{path}: tokenFile {token_file} does not exist")
    return WebhookTarget(
        server=server,
        source=path,
        tls=tls,
        token=str(user["token"]) if user.get("token") else None,
        token_file=token_file or None,
        username=str(user["username"]) if user.get("username") else None,
        password=str(user["password"]) if user.get("password") else None,
    )


@implementer(IAuditSink)
@attr.s(auto_attribs=True, eq=False)
class WebhookSink:
    """
    POSTs ``audit.k8s.io/v1`` ``EventList`` batches to a webhook receiver.
    """

    target: WebhookTarget
    http: Any  # a treq HTTPClient (or StubTreq)
    clock: Any
    name: str = "webhook"
    _token_file: Any = None
    log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.target.token_file:
            from banyan_kproxy.proxy.upstream import TokenFile

            self._token_file = TokenFile(self.target.token_file, self.clock)

    def _headers(self) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]}
        if self._token_file is not None:
            headers[b"Authorization"] = [b"Bearer " + self._token_file.current()]
        elif self.target.token:
            headers[b"Authorization"] = [b"Bearer " + self.target.token.encode("utf-8")]
        elif self.target.username is not None:
            pair = f"{self.target.username}:{self.target.password or ''}".encode()
            headers[b"Authorization"] = [b"Basic " + base64.b64encode(pair)]
        return headers

    def send(self, events: Sequence[bytes]) -> Deferred[None]:
        """
        POST one ``EventList``; a 2xx answer acknowledges it.
        """
        return Deferred.fromCoroutine(self._send(event_list(events)))

    async def _send(self, body: bytes) -> None:
        code, answer = await _post(self.http, self.clock, self.target.server, body, self._headers())
        _check(self.target.server, code, answer)

    def reopen(self) -> None:
        """
        Nothing to reopen.
        """

    def close(self) -> None:
        """
        Nothing to close (the connection pool goes with the reactor).
        """


# -- Banyan REST API -------------------------------------------------------------------


def banyan_body(service_name: str, events: Sequence[bytes]) -> bytes:
    """
    The Banyan events request: ``{"service_name": ..., "event_list": EventList}``.
    """
    return (
        b'{"service_name":'
        + json.dumps(service_name).encode("ascii")
        + b',"event_list":'
        + event_list(events)
        + b"}"
    )


@implementer(IAuditSink)
@attr.s(auto_attribs=True, eq=False)
class BanyanSink:
    """
    Sends batches to the Banyan REST API at ``restapi_url``.

    The refresh token in ``refresh_token_file`` (read at every exchange, so it can
    be rotated) is exchanged with ``POST /api/v1/refresh_token`` and
    ``Authorization: Bearer <refresh token>`` for an access token (the answer's JSON
    field ``Message``).  Batches go to ``events_path`` with the access token; a 401
    exchanges the refresh token again and retries once.
    """

    config: BanyanConfig
    http: Any
    clock: Any
    name: str = "banyan"
    _access_token: str | None = None
    _exchanging: Deferred[str] | None = None
    _waiters: list[Deferred[str]] = attr.Factory(list)
    log = Logger()

    @property
    def refresh_url(self) -> str:
        """
        Where the refresh token is exchanged.
        """
        return self.config.restapi_url.rstrip("/") + "/api/v1/refresh_token"

    @property
    def events_url(self) -> str:
        """
        Where batches are posted.
        """
        return self.config.restapi_url.rstrip("/") + self.config.events_path

    def send(self, events: Sequence[bytes]) -> Deferred[None]:
        """
        POST one batch, exchanging the refresh token first when needed.
        """
        return Deferred.fromCoroutine(self._send(banyan_body(self.config.service_name, events)))

    async def _send(self, body: bytes) -> None:
        token = self._access_token or await self._token()
        code, answer = await _post(self.http, self.clock, self.events_url, body, self._headers(token))
        if code == 401:
            self.log.info(
                "Banyan REST API answered 401 for audit events; exchanging the refresh token again"
            )
            if self._access_token == token:
                self._access_token = None
            token = self._access_token or await self._token()
            code, answer = await _post(self.http, self.clock, self.events_url, body, self._headers(token))
        _check(self.events_url, code, answer)

    @staticmethod
    def _headers(token: str) -> dict[bytes, list[bytes]]:
        return {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
            b"Authorization": [b"Bearer " + token.encode("utf-8")],
        }

    def _token(self) -> Deferred[str]:
        """
        An access token; concurrent callers share one exchange.
        """
        waiter: Deferred[str] = Deferred()
        self._waiters.append(waiter)
        if self._exchanging is None:
            self._exchanging = Deferred.fromCoroutine(self._exchange())

            def settle(result: Any) -> None:
                self._exchanging = None
                waiters, self._waiters = self._waiters, []
                for w in waiters:
                    if isinstance(result, Failure):
                        w.errback(result)
                    else:
                        w.callback(result)

            self._exchanging.addBoth(settle)
        return waiter

    async def _exchange(self) -> str:
        try:
            with open(self.config.refresh_token_file, encoding="utf-8") as f:
                refresh = f.read().strip()
        except OSError as e:
            raise SinkRejected(
                f"refresh_token_file {self.config.refresh_token_file} cannot be read: {e.strerror or e}"
            ) from None
        if not refresh:
            raise SinkRejected(f"refresh_token_file {self.config.refresh_token_file} is empty")
        code, answer = await _post(
            self.http,
            self.clock,
            self.refresh_url,
            b"",
            {b"Accept": [b"application/json"], b"Authorization": [b"Bearer " + refresh.encode("utf-8")]},
        )
        if code != 200:
            # The answer body is not logged: it could echo the token back.
            raise SinkRejected(f"exchanging the refresh token at {self.refresh_url} answered {code}", code=code)
        try:
            token = json.loads(answer)["Message"]
        except (ValueError, KeyError, TypeError):
            raise SinkRejected(
                f"exchanging the refresh token at {self.refresh_url}: the answer has no Message field"
            ) from None
        if not isinstance(token, str) or not token:
            raise SinkRejected(f"exchanging the refresh token at {self.refresh_url}: empty access token")
        self._access_token = token
        self.log.info("Banyan REST API access token obtained from {url}", url=self.refresh_url)
        return token

    def reopen(self) -> None:
        """
        Nothing to reopen.
        """

    def close(self) -> None:
        """
        Forget the access token.
        """
        self._access_token = None


# -- log file ------------------------------------------------------------------------------


@implementer(IAuditSink)
@attr.s(auto_attribs=True, eq=False)
class LogFileSink:
    """
    Appends one ``Event`` JSON per line to ``path`` (mode 0600), fsync'd per batch.

    All file work runs through ``executor`` (a thread), one operation at a time.
    `reopen` (SIGHUP) closes the file and opens ``path`` again, so after logrotate
    moved the old file, new lines go to a new one.
    """

    path: str
    executor: Any
    name: str = "log"
    _file: Any = None
    _lock: DeferredLock = attr.Factory(DeferredLock)
    log = Logger()

    def _serially(self, function: Any, *args: Any) -> Deferred[Any]:
        return self._lock.run(self.executor, function, *args)

    def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab")

    def _write(self, events: Sequence[bytes]) -> None:
        if self._file is None:
            self._open()
        self._file.write(b"\n".join(events) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _reopen(self) -> None:
        self._close()
        self._open()

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def send(self, events: Sequence[bytes]) -> Deferred[None]:
        """
        Append the events, one per line, and fsync.
        """
        return self._serially(self._write, list(events))

    def reopen(self) -> Deferred[None]:
        """
        Close and reopen the file (after the next write in progress, if any).
        """
        d = self._serially(self._reopen)
        d.addErrback(lambda f: self.log.failure("Reopening the audit log {path} failed", f, path=self.path))
        return d

    def close(self) -> Deferred[None]:
        """
        Close the file.
        """
        return self._serially(self._close)
