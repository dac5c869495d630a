"""
Checking a signed token's claims and mapping them to a Kubernetes `Identity`.

The rules follow kube-apiserver's OIDC authenticator (``--oidc-*`` flags): exact
issuer, client id among the audiences, ``exp`` required, configured required claims,
a non-empty user name claim (``email`` only when ``email_verified`` is not false),
groups from a string or an array of strings.  Times are judged against the time
passed in, which is the verifier's clock, with the configured leeway.

Every value that becomes an ``Impersonate-*`` header must be a string a header can
carry: no control characters, no surrounding whitespace.  Names under ``system:``
are refused too, so a token can never make the proxy impersonate a Kubernetes
system user or group such as ``system:masters``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..config import OIDCConfig
from .model import Identity, TokenRejected, VerifiedToken
from .token import show

#: Most groups one token may carry.
MAX_GROUPS = 1000

#: Prefix Kubernetes reserves for its own users and groups.
RESERVED_PREFIX = "system:"

# C0 controls, DEL, C1 controls, and lone surrogates (which cannot be encoded).
_NOT_HEADER_SAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_ABSENT = object()


def header_value_problem(value: str) -> str | None:
    """
    Why ``value`` cannot be sent as an HTTP header value, or ``None`` if it can.
    """
    if not value:
        return "is empty"
    match = _NOT_HEADER_SAFE.search(value)
    if match is not None:
        return f"contains the control character U+{ord(match.group()):04X}"
    if value != value.strip():
        return "has leading or trailing whitespace"
    return None


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name, _ABSENT)
    if value is _ABSENT:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRejected("invalid_claim", f"claim {name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise TokenRejected("invalid_claim", f"claim {name} is not a finite number")
    return number


def check_issuer(claims: dict[str, Any], issuer_url: str) -> str:
    """
    The token's ``iss``, which must be exactly ``issuer_url``.
    """
    iss = claims.get("iss", _ABSENT)
    if iss is _ABSENT:
        raise TokenRejected("missing_claim", "token has no iss claim")
    if iss != issuer_url:
        raise TokenRejected(
            "issuer", f"token issuer {show(iss)} is not {issuer_url!r}"
        )
    return iss


def _header_safe(claim: str, value: str, what: str, final: bool) -> None:
    problem = header_value_problem(value)
    if problem is not None:
        raise TokenRejected("invalid_claim", f"claim {claim}: {what} {problem}")
    if final and value.startswith(RESERVED_PREFIX):
        raise TokenRejected(
            "invalid_claim",
            f"claim {claim}: {what} {show(value)} is under the reserved "
            f"{RESERVED_PREFIX!r} prefix",
        )


def _user(claims: dict[str, Any], config: OIDCConfig) -> str:
    name = config.username_claim
    value = claims.get(name, _ABSENT)
    if value is _ABSENT:
        raise TokenRejected("missing_claim", f"token has no {name} claim for the user name")
    if not isinstance(value, str) or not value:
        raise TokenRejected(
            "invalid_claim", f"claim {name} is not a non-empty string"
        )
    if name == "email":
        verified = claims.get("email_verified", _ABSENT)
        if verified is not _ABSENT and verified is not True:
            raise TokenRejected(
                "email_unverified",
                f"email_verified is {show(verified)}, not true",
            )
    _header_safe(name, value, "user name", final=False)
    user = config.username_prefix + value
    _header_safe(name, user, "user name", final=True)
    return user


def _groups(claims: dict[str, Any], config: OIDCConfig, max_groups: int) -> tuple[str, ...]:
    name = config.groups_claim
    if not name:
        return ()
    value = claims.get(name)
    if value is None:
        # Absent, or JSON null (kube-apiserver reads null as no groups too).
        return ()
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        values = value
    else:
        raise TokenRejected(
            "invalid_claim", f"claim {name} is not a string or an array of strings"
        )
    if len(values) > max_groups:
        raise TokenRejected(
            "invalid_claim", f"claim {name} has {len(values)} groups, over {max_groups}"
        )
    groups = []
    seen = set()
    for group in values:
        _header_safe(name, group, "group", final=False)
        prefixed = config.groups_prefix + group
        _header_safe(name, prefixed, "group", final=True)
        if prefixed not in seen:
            seen.add(prefixed)
            groups.append(prefixed)
    return tuple(groups)


def check_claims(
    claims: dict[str, Any],
    config: OIDCConfig,
    now: float,
    max_groups: int = MAX_GROUPS,
) -> VerifiedToken:
    """
    Check the claims of a token whose signature has been verified.

    :param now: the current time, POSIX seconds, from the verifier's clock.
    :raises TokenRejected: with the reason naming the first rule broken.
    """
    issuer = check_issuer(claims, config.issuer_url)

    subject = claims.get("sub", _ABSENT)
    if subject is _ABSENT:
        raise TokenRejected("missing_claim", "token has no sub claim")
    if not isinstance(subject, str) or not subject:
        raise TokenRejected("invalid_claim", "claim sub is not a non-empty string")
    who = f"sub {show(subject)}"

    aud = claims.get("aud", _ABSENT)
    if aud is _ABSENT:
        raise TokenRejected("missing_claim", f"token for {who} has no aud claim")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise TokenRejected(
            "audience", f"token for {who}: aud is not a string or an array of strings"
        )
    if config.client_id not in audiences:
        shown = ", ".join(show(a) for a in audiences[:5])
        raise TokenRejected(
            "audience",
            f"token for {who} is for audience [{shown}], not {config.client_id!r}",
        )

    leeway = config.leeway
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise TokenRejected("missing_claim", f"token for {who} has no exp claim")
    if now >= exp + leeway:
        raise TokenRejected(
            "expired",
            f"token for {who} expired {now - exp:.0f}s ago (leeway {leeway:g}s)",
        )
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise TokenRejected(
            "not_yet_valid",
            f"token for {who} is not valid for another {nbf - now:.0f}s "
            f"(leeway {leeway:g}s)",
        )
    iat = _numeric_date(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise TokenRejected(
            "issued_in_future",
            f"token for {who} was issued {iat - now:.0f}s in the future "
            f"(leeway {leeway:g}s)",
        )

    for name, expected in config.required_claims:
        value = claims.get(name, _ABSENT)
        if value is _ABSENT:
            raise TokenRejected(
                "required_claim", f"token for {who} lacks required claim {name}"
            )
        if not isinstance(value, str) or value != expected:
            raise TokenRejected(
                "required_claim",
                f"token for {who}: required claim {name} is {show(value)}, "
                f"not {expected!r}",
            )

    user = _user(claims, config)
    groups = _groups(claims, config, max_groups)

    jti = claims.get("jti")
    return VerifiedToken(
        identity=Identity(user=user, groups=groups),
        expires_at=exp,
        issuer=issuer,
        subject=subject,
        jti=jti if isinstance(jti, str) else None,
    )
