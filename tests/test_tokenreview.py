"""
Tests for `banyan_kproxy.identity.tokenreview`: token passthrough with TokenReview,
driven in memory against the Kubernetes API stand-in (or a canned answer) through the
real `Upstream` client.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock, Cooperator
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from banyan_kproxy.config import TokenPassthroughConfig, UpstreamConfig
from banyan_kproxy.identity import (
    PASSTHROUGH_REJECTION_REASONS,
    Identity,
    TokenRejected,
    TokenReviewer,
)
from banyan_kproxy.identity.tokenreview import ExpiringLRU, TokenBucket
from banyan_kproxy.proxy.upstream import TokenFile, Upstream
from banyan_kproxy.testing.kubeapi import KubeAPIStandIn, UserInfo
from banyan_kproxy.testing.stack import PROXY_SERVICE_ACCOUNT, proxy_rbac_yaml
from tests.test_proxy import LogCapture

#: A plausible "now" for the test clock.
NOW = 1_700_000_000.0

#: The proxy's own credential at the stand-in.
PROXY_TOKEN = "proxy-sa-token"

#: A service-account token as `kubectl create token` would give one.
SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.sa-token-for-ci.signature"
SA_USER = UserInfo(
    "system:serviceaccount:ci:deployer",
    ("system:serviceaccounts", "system:serviceaccounts:ci"),
    uid="0e7b6c1a-1111-4a4a-9c9c-123456789abc",
)

#: The name of the optional ClusterRole (and binding) in the shipped RBAC file.
OPTIONAL_ROLE = "banyan-kproxy-reviewer"


def shipped_rbac(optional: bool = True) -> str:
    """
    The shipped ``kubernetes-rbac.yaml``, with or without its optional role.
    """
    text = proxy_rbac_yaml()
    if optional:
        return text
    documents = [
        d for d in yaml.safe_load_all(text)
        if d and (d.get("metadata") or {}).get("name") != OPTIONAL_ROLE
    ]
    return yaml.safe_dump_all(documents)


class CountingAgent:
    """
    An IAgent that counts the requests it passes on to another.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.uris: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred:
        """
        Record ``uri`` and send the request.
        """
        self.uris.append(uri)
        return self.agent.request(method, uri, headers, body)


class FailingAgent:
    """
    An IAgent whose every request fails with one error.
    """

    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred:
        """
        Fail at once.
        """
        return fail(self.error)


class CannedAnswer(Resource):
    """
    Answers every request with one status code and body, or never (``body=None``).
    """

    isLeaf = True

    def __init__(self, code: int = 201, body: Any = None, raw: bytes | None = None) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.raw = raw
        self.received: list[dict[str, Any]] = []
        self.pending: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        """
        Record the JSON request body and give the canned answer.
        """
        self.received.append(json.loads(request.content.read()))
        if self.body is None and self.raw is None:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"application/json")
        return self.raw if self.raw is not None else json.dumps(self.body).encode("utf-8")


class Harness:
    """
    An `Upstream` whose agent serves ``resource`` (the stand-in by default) in
    memory, on a test clock, with a cooperator the test runs by hand.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        tokens: dict[str, UserInfo] | None = None,
        rbac: list[str] | None = None,
        resource: Resource | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.standin = KubeAPIStandIn(
            tokens={PROXY_TOKEN: PROXY_SERVICE_ACCOUNT, **(tokens or {})},
            rbac_yaml=[shipped_rbac()] if rbac is None else rbac,
            clock=self.clock,
        )
        self.traversal = RequestTraversalAgent(
            resource if resource is not None else self.standin.resource()
        )
        self.agent = CountingAgent(self.traversal)
        token_path = case.mktemp()
        with open(token_path, "w") as f:
            f.write(PROXY_TOKEN + "\n")
        token = TokenFile(token_path, self.clock)
        token.load()
        self.upstream = Upstream(UpstreamConfig("https://kube.example.com:6443/"), self.agent, token)
        self._steps: list[Any] = []
        self.cooperator = Cooperator(
            scheduler=lambda step: self._steps.append(step) or _NotCancelled(), started=True
        )

    def pump(self) -> None:
        """
        Run request-body producers and move bytes both ways until nothing is left.
        """
        for _ in range(50):
            while self._steps:
                self._steps.pop(0)()
            self.traversal.flush()
            if not self._steps:
                return
        raise AssertionError("the exchange did not settle")

    def reviewer(self, **config: Any) -> TokenReviewer:
        """
        A `TokenReviewer` over this harness's upstream with ``config`` settings.
        """
        return TokenReviewer(
            TokenPassthroughConfig(enabled=True, **config),
            self.upstream,
            self.clock,
            cooperator=self.cooperator,
        )

    def reviews(self) -> list[dict[str, Any]]:
        """
        The TokenReview requests the stand-in received, as decoded bodies.
        """
        return [
            json.loads(r.body) for r in self.standin.requests
            if r.path == "/apis/authentication.k8s.io/v1/tokenreviews"
        ]


class _NotCancelled:
    def cancel(self) -> None:
        pass


class ReviewTests(SynchronousTestCase):
    """
    What a TokenReview answer turns into.
    """

    def test_service_account_token(self) -> None:
        """
        A service-account token the apiserver accepts becomes its user name, groups
        and uid, asked with one TokenReview POSTed as JSON with the proxy's credential.
        """
        h = Harness(self, tokens={SA_TOKEN: SA_USER})
        d = h.reviewer().review(SA_TOKEN)
        h.pump()
        self.assertEqual(
            self.successResultOf(d),
            Identity(
                user="system:serviceaccount:ci:deployer",
                groups=("system:serviceaccounts", "system:serviceaccounts:ci",
                        "system:authenticated"),
                uid="0e7b6c1a-1111-4a4a-9c9c-123456789abc",
            ),
        )
        [request] = h.standin.requests
        self.assertEqual(
            (request.method, request.path, request.code, request.user),
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews", 201, PROXY_SERVICE_ACCOUNT.name),
        )
        self.assertEqual(request.header_values("Content-Type"), [b"application/json"])
        self.assertEqual(request.header_values("Authorization"), [b"Bearer " + PROXY_TOKEN.encode()])
        self.assertEqual(
            json.loads(request.body),
            {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
             "metadata": {"creationTimestamp": None}, "spec": {"token": SA_TOKEN}},
        )

    def test_unauthenticated(self) -> None:
        """
        A token the apiserver does not accept is refused as passthrough_denied with the
        apiserver's error, and the detail never holds the token.
        """
        h = Harness(self)
        d = h.reviewer().review("not-a-known-token")
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(error.reason, "passthrough_denied")
        self.assertEqual(
            error.detail, "the apiserver did not authenticate the token: 'invalid bearer token'"
        )

    def test_error_echoing_token(self) -> None:
        """
        An apiserver error that quotes the token is reported with the token replaced.
        """
        token = "secret-token-value"
        answer = {"status": {"authenticated": False, "error": f"token {token} is unknown"}}
        h = Harness(self, resource=CannedAnswer(body=answer))
        logs = LogCapture(self)
        d = h.reviewer().review(token)
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            error.detail, "the apiserver did not authenticate the token: 'token <token> is unknown'"
        )
        self.assertNotIn(token, logs.text())

    def test_bad_user_name(self) -> None:
        """
        An authenticated user whose name could not be carried in a header is refused.
        """
        h = Harness(self, tokens={"t": UserInfo("evil\r\nImpersonate-User: admin", ("g",))})
        d = h.reviewer().review("t")
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_denied",
             "TokenReview user name 'evil\\r\\nImpersonate-User: admin' contains the control"
             " character U+000D"),
        )

    def test_bad_group(self) -> None:
        """
        A group with a control character is refused like a bad user name.
        """
        h = Harness(self, tokens={"t": UserInfo("alice", ("ok", "bad\x00group"))})
        d = h.reviewer().review("t")
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(error.reason, "passthrough_denied")
        self.assertIn("TokenReview group 'bad\\x00group' contains the control character U+0000",
                      error.detail)

    def test_extra(self) -> None:
        """
        The user's extras become the identity's, keys sorted, values in order.
        """
        answer = {"status": {"authenticated": True, "user": {
            "username": "alice", "groups": ["dev"],
            "extra": {"scopes": ["b", "a"], "authentication.kubernetes.io/pod-name": ["p"]},
        }}}
        h = Harness(self, resource=CannedAnswer(body=answer))
        d = h.reviewer().review("t")
        h.pump()
        self.assertEqual(
            self.successResultOf(d),
            Identity("alice", ("dev",),
                     (("authentication.kubernetes.io/pod-name", ("p",)), ("scopes", ("b", "a")))),
        )


class AudienceTests(SynchronousTestCase):
    """
    Configured audiences are asked for and checked in the answer.
    """

    def test_audiences_sent_and_matched(self) -> None:
        """
        Configured audiences go in spec.audiences, and an answer granting one of them
        is accepted.
        """
        h = Harness(self, tokens={SA_TOKEN: SA_USER})
        d = h.reviewer(audiences=("https://kube.example.com", "banyan")).review(SA_TOKEN)
        h.pump()
        self.assertEqual(self.successResultOf(d).user, SA_USER.name)
        [review] = h.reviews()
        self.assertEqual(review["spec"]["audiences"], ["https://kube.example.com", "banyan"])

    def test_other_audience(self) -> None:
        """
        An answer whose audiences share none of the configured ones is refused.
        """
        answer = {"status": {"authenticated": True, "audiences": ["elsewhere"],
                             "user": {"username": "alice"}}}
        h = Harness(self, resource=CannedAnswer(body=answer))
        d = h.reviewer(audiences=("banyan",)).review("t")
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_denied", "token audiences ['elsewhere'] share none of banyan"),
        )

    def test_no_audiences_in_answer(self) -> None:
        """
        An answer without audiences (a server that is not audience-aware, or a token
        only for the apiserver) is refused when audiences are configured.
        """
        answer = {"status": {"authenticated": True, "user": {"username": "alice"}}}
        h = Harness(self, resource=CannedAnswer(body=answer))
        d = h.reviewer(audiences=("banyan",)).review("t")
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            error.detail, "TokenReview returned no audiences; one of banyan is required"
        )

    def test_no_audiences_configured(self) -> None:
        """
        Without configured audiences, spec.audiences is not sent and any answer's
        audiences are accepted.
        """
        answer = {"status": {"authenticated": True, "audiences": ["elsewhere"],
                             "user": {"username": "alice"}}}
        resource = CannedAnswer(body=answer)
        h = Harness(self, resource=resource)
        d = h.reviewer().review("t")
        h.pump()
        self.assertEqual(self.successResultOf(d), Identity("alice"))
        self.assertNotIn("audiences", resource.received[0]["spec"])


class UnavailableTests(SynchronousTestCase):
    """
    A review that gets no usable answer is passthrough_unavailable, and not cached.
    """

    def test_forbidden(self) -> None:
        """
        Without the optional RBAC role the apiserver's 403 message is the detail, and
        the next review asks again.
        """
        h = Harness(self, tokens={SA_TOKEN: SA_USER}, rbac=[shipped_rbac(optional=False)])
        reviewer = h.reviewer()
        d = reviewer.review(SA_TOKEN)
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_unavailable",
             'TokenReview answered HTTP 403: tokenreviews.authentication.k8s.io is forbidden:'
             ' User "system:serviceaccount:banyan-kproxy:banyan-kproxy" cannot create resource'
             ' "tokenreviews" in API group "authentication.k8s.io" at the cluster scope'),
        )
        d = reviewer.review(SA_TOKEN)
        h.pump()
        self.assertEqual(self.failureResultOf(d, TokenRejected).value.reason, "passthrough_unavailable")
        self.assertEqual(len(h.agent.uris), 2)

    def test_timeout(self) -> None:
        """
        No answer within the timeout is passthrough_unavailable, and the request is
        abandoned.
        """
        resource = CannedAnswer(body=None)
        h = Harness(self, resource=resource)
        d = h.reviewer().review("t")
        h.pump()
        self.assertNoResult(d)
        self.assertEqual(len(resource.pending), 1)
        h.clock.advance(9.9)
        self.assertNoResult(d)
        h.clock.advance(0.1)
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_unavailable", "no TokenReview answer within 10s"),
        )

    def test_connection_failed(self) -> None:
        """
        A request that fails on the wire is passthrough_unavailable, with the reason the
        HTTP client gives rather than its repr.
        """
        h = Harness(self)
        h.agent.agent = FailingAgent(ResponseNeverReceived([Failure(ConnectionLost("reset by peer"))]))
        d = h.reviewer().review("t")
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_unavailable",
             "TokenReview request failed: Connection to the other side was lost in a"
             " non-clean fashion: reset by peer."),
        )

    def test_not_json(self) -> None:
        """
        A 201 whose body is not JSON is passthrough_unavailable.
        """
        h = Harness(self, resource=CannedAnswer(raw=b"<html>"))
        d = h.reviewer().review("t")
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_unavailable", "the TokenReview answer is not JSON"),
        )

    def test_too_large(self) -> None:
        """
        An answer larger than the limit is not read whole.
        """
        h = Harness(self, resource=CannedAnswer(raw=b" " * 5000))
        reviewer = TokenReviewer(
            TokenPassthroughConfig(enabled=True), h.upstream, h.clock,
            max_response_size=4096, cooperator=h.cooperator,
        )
        d = reviewer.review("t")
        h.pump()
        error = self.failureResultOf(d, TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_unavailable", "the TokenReview answer is larger than 4096 bytes"),
        )

    def test_reasons(self) -> None:
        """
        Every refusal label is one of the documented ones.
        """
        self.assertEqual(
            PASSTHROUGH_REJECTION_REASONS,
            {"passthrough_denied", "passthrough_unavailable", "passthrough_rate_limited"},
        )


class CacheTests(SynchronousTestCase):
    """
    Answers are remembered briefly, by token digest.
    """

    def test_positive(self) -> None:
        """
        A second review of an accepted token within cache_ttl makes no call; after it,
        the apiserver is asked again.
        """
        h = Harness(self, tokens={SA_TOKEN: SA_USER})
        reviewer = h.reviewer(cache_ttl=10.0)
        first = reviewer.review(SA_TOKEN)
        h.pump()
        identity = self.successResultOf(first)
        h.clock.advance(9.9)
        self.assertEqual(self.successResultOf(reviewer.review(SA_TOKEN)), identity)
        self.assertEqual(len(h.reviews()), 1)
        h.clock.advance(0.1)
        again = reviewer.review(SA_TOKEN)
        self.assertNoResult(again)
        h.pump()
        self.assertEqual(self.successResultOf(again), identity)
        self.assertEqual(len(h.reviews()), 2)

    def test_negative(self) -> None:
        """
        A refused token is refused again at once, without a call, until cache_ttl passes.
        """
        h = Harness(self)
        reviewer = h.reviewer(cache_ttl=10.0)
        d = reviewer.review("bad")
        h.pump()
        first = self.failureResultOf(d, TokenRejected).value
        again = self.failureResultOf(reviewer.review("bad"), TokenRejected).value
        self.assertEqual((again.reason, again.detail), (first.reason, first.detail))
        self.assertEqual(len(h.reviews()), 1)
        h.clock.advance(10)
        d = reviewer.review("bad")
        self.assertNoResult(d)
        h.pump()
        self.failureResultOf(d, TokenRejected)
        self.assertEqual(len(h.reviews()), 2)

    def test_keyed_by_digest(self) -> None:
        """
        The cache holds no token, and is bounded by cache_size.
        """
        h = Harness(self)
        reviewer = h.reviewer(cache_size=2)
        for token in ("token-a", "token-b", "token-c"):
            d = reviewer.review(token)
            h.pump()
            self.failureResultOf(d, TokenRejected)
        self.assertEqual(reviewer.cached_tokens, 2)
        keys = list(reviewer._cache._entries)
        self.assertTrue(all(isinstance(k, bytes) and len(k) == 32 for k in keys))
        self.assertNotIn(b"token-c", b"".join(keys))
        # The oldest went first: token-a is asked about again, token-c is not.
        self.failureResultOf(reviewer.review("token-c"), TokenRejected)
        self.assertEqual(len(h.reviews()), 3)
        d = reviewer.review("token-a")
        h.pump()
        self.failureResultOf(d, TokenRejected)
        self.assertEqual(len(h.reviews()), 4)

    def test_lru(self) -> None:
        """
        The least recently used entry is evicted first, and entries expire.
        """
        cache = ExpiringLRU(size=2, ttl=5.0)
        cache.put("a", 1, now=0)
        cache.put("b", 2, now=0)
        self.assertEqual(cache.get("a", now=1), 1)
        cache.put("c", 3, now=1)
        self.assertEqual([cache.get(k, now=2) for k in "abc"], [1, None, 3])
        self.assertIsNone(cache.get("a", now=5))
        self.assertEqual(len(cache), 1)


class RateLimitTests(SynchronousTestCase):
    """
    TokenReview calls are limited by a token bucket on the clock.
    """

    def test_burst_then_refill(self) -> None:
        """
        review_burst calls go through at once, the next is refused at once without a
        call, and one more is allowed after 1/review_qps seconds.
        """
        h = Harness(self)
        reviewer = h.reviewer(review_qps=2.0, review_burst=3)
        allowed = [reviewer.review(f"token-{i}") for i in range(3)]
        error = self.failureResultOf(reviewer.review("token-3"), TokenRejected).value
        self.assertEqual(
            (error.reason, error.detail),
            ("passthrough_rate_limited",
             "more than 3 TokenReviews at once or 2 per second; not asking the apiserver"),
        )
        self.assertEqual(len(h.agent.uris), 3)
        h.pump()
        for d in allowed:
            self.assertEqual(self.failureResultOf(d, TokenRejected).value.reason, "passthrough_denied")
        h.clock.advance(0.4)
        self.failureResultOf(reviewer.review("token-4"), TokenRejected)
        h.clock.advance(0.1)
        d = reviewer.review("token-5")
        h.pump()
        self.assertEqual(self.failureResultOf(d, TokenRejected).value.reason, "passthrough_denied")
        self.assertEqual(len(h.agent.uris), 4)

    def test_cache_hits_are_free(self) -> None:
        """
        Cached answers and shared calls spend nothing from the bucket.
        """
        h = Harness(self, tokens={SA_TOKEN: SA_USER})
        reviewer = h.reviewer(review_qps=1.0, review_burst=1)
        first, second = reviewer.review(SA_TOKEN), reviewer.review(SA_TOKEN)
        h.pump()
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(reviewer.review(SA_TOKEN))
        self.assertEqual(reviewer.calls, 1)

    def test_bucket(self) -> None:
        """
        The bucket never holds more than its burst, however long it waits.
        """
        clock = Clock()
        bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
        clock.advance(1000)
        self.assertEqual([bucket.take() for _ in range(3)], [True, True, False])
        clock.advance(1000)
        self.assertEqual([bucket.take() for _ in range(3)], [True, True, False])


class InFlightTests(SynchronousTestCase):
    """
    Concurrent reviews of one token share one call.
    """

    def test_shared(self) -> None:
        """
        Two reviews of a token made before the answer arrives cause one TokenReview,
        and both get the identity.
        """
        h = Harness(self, tokens={SA_TOKEN: SA_USER})
        reviewer = h.reviewer()
        first, second = reviewer.review(SA_TOKEN), reviewer.review(SA_TOKEN)
        self.assertNoResult(first)
        self.assertNoResult(second)
        h.pump()
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(len(h.reviews()), 1)

    def test_shared_refusal(self) -> None:
        """
        Every caller sharing a refused review gets its own TokenRejected.
        """
        h = Harness(self)
        reviewer = h.reviewer()
        first, second = reviewer.review("bad"), reviewer.review("bad")
        h.pump()
        one = self.failureResultOf(first, TokenRejected).value
        two = self.failureResultOf(second, TokenRejected).value
        self.assertIsNot(one, two)
        self.assertEqual((one.reason, one.detail), (two.reason, two.detail))
        self.assertEqual(len(h.reviews()), 1)

    def test_cancel_one_caller(self) -> None:
        """
        A caller that gives up does not cancel the review another caller waits on.
        """
        h = Harness(self, tokens={SA_TOKEN: SA_USER})
        reviewer = h.reviewer()
        first, second = reviewer.review(SA_TOKEN), reviewer.review(SA_TOKEN)
        first.cancel()
        self.failureResultOf(first)
        h.pump()
        self.assertEqual(self.successResultOf(second).user, SA_USER.name)
