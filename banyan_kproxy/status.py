"""
Kubernetes ``meta/v1`` ``Status`` bodies, the error format kubectl understands.

kubectl prints ``Error from server (<reason>): <message>`` for a ``Status`` with
``status: Failure``; a 401 with ``reason: Unauthorized`` makes it print "You must be
logged in to the server".
"""

from __future__ import annotations

import json
from typing import Any

#: The ``reason`` Kubernetes uses for each status code it answers with.
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "AlreadyExists",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status(
    code: int,
    message: str,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    A failure ``Status`` object as a dict.
    """
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else REASONS.get(code, ""),
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def status_body(
    code: int,
    message: str,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> bytes:
    """
    A failure ``Status`` serialised as the JSON bytes of a response body.
    """
    return json.dumps(status(code, message, reason, details)).encode("utf-8")


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(value: str) -> str:
    """
    ``value`` quoted as Go's ``%q`` quotes it, as kube-apiserver's messages quote
    user names, resources, namespaces and object names.
    """
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable() and ch != " ":
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def forbidden_message(
    user: str,
    verb: str,
    *,
    resource: str = "",
    subresource: str = "",
    api_group: str = "",
    namespace: str = "",
    name: str = "",
    path: str | None = None,
    reason: str = "",
) -> str:
    """
    The ``message`` of kube-apiserver's Forbidden ``Status`` (responsewriters.Forbidden).

    ``services is forbidden: User "u" cannot list resource "services" in API group ""
    in the namespace "default"``; with the object's name for named requests; ``at the
    cluster scope`` without a namespace; ``forbidden: User "u" cannot get path
    "/healthz"`` for non-resource requests (``path`` given); ``: <reason>`` appended
    when the authorizer gave one.
    """
    quoted_user = go_quote(user)
    if path is not None:
        detail = f"User {quoted_user} cannot {verb} path {go_quote(path)}"
    else:
        full = resource + ("/" + subresource if subresource else "")
        where = f"in the namespace {go_quote(namespace)}" if namespace else "at the cluster scope"
        detail = (
            f"User {quoted_user} cannot {verb} resource {go_quote(full)}"
            f" in API group {go_quote(api_group)} {where}"
        )
    # The apiserver escapes HTML-looking text in its own part of the message.
    detail = detail.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if reason:
        detail = f"{detail}: {reason}"
    if path is not None or not (resource or api_group):
        return f"forbidden: {detail}"
    qualified = f"{resource}.{api_group}" if api_group else resource
    if name:
        return f"{qualified} {go_quote(name)} is forbidden: {detail}"
    return f"{qualified} is forbidden: {detail}"
