"""
Header policy: what passes between kubectl and kube-apiserver, in both directions.

Requests lose the caller's credentials, any identity assertion the caller tried to
make (``Impersonate-*``, front-proxy ``X-Remote-*``), hop-by-hop headers and a
client-supplied ``X-Forwarded-For``; they gain the verified identity as
impersonation headers.  Responses lose hop-by-hop headers only.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote

from twisted.web.http_headers import Headers

from banyan_kproxy.identity import Identity

#: RFC 9110 §7.6.1 hop-by-hop headers, plus the proxy-only ones.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Set by the proxy (or by Twisted's HTTP client) for the upstream request.
_REPLACED_UPSTREAM = frozenset(
    {b"host", b"content-length", b"authorization", b"x-forwarded-for", b"audit-id"}
)

#: Headers that assert an identity to kube-apiserver's front-proxy authenticator.
_FRONT_PROXY_PREFIXES = (b"x-remote-user", b"x-remote-group", b"x-remote-extra-")

#: Client impersonation headers, as kube-apiserver reads them.
_IMPERSONATE_PREFIX = b"impersonate-"

GROUP_AUTHENTICATED = "system:authenticated"
GROUP_UNAUTHENTICATED = "system:unauthenticated"


def _connection_tokens(headers: Headers) -> set[bytes]:
    """
    The header names listed in ``Connection:``, lower-cased.
    """
    names: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


def _identity_name(name: bytes) -> bytes:
    """
    ``name`` lower-cased with ``_`` read as ``-``, for recognising identity headers.

    kube-apiserver (Go's ``net/http``) never reads ``Impersonate_User`` as
    ``Impersonate-User``, but servers and gateways that map ``_`` to ``-`` (CGI,
    WSGI, some proxies) exist; such spellings are dropped rather than carried.
    """
    return name.lower().replace(b"_", b"-")


def _asserts_identity(name: bytes) -> bool:
    """
    Whether a client header named ``name`` (any spelling) asserts an identity.
    """
    normal = _identity_name(name)
    return normal.startswith(_IMPERSONATE_PREFIX) or normal.startswith(_FRONT_PROXY_PREFIXES)


def client_impersonation_headers(headers: Headers) -> list[str]:
    """
    The names of any ``Impersonate-*`` headers the client sent (any case).
    """
    found = []
    for name, _ in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered.startswith(_IMPERSONATE_PREFIX):
            found.append(name.decode("latin-1"))
    return found


def _encode(value: str) -> bytes:
    return value.encode("utf-8")


def upstream_request_headers(
    client: Headers,
    identity: Identity,
    peer_ip: str | None,
    extra: Iterable[tuple[str, str]] = (),
    client_ip_extra: bool = False,
) -> Headers:
    """
    The headers to send upstream for a request made by ``identity``.

    The proxy's own ``Authorization``, ``Host``, ``Content-Length`` and ``Audit-ID``
    are added by the upstream client, not here.
    """
    dropped = HOP_BY_HOP | _REPLACED_UPSTREAM | _connection_tokens(client)
    out = Headers()
    for name, raw_values in client.getAllRawHeaders():
        lowered = name.lower()
        if lowered in dropped or _asserts_identity(name):
            continue
        kept = list(raw_values)
        if lowered == b"sec-websocket-protocol":
            # A bearer token offered as a sub-protocol never goes upstream, whether
            # or not it is the one the request was authenticated with.
            kept = _without_token_entries(kept)
            if not kept:
                continue
        out.setRawHeaders(name, kept)
    out.setRawHeaders(b"Impersonate-User", [_encode(identity.user)])
    groups = list(identity.groups)
    if GROUP_AUTHENTICATED not in groups and GROUP_UNAUTHENTICATED not in groups:
        groups.append(GROUP_AUTHENTICATED)
    # One header line per group: kube-apiserver does not split on commas.
    out.setRawHeaders(b"Impersonate-Group", [_encode(g) for g in groups])
    extras: dict[str, list[str]] = {}
    for key, values in identity.extra:
        extras.setdefault(key, []).extend(values)
    for key, value in extra:
        extras.setdefault(key, []).append(value)
    if client_ip_extra and peer_ip:
        extras.setdefault("Remote-Client-Ip", []).append(peer_ip)
    for key, values in extras.items():
        name = b"Impersonate-Extra-" + quote(key, safe="").encode("ascii")
        out.setRawHeaders(name, [_encode(v) for v in values])
    if identity.uid:
        out.setRawHeaders(b"Impersonate-Uid", [_encode(identity.uid)])
    if peer_ip:
        out.setRawHeaders(b"X-Forwarded-For", [peer_ip.encode("ascii")])
    return out


#: Response headers Twisted's server sets itself or that must not pass.
_REPLACED_DOWNSTREAM = frozenset({b"content-length"})


def downstream_response_headers(upstream: Headers) -> Headers:
    """
    The upstream response's headers minus hop-by-hop ones, for the client.
    """
    out = Headers()
    copy_downstream_response_headers(upstream, out)
    return out


def copy_downstream_response_headers(upstream: Headers, into: Headers) -> None:
    """
    Set the upstream response's headers minus hop-by-hop ones on ``into`` (the
    client's response headers), each replacing any value ``into`` had.
    """
    dropped = HOP_BY_HOP | _REPLACED_DOWNSTREAM
    if upstream.hasHeader(b"connection"):
        dropped = dropped | _connection_tokens(upstream)
    for name, values in upstream.getAllRawHeaders():
        if name.lower() in dropped:
            continue
        into.setRawHeaders(name, list(values))


def bearer_token(headers: Headers) -> tuple[str | None, str | None]:
    """
    The bearer token from ``Authorization``, or ``(None, why)`` when there is none.

    More than one ``Authorization`` header is refused rather than guessed at.
    """
    values = headers.getRawHeaders(b"authorization", [])
    if not values:
        return None, "no bearer token"
    if len(values) > 1:
        return None, "more than one Authorization header"
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None, "Authorization is not a bearer token"
    token = token.strip()
    if not token:
        return None, "empty bearer token"
    try:
        return token.decode("ascii"), None
    except UnicodeDecodeError:
        return None, "bearer token is not ASCII"


#: A WebSocket sub-protocol entry carrying a bearer token (browsers cannot set
#: ``Authorization``); kube-apiserver accepts the same.
WEBSOCKET_TOKEN_PREFIX = b"base64url.bearer.authorization.k8s.io."

#: Unpadded base64url, as kube-apiserver decodes the entry (``RawURLEncoding``).
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]+")


def _without_token_entries(values: Iterable[bytes]) -> list[bytes]:
    """
    ``Sec-WebSocket-Protocol`` values with every bearer token entry removed.
    """
    kept = []
    for value in values:
        entries = [e.strip() for e in value.split(b",")]
        if not any(e.startswith(WEBSOCKET_TOKEN_PREFIX) for e in entries):
            kept.append(value)
            continue
        rest = [e for e in entries if e and not e.startswith(WEBSOCKET_TOKEN_PREFIX)]
        if rest:
            kept.append(b", ".join(rest))
    return kept


def websocket_bearer_token(headers: Headers) -> tuple[str | None, str | None, list[bytes]]:
    """
    The bearer token offered as a ``Sec-WebSocket-Protocol`` entry.

    Returns ``(token, problem, other_protocols)``: the token (or None), why the
    entry cannot be used (or None), and the remaining sub-protocols in order.
    """
    protocols: list[bytes] = []
    tokens: list[bytes] = []
    for value in headers.getRawHeaders(b"sec-websocket-protocol", []):
        for entry in value.split(b","):
            entry = entry.strip()
            if not entry:
                continue
            if entry.startswith(WEBSOCKET_TOKEN_PREFIX):
                tokens.append(entry[len(WEBSOCKET_TOKEN_PREFIX):])
            else:
                protocols.append(entry)
    if not tokens:
        return None, None, protocols
    if len(tokens) > 1:
        return None, "more than one bearer token sub-protocol", protocols
    encoded = tokens[0]
    if not _BASE64URL.fullmatch(encoded) or len(encoded) % 4 == 1:
        # Python's decoder skips characters outside the alphabet and takes the
        # standard one too; kube-apiserver accepts unpadded base64url only.
        return None, "the bearer token sub-protocol is not base64url", protocols
    try:
        token = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None, "the bearer token sub-protocol is not base64url", protocols
    if not token or any(c in token for c in "\r\n\x00 "):
        return None, "the bearer token sub-protocol is empty or malformed", protocols
    return token, None, protocols


def without_websocket_token(headers: Headers, protocols: list[bytes]) -> None:
    """
    Replace ``Sec-WebSocket-Protocol`` with ``protocols`` (the token entry removed).
    """
    if protocols:
        headers.setRawHeaders(b"Sec-WebSocket-Protocol", [b", ".join(protocols)])
    else:
        headers.removeHeader(b"sec-websocket-protocol")


def passthrough_request_headers(client: Headers, peer_ip: str | None) -> Headers:
    """
    The headers for a request forwarded with the caller's own credential
    (token passthrough): hop-by-hop and front-proxy headers dropped, the caller's
    ``Authorization`` and any ``Impersonate-*`` kept for the apiserver to judge.
    """
    dropped = (HOP_BY_HOP | {b"host", b"content-length", b"x-forwarded-for", b"audit-id"}
               | _connection_tokens(client))
    out = Headers()
    for name, values in client.getAllRawHeaders():
        lowered = name.lower()
        if lowered in dropped or lowered.startswith(_FRONT_PROXY_PREFIXES):
            continue
        if _asserts_identity(name) and not lowered.startswith(_IMPERSONATE_PREFIX):
            # ``Impersonate_User``, ``X_Remote_User`` and the like.
            continue
        out.setRawHeaders(name, list(values))
    if peer_ip:
        out.setRawHeaders(b"X-Forwarded-For", [peer_ip.encode("ascii")])
    return out


def add_upgrade_headers(client: Headers, upstream: Headers) -> None:
    """
    Put back what an upgrade needs after the hop-by-hop filtering:
    ``Connection: Upgrade`` and the client's ``Upgrade`` value.
    """
    upstream.setRawHeaders(b"Connection", [b"Upgrade"])
    upstream.setRawHeaders(b"Upgrade", list(client.getRawHeaders(b"upgrade", [])))
