"""
The values token verification produces: who the caller is, and why a token was refused.
"""

from __future__ import annotations


from attr import frozen
from zope.interface import Attribute, Interface

#: Every label `OIDCVerifier.verify` gives `TokenRejected.reason`.
REJECTION_REASONS = frozenset(
    {
        "malformed",
        "algorithm",
        "issuer",
        "audience",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "signature",
        "unknown_kid",
        "missing_claim",
        "required_claim",
        "email_unverified",
        "invalid_claim",
        "keys_unavailable",
    }
)


@frozen
class Identity:
    """
    The Kubernetes identity a request is made as: it becomes the impersonation headers.

    ``user`` and ``groups`` already carry their configured prefixes.  ``extra`` is a
    sequence of (key, values) pairs for ``Impersonate-Extra-<key>``.
    """

    user: str
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    uid: str | None = None


@frozen
class VerifiedToken:
    """
    A token whose signature and claims have been checked, and the identity it grants.
    """

    identity: Identity
    #: The token's ``exp`` claim, POSIX seconds.
    expires_at: float
    issuer: str
    subject: str
    jti: str | None = None


class TokenRejected(Exception):
    """
    A token was refused.

    ``reason`` is a short fixed label fit for metrics (`REJECTION_REASONS` from the
    OIDC verifier; callers may add their own, such as a missing token);
    ``detail`` is one line for the operator's log.  The detail never holds the token or
    its signature; it may name the issuer, subject, key id and claim names.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return self.detail

    def __repr__(self) -> str:
        return f"TokenRejected({self.reason!r}, {self.detail!r})"


class ITokenVerifier(Interface):
    """
    Something that turns a bearer token into a `VerifiedToken` or refuses it.
    """

    ready = Attribute("True once the verifier can accept tokens.")

    def verify(token):
        """
        Check ``token``.

        :return: a ``Deferred`` firing with a `VerifiedToken`, or failing with
            `TokenRejected`.
        """
