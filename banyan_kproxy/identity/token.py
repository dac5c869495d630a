"""
Splitting a compact JWS (an ID token) into its header, claims and signature.

Nothing here is trusted yet: the header is read so the algorithm can be refused
before any key is looked up, and the claims so a token from another issuer can be
refused without touching the key set.  The signature is checked in `keys`, the
claims in `claims`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from attr import frozen

from .model import TokenRejected

#: Longest token accepted; ID tokens are a few kilobytes at most.
MAX_TOKEN_LENGTH = 64 * 1024

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


@frozen
class ParsedToken:
    """
    A compact JWS split and decoded, not yet verified.
    """

    header: dict[str, Any]
    claims: dict[str, Any]
    #: ``base64url(header) + "." + base64url(payload)``, what the signature covers.
    signing_input: bytes
    signature: bytes
    alg: str
    kid: str | None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _segment(value: str, what: str) -> bytes:
    if not _SEGMENT.fullmatch(value) or len(value) % 4 == 1:
        raise TokenRejected("malformed", f"token {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise TokenRejected("malformed", f"token {what} is not base64url") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenRejected("malformed", f"token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenRejected("malformed", f"token {what} is not a JSON object")
    return value


def parse_token(token: str | bytes) -> ParsedToken:
    """
    Split and decode ``token``.

    :raises TokenRejected: ``malformed`` when it is not a compact JWS with a JSON
        object header naming an algorithm and a JSON object payload.
    """
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenRejected("malformed", "token is not ASCII") from None
    if not isinstance(token, str) or not token:
        raise TokenRejected("malformed", "token is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenRejected(
            "malformed", f"token is {len(token)} characters, over {MAX_TOKEN_LENGTH}"
        )
    parts = token.split(".")
    if len(parts) == 5:
        raise TokenRejected("malformed", "encrypted tokens (JWE) are not accepted")
    if len(parts) != 3:
        raise TokenRejected(
            "malformed", f"token has {len(parts)} segments, a JWS has 3"
        )
    header = _json_object(_segment(parts[0], "header"), "header")
    claims = _json_object(_segment(parts[1], "payload"), "payload")
    signature = _segment(parts[2], "signature")

    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenRejected("malformed", "token header names no algorithm")
    if "crit" in header:
        raise TokenRejected(
            "malformed", "token header has critical extensions, none are supported"
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenRejected("malformed", "token header kid is not a string")
    # ``jku``, ``x5u``, ``jwk`` and ``x5c`` are deliberately never looked at: keys
    # come only from the configured issuer's JWKS.
    return ParsedToken(
        header=header,
        claims=claims,
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii"),
        signature=signature,
        alg=alg,
        kid=kid or None,
    )


def show(value: Any, limit: int = 80) -> str:
    """
    A short, escaped rendering of an untrusted value for a log line.

    Control characters are escaped (``repr``) so a claim cannot forge log lines, and
    long values are cut so a whole token can never land in a log.
    """
    if isinstance(value, str):
        if len(value) > limit:
            value = value[:limit] + "..."
        return repr(value)
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"<{type(value).__name__}>"
