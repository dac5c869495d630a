"""
Token passthrough: a bearer token that is not one of the issuer's ID tokens is checked
by the apiserver itself with an ``authentication.k8s.io/v1`` ``TokenReview``.

`TokenReviewer.review` posts the review through the `Upstream` (so it is sent with the
proxy's own credential, which needs ``create`` on ``tokenreviews``), and turns the
answer into an `Identity` or a `TokenRejected`:

- ``passthrough_denied``: the apiserver does not accept the token (``status.error`` is
  the detail), its audiences do not match the configured ones, or it names a user the
  proxy cannot carry in a header;
- ``passthrough_unavailable``: the review could not be made (no answer in time, an
  HTTP status other than 201, a body that is not a ``TokenReview``);
- ``passthrough_rate_limited``: too many reviews were asked for; no call was made.

Answers (accepted and denied alike) are remembered for ``cache_ttl`` seconds in a
bounded LRU keyed by the SHA-256 of the token, never the token itself; concurrent
reviews of one token share one call; calls are rate-limited by a token bucket so a
flood of made-up tokens cannot hammer the apiserver.  Nothing here logs a token.

The small pieces the SubjectAccessReview client (`banyan_kproxy.identity.impersonation`)
shares with this one live here too: `ExpiringLRU`, `TokenBucket` and `post_review`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Hashable
from io import BytesIO
from typing import TYPE_CHECKING, Any

import attr
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from ..config import TokenPassthroughConfig
from .claims import MAX_GROUPS, header_value_problem
from .model import Identity, TokenRejected
from .token import show
from .verifier import FetchProblem, _BoundedBody

if TYPE_CHECKING:
    from ..proxy.upstream import Upstream

#: Where TokenReviews are created.
TOKEN_REVIEW_PATH = b"/apis/authentication.k8s.io/v1/tokenreviews"

#: Every label `TokenReviewer.review` gives `TokenRejected.reason`.
PASSTHROUGH_REJECTION_REASONS = frozenset(
    {"passthrough_denied", "passthrough_unavailable", "passthrough_rate_limited"}
)

#: Longest wait for one review's answer (headers and body), seconds.
REVIEW_TIMEOUT = 10.0
#: Largest review answer read, bytes.
MAX_REVIEW_SIZE = 1024 * 1024

_log = Logger()


# -- shared pieces ----------------------------------------------------------------------


@attr.s(auto_attribs=True)
class ExpiringLRU:
    """
    A bounded map whose entries expire: at most ``size`` entries, each forgotten
    ``ttl`` seconds after it was stored; the least recently used goes first when full.

    Times are passed in (the caller's clock), so it never looks at the wall clock.
    """

    size: int
    ttl: float
    _entries: OrderedDict[Hashable, tuple[float, Any]] = attr.ib(init=False, factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float) -> Any:
        """
        The value stored under ``key`` if it has not expired by ``now``, else ``None``.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if now >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any, now: float) -> None:
        """
        Store ``value`` under ``key`` until ``now + ttl``, evicting the least recently
        used entries beyond ``size``.
        """
        if self.size <= 0 or self.ttl <= 0:
            return
        self._entries[key] = (now + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


@attr.s(auto_attribs=True)
class TokenBucket:
    """
    A token bucket on a clock: ``burst`` calls at once, then ``rate`` per second.
    """

    rate: float
    burst: int
    clock: IReactorTime
    _tokens: float | None = attr.ib(init=False, default=None)
    _updated: float = attr.ib(init=False, default=0.0)

    def take(self) -> bool:
        """
        Spend one token and return ``True``, or return ``False`` if none is left.
        """
        now = self.clock.seconds()
        if self._tokens is None:
            self._tokens = float(self.burst)
        else:
            elapsed = max(0.0, now - self._updated)
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class ReviewFailed(Exception):
    """
    A review request got no usable answer; the message says why, for the operator.
    """


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _status_message(body: bytes) -> str:
    """
    The ``message`` of a ``Status`` body, or ``""`` when the body is not one.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    if isinstance(document, dict) and isinstance(document.get("message"), str):
        return document["message"]
    return ""


def _describe(error: BaseException) -> str:
    """
    One line for a failed request: the reasons Twisted's HTTP client wraps in
    ``ResponseFailed`` / ``ResponseNeverReceived`` rather than their ``repr``.
    """
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(
            r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons
        )
    return str(error) or type(error).__name__


def post_review(
    upstream: Upstream,
    path: bytes,
    review: dict[str, Any],
    clock: IReactorTime,
    *,
    timeout: float = REVIEW_TIMEOUT,
    max_size: int = MAX_REVIEW_SIZE,
    cooperator: Any = task,
) -> Deferred[dict[str, Any]]:
    """
    Create ``review`` (a ``TokenReview`` or ``SubjectAccessReview``) at ``path`` and
    fire with the object the apiserver answers (HTTP 201), decoded.

    The whole exchange (response headers and body, at most ``max_size`` bytes) must
    finish within ``timeout`` seconds of ``clock``.  Any other outcome fails with
    `ReviewFailed`; cancelling the returned ``Deferred`` cancels the request.
    """
    kind = review.get("kind", "review")

    async def exchange() -> tuple[int, bytes]:
        body = FileBodyProducer(
            BytesIO(json.dumps(review).encode("utf-8")), cooperator=cooperator
        )
        headers = Headers(
            {b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]}
        )
        response = await upstream.request(b"POST", path, headers, body)
        finished: Deferred[bytes] = Deferred()
        response.deliverBody(_BoundedBody(finished, max_size, f"the {kind} answer"))
        return response.code, await finished

    def timed_out(result: Any, seconds: float) -> Failure:
        return Failure(TimeoutError())

    async def checked() -> dict[str, Any]:
        attempt = Deferred.fromCoroutine(exchange())
        attempt.addTimeout(timeout, clock, onTimeoutCancel=timed_out)
        try:
            code, data = await attempt
        except CancelledError:
            raise
        except TimeoutError:
            raise ReviewFailed(f"no {kind} answer within {timeout:g}s") from None
        except FetchProblem as e:
            raise ReviewFailed(str(e)) from None
        except Exception as e:
            raise ReviewFailed(f"{kind} request failed: {_describe(e)}") from None
        if code != 201:
            message = _status_message(data)
            raise ReviewFailed(
                f"{kind} answered HTTP {code}" + (f": {message}" if message else "")
            )
        try:
            document = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ReviewFailed(f"the {kind} answer is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("status"), dict):
            raise ReviewFailed(f"the {kind} answer has no status")
        return document

    return Deferred.fromCoroutine(checked())


# -- TokenReview ------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    """
    The cache key for ``token``: its SHA-256, so the cache never holds a token.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _safe(value: Any, what: str) -> str:
    """
    ``value`` if it is a string a header can carry, else a ``passthrough_denied``.
    """
    if not isinstance(value, str):
        raise TokenRejected("passthrough_denied", f"TokenReview {what} is not a string")
    problem = header_value_problem(value)
    if problem is not None:
        raise TokenRejected("passthrough_denied", f"TokenReview {what} {show(value)} {problem}")
    return value


def _error_detail(status: dict[str, Any], token: str) -> str:
    """
    The apiserver's reason for refusing a token, one line, without the token.
    """
    error = status.get("error")
    if not isinstance(error, str) or not error:
        return "the apiserver did not authenticate the token"
    if token:
        error = error.replace(token, "<token>")
    return "the apiserver did not authenticate the token: " + show(error, 200)


def identity_from_review(
    review: dict[str, Any], audiences: tuple[str, ...], token: str = ""
) -> Identity:
    """
    The `Identity` a ``TokenReview`` answer grants, or `TokenRejected`
    (``passthrough_denied``) when it grants none.

    With ``audiences`` configured, ``status.audiences`` must share one of them: an
    empty list means the token is only good for the apiserver's own audiences.
    ``token`` is only used to make sure the detail never repeats it.
    """
    status = review.get("status")
    if not isinstance(status, dict):
        status = {}
    if status.get("authenticated") is not True:
        raise TokenRejected("passthrough_denied", _error_detail(status, token))
    if audiences:
        granted = status.get("audiences")
        if not isinstance(granted, list) or not granted:
            raise TokenRejected(
                "passthrough_denied",
                f"TokenReview returned no audiences; one of {', '.join(audiences)} is required",
            )
        if not set(audiences).intersection(a for a in granted if isinstance(a, str)):
            shown = ", ".join(show(a, 60) for a in granted[:5])
            raise TokenRejected(
                "passthrough_denied",
                f"token audiences [{shown}] share none of {', '.join(audiences)}",
            )
    user = status.get("user")
    if not isinstance(user, dict):
        raise TokenRejected("passthrough_denied", "TokenReview has no user")
    name = _safe(user.get("username"), "user name")
    groups_value = user.get("groups") or []
    if not isinstance(groups_value, list):
        raise TokenRejected("passthrough_denied", "TokenReview groups are not a list")
    if len(groups_value) > MAX_GROUPS:
        raise TokenRejected("passthrough_denied", f"TokenReview has more than {MAX_GROUPS} groups")
    groups = tuple(_safe(g, "group") for g in groups_value)
    extra_value = user.get("extra") or {}
    if not isinstance(extra_value, dict):
        raise TokenRejected("passthrough_denied", "TokenReview extra is not a mapping")
    extra = []
    for key in sorted(extra_value):
        values = extra_value[key]
        if not isinstance(values, list):
            raise TokenRejected("passthrough_denied", f"TokenReview extra {show(key)} is not a list")
        extra.append(
            (_safe(key, "extra key"), tuple(_safe(v, f"extra {show(key)} value") for v in values))
        )
    uid = user.get("uid") or None
    if uid is not None:
        uid = _safe(uid, "uid")
    return Identity(user=name, groups=groups, extra=tuple(extra), uid=uid)


@attr.s(auto_attribs=True)
class TokenReviewer:
    """
    Checks bearer tokens with the apiserver's TokenReview API (token passthrough).

    :param config: the ``[token_passthrough]`` section: audiences, cache and rate.
    :param upstream: the apiserver, reached with the proxy's own credential.
    :param clock: times the cache, the rate limit and each review's ``timeout``.
    :param cooperator: runs the request-body producer (``twisted.internet.task``'s
        global cooperator by default; tests pass their own).
    """

    config: TokenPassthroughConfig
    upstream: Upstream
    clock: IReactorTime
    timeout: float = REVIEW_TIMEOUT
    max_response_size: int = MAX_REVIEW_SIZE
    cooperator: Any = attr.ib(default=attr.Factory(lambda: task))
    #: Answers by token digest: an `Identity`, or a ``(reason, detail)`` refusal.
    _cache: ExpiringLRU = attr.ib(init=False)
    _bucket: TokenBucket = attr.ib(init=False)
    #: The callers waiting on the review in flight for each token digest.
    _waiting: dict[bytes, list[Deferred[Identity]]] = attr.ib(init=False, factory=dict)
    #: Reviews sent to the apiserver so far (cache hits and shared calls not counted).
    calls: int = attr.ib(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._cache = ExpiringLRU(self.config.cache_size, self.config.cache_ttl)
        self._bucket = TokenBucket(self.config.review_qps, self.config.review_burst, self.clock)

    @property
    def cached_tokens(self) -> int:
        """
        Entries in the answer cache (accepted and refused tokens).
        """
        return len(self._cache)

    def review(self, token: str) -> Deferred[Identity]:
        """
        Ask the apiserver who ``token`` belongs to.

        :return: a ``Deferred`` firing with the `Identity` the apiserver reports, or
            failing with `TokenRejected` (``passthrough_denied``,
            ``passthrough_unavailable`` or ``passthrough_rate_limited``).  It has
            fired already when the answer is cached or the rate limit refuses.
            Cancelling it stops waiting without cancelling a review other callers share.
        """
        digest = _digest(token)
        cached = self._cache.get(digest, self.clock.seconds())
        if isinstance(cached, Identity):
            return succeed(cached)
        if cached is not None:
            return fail(TokenRejected(*cached))
        waiting = self._waiting.get(digest)
        if waiting is None:
            if not self._bucket.take():
                return fail(
                    TokenRejected(
                        "passthrough_rate_limited",
                        f"more than {self.config.review_burst} TokenReviews at once or"
                        f" {self.config.review_qps:g} per second; not asking the apiserver",
                    )
                )
            waiting = self._waiting[digest] = []
            waiter = self._wait(waiting)
            self.calls += 1
            Deferred.fromCoroutine(self._review(token)).addBoth(self._settle, digest)
            return waiter
        return self._wait(waiting)

    def _wait(self, waiting: list[Deferred[Identity]]) -> Deferred[Identity]:
        def forget(d: Deferred[Identity]) -> None:
            if d in waiting:
                waiting.remove(d)

        waiter: Deferred[Identity] = Deferred(forget)
        waiting.append(waiter)
        return waiter

    async def _review(self, token: str) -> Identity:
        spec: dict[str, Any] = {"token": token}
        if self.config.audiences:
            spec["audiences"] = list(self.config.audiences)
        review = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        try:
            answer = await post_review(
                self.upstream,
                TOKEN_REVIEW_PATH,
                review,
                self.clock,
                timeout=self.timeout,
                max_size=self.max_response_size,
                cooperator=self.cooperator,
            )
        except ReviewFailed as e:
            _log.warn("Token passthrough unavailable: {problem}", problem=str(e))
            raise TokenRejected("passthrough_unavailable", str(e)) from None
        return identity_from_review(answer, self.config.audiences, token)

    def _settle(self, result: Identity | Failure, digest: bytes) -> None:
        waiting = self._waiting.pop(digest, [])
        now = self.clock.seconds()
        if isinstance(result, Identity):
            self._cache.put(digest, result, now)
            for waiter in waiting:
                waiter.callback(result)
            return
        error = result.value
        if isinstance(error, TokenRejected):
            reason, detail = error.reason, error.detail
        else:
            _log.failure("TokenReview failed unexpectedly", result)
            reason, detail = "passthrough_unavailable", f"TokenReview failed: {error}"
        if reason == "passthrough_denied":
            self._cache.put(digest, (reason, detail), now)
        for waiter in waiting:
            waiter.errback(TokenRejected(reason, detail))
