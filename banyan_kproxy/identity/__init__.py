"""
OIDC ID token verification: issuer discovery, the JWKS cache, token checks, and the
mapping of claims to the Kubernetes `Identity` the proxy impersonates.

Build one `OIDCVerifier` per ``[oidc]`` section with a treq ``HTTPClient`` and the
reactor, ``start()`` it when the daemon starts and ``stop()`` it when it stops, and
call ``verify(token)`` per request.
"""

from .claims import MAX_GROUPS, header_value_problem
from .keys import SUPPORTED_ALGORITHMS
from .model import (
    REJECTION_REASONS,
    Identity,
    ITokenVerifier,
    TokenRejected,
    VerifiedToken,
)
from .verifier import OIDCVerifier

__all__ = [
    "Identity",
    "ITokenVerifier",
    "MAX_GROUPS",
    "OIDCVerifier",
    "REJECTION_REASONS",
    "SUPPORTED_ALGORITHMS",
    "TokenRejected",
    "VerifiedToken",
    "header_value_problem",
]

# Token passthrough (TokenReview) and client impersonation (SubjectAccessReview).
from .impersonation import (  # noqa: E402
    ORIGINAL_GROUPS_EXTRA,
    ORIGINAL_UID_EXTRA,
    ORIGINAL_USER_EXTRA,
    ORIGINAL_USER_EXTRA_PREFIX,
    ImpersonationAuthorizer,
    ImpersonationDenied,
    ImpersonationError,
    ImpersonationUnavailable,
    RequestedImpersonation,
)
from .tokenreview import PASSTHROUGH_REJECTION_REASONS, TokenReviewer  # noqa: E402

__all__ += [
    "ImpersonationAuthorizer",
    "ImpersonationDenied",
    "ImpersonationError",
    "ImpersonationUnavailable",
    "ORIGINAL_GROUPS_EXTRA",
    "ORIGINAL_UID_EXTRA",
    "ORIGINAL_USER_EXTRA",
    "ORIGINAL_USER_EXTRA_PREFIX",
    "PASSTHROUGH_REJECTION_REASONS",
    "RequestedImpersonation",
    "TokenReviewer",
]
