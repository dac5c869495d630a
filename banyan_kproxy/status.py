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
