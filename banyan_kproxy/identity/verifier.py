"""
`OIDCVerifier`: the issuer's keys kept fresh in the background, and ID tokens checked.

Discovery (``<issuer>/.well-known/openid-configuration``) and the JWKS are fetched with
the injected treq-like client, so the reactor never blocks; PyJWT's ``PyJWKClient``
(blocking urllib) is not used.  Keys are parsed once per fetch.  The JWKS is refreshed
every ``jwks_refresh_interval`` and again when a token names an unknown key id, at most
once per ``jwks_min_refetch_interval`` so forged key ids cannot hammer the issuer;
verifications waiting for such a refetch share one fetch.  A failed fetch keeps the
keys already loaded and is retried with exponential backoff.

Verified tokens are cached until their ``exp``, keyed by the SHA-256 of the token, so
a repeated token costs a hash and a dictionary lookup instead of a signature check.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from ..config import OIDCConfig
from .claims import MAX_GROUPS, check_claims, check_issuer
from .keys import SUPPORTED_ALGORITHMS, KeySet, check_signature, parse_jwks
from .model import ITokenVerifier, TokenRejected, VerifiedToken
from .token import ParsedToken, parse_token, show

#: First and largest delay between retries of a failed key fetch, seconds.
MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
#: Longest wait for one discovery or JWKS response, seconds.
FETCH_TIMEOUT = 30.0
#: Largest discovery or JWKS document read, bytes.
MAX_DOCUMENT_SIZE = 1024 * 1024


class FetchProblem(Exception):
    """
    Discovery or the JWKS could not be fetched or used; the message says why.
    """


class _BoundedBody(Protocol):
    """
    Collects a response body, giving up once it grows past a limit.
    """

    def __init__(self, finished: Deferred, limit: int, what: str) -> None:
        self._finished: Deferred | None = finished
        self._limit = limit
        self._what = what
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._finished is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            finished, self._finished = self._finished, None
            self._chunks = []
            self.transport.stopProducing()
            finished.errback(
                FetchProblem(f"{self._what} is larger than {self._limit} bytes")
            )
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._finished is None:
            return
        finished, self._finished = self._finished, None
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self._chunks))
        else:
            finished.errback(reason)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _cancelled(error: BaseException) -> bool:
    """
    Whether ``error`` is, or wraps (as ``ResponseNeverReceived`` does), a cancellation.
    """
    if isinstance(error, CancelledError):
        return True
    reasons = getattr(error, "reasons", None)
    return isinstance(reasons, list) and any(
        isinstance(reason, Failure) and reason.check(CancelledError) for reason in reasons
    )


def _digest(token: str | bytes) -> bytes:
    """
    The cache key for ``token``: its SHA-256, so the cache never holds a token.
    """
    raw = token if isinstance(token, bytes) else token.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).digest()


@implementer(ITokenVerifier)
class OIDCVerifier:
    """
    Verifies ID tokens from one OIDC issuer and maps them to Kubernetes identities.

    :param config: the ``[oidc]`` section.
    :param http: a treq ``HTTPClient``-like object (``get(url, headers=...)``),
        built with the TLS policy for the issuer.
    :param clock: an ``IReactorTime``; it times fetches and retries and is the "now"
        against which ``exp``, ``nbf`` and ``iat`` are judged.
    """

    log = Logger()

    def __init__(
        self,
        config: OIDCConfig,
        http: Any,
        clock: IReactorTime,
        *,
        max_groups: int = MAX_GROUPS,
        fetch_timeout: float = FETCH_TIMEOUT,
        max_document_size: int = MAX_DOCUMENT_SIZE,
    ) -> None:
        self._config = config
        self._http = http
        self._clock = clock
        self._max_groups = max_groups
        self._fetch_timeout = fetch_timeout
        self._max_document_size = max_document_size
        self._discovery_url = (
            config.issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        )
        self._algorithms = frozenset(
            alg for alg in config.signing_algs if alg in SUPPORTED_ALGORITHMS
        )
        refused = [alg for alg in config.signing_algs if alg not in SUPPORTED_ALGORITHMS]
        if refused:
            self.log.warn(
                "Signing algorithms {refused} are never accepted; accepting {accepted}",
                refused=", ".join(refused),
                accepted=", ".join(sorted(self._algorithms)) or "none at all",
            )

        self._keys: KeySet | None = None
        self._jwks_uri: str | None = None
        self._last_jwks_fetch: float | None = None
        self._failures = 0
        self._running = False
        self._timer: IDelayedCall | None = None
        self._in_flight: Deferred | None = None
        self._waiters: list[Deferred] = []
        self._cache: OrderedDict[bytes, VerifiedToken] = OrderedDict()

        #: The last discovery or JWKS problem, ``None`` after a successful fetch.
        self.last_error: str | None = None
        #: When the keys were last loaded (clock time), ``None`` until then.
        self.keys_loaded_at: float | None = None
        #: When fetches began failing (clock time of the first failure since the
        #: last success), ``None`` while the last fetch succeeded.
        self.failing_since: float | None = None
        #: Discovery or JWKS loads that failed.
        self.fetch_failures = 0
        #: JWKS fetches attempted.
        self.jwks_fetches = 0

    # -- state ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """
        True once the issuer's keys have been loaded at least once.
        """
        return self._keys is not None

    @property
    def issuer_url(self) -> str:
        """
        The issuer whose tokens this verifier accepts.
        """
        return self._config.issuer_url

    @property
    def cached_tokens(self) -> int:
        """
        Entries in the verified-token cache.
        """
        return len(self._cache)

    # -- background key loading ---------------------------------------------

    def start(self) -> None:
        """
        Begin discovery and the JWKS load in the background, then refresh periodically.

        Failures are retried after 1, 2, 4 ... up to 60 seconds; a refresh every
        ``jwks_refresh_interval`` follows each success.
        """
        if self._running:
            return
        self._running = True
        self._cycle()

    def stop(self) -> None:
        """
        Stop refreshing: cancel the next scheduled fetch and any fetch in flight.
        """
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight is not None:
            self._in_flight.cancel()

    def _cycle(self) -> None:
        """
        One scheduled load: discovery then JWKS, and the next one scheduled.
        """
        self._timer = None
        if not self._running:
            return
        if self._in_flight is not None:
            # A refetch for an unknown key id is running; go once it is done.
            after: Deferred = Deferred()
            after.addCallback(lambda _: self._cycle())
            self._waiters.append(after)
            return
        self._fetch(discover=True).addCallback(self._cycle_done)

    def _cycle_done(self, problem: str | None) -> None:
        if not self._running:
            return
        if problem is None:
            self._failures = 0
            delay = self._config.jwks_refresh_interval
        else:
            self._failures += 1
            delay = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (self._failures - 1))
            self.log.warn(
                "Loading signing keys for {issuer} failed: {problem}; "
                "{kept}; retrying in {delay:g}s",
                issuer=self._config.issuer_url,
                problem=problem,
                kept=(
                    f"keeping the {len(self._keys.keys)} keys loaded before"
                    if self._keys is not None
                    else "no keys loaded yet, tokens are refused"
                ),
                delay=delay,
            )
        self._timer = self._clock.callLater(delay, self._cycle)

    def _fetch(self, discover: bool) -> Deferred:
        """
        Start a fetch, releasing everyone waiting for keys when it ends.

        :return: a ``Deferred`` firing with ``None`` on success, or a line saying
            what went wrong.
        """
        in_flight = Deferred.fromCoroutine(self._load(discover))
        self._in_flight = in_flight

        def ended(outcome: str | None | Failure) -> str | None:
            self._in_flight = None
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
            if isinstance(outcome, Failure):
                if outcome.check(CancelledError):
                    return "stopped"
                self.log.failure("Unexpected error loading signing keys", outcome)
                return "unexpected error loading signing keys (see log)"
            return outcome

        # This may run at once when the client answers synchronously.
        in_flight.addBoth(ended)
        return in_flight

    async def _load(self, discover: bool) -> str | None:
        try:
            if discover or self._jwks_uri is None:
                self._jwks_uri = await self._discover()
            await self._load_jwks(self._jwks_uri)
        except CancelledError:
            raise
        except FetchProblem as e:
            return self._failed(str(e))
        except Exception:
            self.log.failure("Unexpected error loading signing keys")
            return self._failed("unexpected error loading signing keys (see log)")
        self.last_error = None
        self.failing_since = None
        return None

    def _failed(self, problem: str) -> str:
        self.last_error = problem
        self.fetch_failures += 1
        if self.failing_since is None:
            self.failing_since = self._clock.seconds()
        return problem

    async def _discover(self) -> str:
        url = self._discovery_url
        document = await self._get_json(url, "discovery document")
        if not isinstance(document, dict):
            raise FetchProblem(f"discovery document at {url} is not a JSON object")
        issuer = document.get("issuer")
        if issuer != self._config.issuer_url:
            raise FetchProblem(
                f"discovery document at {url} names issuer {show(issuer)}, "
                f"not {self._config.issuer_url!r}; refusing its keys"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise FetchProblem(f"discovery document at {url} has no jwks_uri")
        scheme = urlsplit(jwks_uri).scheme
        allowed = {"https"} if urlsplit(url).scheme == "https" else {"http", "https"}
        if scheme not in allowed or not urlsplit(jwks_uri).netloc:
            raise FetchProblem(
                f"discovery document at {url} has jwks_uri {show(jwks_uri)}, "
                f"not an absolute {'/'.join(sorted(allowed))} URL"
            )
        return jwks_uri

    async def _load_jwks(self, uri: str) -> None:
        self.jwks_fetches += 1
        self._last_jwks_fetch = self._clock.seconds()
        document = await self._get_json(uri, "JWKS")
        try:
            keys, skipped = parse_jwks(document)
        except ValueError as e:
            raise FetchProblem(f"JWKS at {uri}: {e}") from None
        for problem in skipped:
            self.log.warn(
                "Skipping a key in the JWKS at {uri}: {problem}", uri=uri, problem=problem
            )
        if not keys.keys:
            raise FetchProblem(f"JWKS at {uri} has no usable signing keys")
        before = self._keys
        self._keys = keys
        self.keys_loaded_at = self._clock.seconds()
        changed = before is None or before.kids() != keys.kids()
        (self.log.info if changed else self.log.debug)(
            "Loaded {count} signing key(s) for {issuer} from {uri}: {kids}",
            count=len(keys.keys),
            issuer=self._config.issuer_url,
            uri=uri,
            kids=", ".join(keys.kids()),
        )

    async def _get_json(self, url: str, what: str) -> Any:
        request = Deferred.fromCoroutine(self._get(url, what))
        # Whatever error the cancelled request ends with, report the timeout.
        request.addTimeout(
            self._fetch_timeout,
            self._clock,
            onTimeoutCancel=lambda result, timeout: Failure(TimeoutError()),
        )
        try:
            body = await request
        except (CancelledError, FetchProblem):
            raise
        except TimeoutError:
            raise FetchProblem(
                f"{what} at {url} did not arrive within {self._fetch_timeout:g}s"
            ) from None
        except Exception as e:
            if _cancelled(e):
                # stop() cancelled the fetch; the HTTP client wraps the CancelledError.
                raise CancelledError() from None
            raise FetchProblem(f"fetching {what} at {url} failed: {e}") from None
        try:
            return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FetchProblem(f"{what} at {url} is not JSON") from None

    async def _get(self, url: str, what: str) -> bytes:
        response = await self._http.get(url, headers={b"Accept": [b"application/json"]})
        body = await self._read(response, what)
        if response.code != 200:
            raise FetchProblem(f"{what} at {url} answered HTTP {response.code}")
        return body

    def _read(self, response: Any, what: str) -> Deferred:
        finished: Deferred = Deferred()
        response.deliverBody(_BoundedBody(finished, self._max_document_size, what))
        return finished

    def _wait_for_keys(self, refetch: bool) -> Deferred | None:
        """
        Something to wait on for fresher keys, or ``None`` if none are coming.

        A fetch in flight is shared.  Otherwise, with ``refetch`` and while started,
        the JWKS is fetched again unless one was fetched less than
        ``jwks_min_refetch_interval`` ago.
        """
        if self._in_flight is None:
            if not refetch or not self._running or self._jwks_uri is None:
                return None
            last = self._last_jwks_fetch
            if (
                last is not None
                and self._clock.seconds() - last < self._config.jwks_min_refetch_interval
            ):
                return None
            self._fetch(discover=False).addCallback(self._refetch_done)
            if self._in_flight is None:
                return succeed(None)
        waiter: Deferred = Deferred(canceller=self._forget_waiter)
        self._waiters.append(waiter)
        return waiter

    def _forget_waiter(self, waiter: Deferred) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _refetch_done(self, problem: str | None) -> None:
        if problem is not None and problem != "stopped":
            self.log.warn(
                "Refetching signing keys for {issuer} after an unknown key id failed: "
                "{problem}",
                issuer=self._config.issuer_url,
                problem=problem,
            )

    # -- verification ----------------------------------------------------------

    def cached(self, token: str | bytes) -> VerifiedToken | None:
        """
        ``token``'s verification result if it is cached and not yet expired, else ``None``.

        This is the fast path `verify` takes first (a hash and a dictionary lookup, no
        Deferred); a caller on a hot path may try it before `verify`.
        """
        return self._lookup(_digest(token), self._clock.seconds())

    def _lookup(self, digest: bytes, now: float) -> VerifiedToken | None:
        cache = self._cache
        cached = cache.get(digest)
        if cached is not None:
            if now < cached.expires_at:
                cache.move_to_end(digest)
                return cached
            del cache[digest]
        return None

    def verify(self, token: str | bytes) -> Deferred:
        """
        Verify ``token``, an ID token.

        :return: a ``Deferred`` firing with a `VerifiedToken`, or failing with
            `TokenRejected`.  It has fired already when the token is cached or its key
            is loaded; it waits only for a refetch after an unknown key id, or for a
            first key load in flight.
        """
        now = self._clock.seconds()
        digest = _digest(token)
        cached = self._lookup(digest, now)
        if cached is not None:
            return succeed(cached)

        try:
            parsed = parse_token(token)
            if parsed.alg not in self._algorithms:
                raise TokenRejected(
                    "algorithm",
                    f"token algorithm {show(parsed.alg)} is not allowed "
                    f"(allowed: {', '.join(sorted(self._algorithms)) or 'none'})",
                )
            check_issuer(parsed.claims, self._config.issuer_url)
            verified = self._attempt(parsed, digest, now, final=False)
        except TokenRejected:
            return fail()
        if verified is not None:
            return succeed(verified)

        waiting = self._wait_for_keys(refetch=self._keys is not None)
        if waiting is None:
            return self._final_attempt(None, parsed, digest)
        return waiting.addCallback(self._final_attempt, parsed, digest)

    def _final_attempt(self, _: object, parsed: ParsedToken, digest: bytes) -> Deferred:
        try:
            return succeed(
                self._attempt(parsed, digest, self._clock.seconds(), final=True)
            )
        except TokenRejected:
            return fail()

    def _attempt(
        self, parsed: ParsedToken, digest: bytes, now: float, final: bool
    ) -> VerifiedToken | None:
        """
        Verify with the keys at hand.

        :return: the verified token, or ``None`` when fresher keys might help and
            this is not the ``final`` attempt.
        :raises TokenRejected: when the token is refused.
        """
        keys = self._keys
        if keys is None:
            if not final:
                return None
            raise TokenRejected(
                "keys_unavailable",
                f"signing keys for {self._config.issuer_url} are not loaded yet"
                + (f" ({self.last_error})" if self.last_error else ""),
            )
        kid = parsed.kid
        if kid is not None:
            candidates = keys.by_kid.get(kid)
            if candidates is None:
                if not final:
                    return None
                raise TokenRejected(
                    "unknown_kid",
                    f"no signing key with kid {show(kid)} in the JWKS of "
                    f"{self._config.issuer_url}",
                )
            if not any(key.fits(parsed.alg) for key in candidates):
                raise TokenRejected(
                    "signature",
                    f"key kid {show(kid)} cannot check {parsed.alg} signatures",
                )
        else:
            candidates = keys.keys
        if check_signature(parsed, candidates) is None:
            if kid is None and not final:
                # Perhaps signed by a new key: look once more.
                return None
            raise TokenRejected(
                "signature",
                f"bad {parsed.alg} signature"
                + (f" for kid {show(kid)}" if kid is not None else " (token has no kid)")
                + f" on a token for sub {show(parsed.claims.get('sub'))}",
            )
        verified = check_claims(parsed.claims, self._config, now, self._max_groups)
        self._remember(digest, verified, now)
        return verified

    def _remember(self, digest: bytes, verified: VerifiedToken, now: float) -> None:
        size = self._config.token_cache_size
        if size <= 0 or verified.expires_at <= now:
            return
        cache = self._cache
        cache[digest] = verified
        cache.move_to_end(digest)
        while len(cache) > size:
            cache.popitem(last=False)

