"""
Tests for `banyan_kproxy.identity.impersonation`: ``Impersonate-*`` headers parsed as
kube-apiserver parses them, and ``kubectl --as`` authorized with SubjectAccessReviews
against the Kubernetes API stand-in, in memory.
"""

from __future__ import annotations

import json
from typing import Any

from treq import content
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from banyan_kproxy.identity import (
    ORIGINAL_GROUPS_EXTRA,
    ORIGINAL_UID_EXTRA,
    ORIGINAL_USER_EXTRA,
    Identity,
    ImpersonationAuthorizer,
    ImpersonationDenied,
    ImpersonationError,
    ImpersonationUnavailable,
    RequestedImpersonation,
)
from banyan_kproxy.status import go_quote
from banyan_kproxy.proxy.headers import upstream_request_headers
from banyan_kproxy.testing.kubeapi import UserInfo
from tests.test_tokenreview import CannedAnswer, Harness, shipped_rbac

#: The verified (OIDC) user who asks to impersonate.
ME = Identity("banyan:me@example.com", ("banyan:admins",))
#: The same user's credential at the stand-in, to compare with its own answers.
ME_TOKEN = "me-token"
ME_AT_STANDIN = UserInfo(ME.user, ME.groups)

#: What ``banyan:admins`` may impersonate, and what alice may do.
IMPERSONATION_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: impersonate-some}
rules:
- apiGroups: [""]
  resources: ["users"]
  resourceNames: ["alice"]
  verbs: ["impersonate"]
- apiGroups: [""]
  resources: ["groups"]
  resourceNames: ["dev", "a,b", "system:authenticated"]
  verbs: ["impersonate"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  resourceNames: ["deployer"]
  verbs: ["impersonate"]
- apiGroups: ["authentication.k8s.io"]
  resources: ["userextras/scopes"]
  resourceNames: ["view", "edit"]
  verbs: ["impersonate"]
- apiGroups: ["authentication.k8s.io"]
  resources: ["uids"]
  resourceNames: ["alice-uid"]
  verbs: ["impersonate"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: admins-impersonate-some}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: impersonate-some}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "banyan:admins"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: list-namespaces}
rules:
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: list-namespaces}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: list-namespaces}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:serviceaccounts:ci"}
"""

SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


def headers(*lines: tuple[str, str]) -> Headers:
    """
    Request headers with these (name, value) lines, names as given.
    """
    out = Headers()
    for name, value in lines:
        out.addRawHeader(name.encode("latin-1"), value.encode("utf-8"))
    return out


def requested(*lines: tuple[str, str]) -> RequestedImpersonation:
    """
    The impersonation these header lines ask for (which must be one).
    """
    parsed = RequestedImpersonation.from_headers(headers(*lines))
    assert parsed is not None
    return parsed


class ImpersonationHarness(Harness):
    """
    The stand-in with the shipped RBAC and `IMPERSONATION_RBAC`, and an authorizer.
    """

    def __init__(self, case: SynchronousTestCase, rbac: list[str] | None = None) -> None:
        super().__init__(
            case,
            tokens={ME_TOKEN: ME_AT_STANDIN},
            rbac=[shipped_rbac(), IMPERSONATION_RBAC] if rbac is None else rbac,
        )
        self.authorizer = ImpersonationAuthorizer(
            self.upstream, self.clock, cache_ttl=10.0, cooperator=self.cooperator
        )

    def reviews(self) -> list[dict[str, Any]]:
        """
        The SubjectAccessReviews the stand-in received, as decoded bodies.
        """
        return [json.loads(r.body) for r in self.standin.requests if r.path == SAR_PATH]

    def authorize(self, *lines: tuple[str, str], requester: Identity = ME) -> Any:
        """
        Authorize ``requester`` for these impersonation headers and pump to the end.
        """
        d = self.authorizer.authorize(requester, requested(*lines))
        self.pump()
        return d

    def direct(self, *lines: tuple[str, str]) -> tuple[int, bytes]:
        """
        The stand-in's own answer when the user sends these headers to it directly.
        """
        request = headers(("Authorization", "Bearer " + ME_TOKEN), *lines)
        d = self.traversal.request(
            b"GET", b"https://kube.example.com:6443/api/v1/namespaces", request
        )
        responses: list[Any] = []
        d.addCallback(lambda response: content(response).addCallback(
            lambda body: responses.append((response.code, body))
        ))
        self.traversal.flush()
        assert responses, "the stand-in did not answer"
        return responses[0]


class HeaderTests(SynchronousTestCase):
    """
    ``Impersonate-*`` headers are read the way kube-apiserver reads them.
    """

    def test_none(self) -> None:
        """
        A request without impersonation headers (or with only an empty user) asks
        for none.
        """
        self.assertIsNone(RequestedImpersonation.from_headers(headers(("Accept", "*/*"))))
        self.assertIsNone(RequestedImpersonation.from_headers(headers(("Impersonate-User", ""))))

    def test_names_any_case(self) -> None:
        """
        Header names are matched in any case; extra keys are lower-cased.
        """
        self.assertEqual(
            requested(
                ("impersonate-user", "alice"),
                ("IMPERSONATE-GROUP", "dev"),
                ("iMpErSoNaTe-ExTrA-Scopes", "view"),
                ("impersonate-UID", "alice-uid"),
            ),
            RequestedImpersonation("alice", ("dev",), (("scopes", ("view",)),), "alice-uid"),
        )

    def test_groups_one_per_line(self) -> None:
        """
        Every Impersonate-Group line is one group, in order; commas are kept.
        """
        self.assertEqual(
            requested(
                ("Impersonate-User", "alice"),
                ("Impersonate-Group", "a,b"),
                ("Impersonate-Group", "c"),
                ("impersonate-group", "dev, ops"),
            ).groups,
            ("a,b", "c", "dev, ops"),
        )

    def test_extra_keys_unescaped(self) -> None:
        """
        Extra keys are percent-decoded after lower-casing; a malformed escape keeps the
        key as it came; repeated lines add values.
        """
        self.assertEqual(
            requested(
                ("Impersonate-User", "alice"),
                ("Impersonate-Extra-Example.COM%2fTeam", "x"),
                ("Impersonate-Extra-example.com%2FTeam", "y"),
                ("Impersonate-Extra-Bad%zz", "z"),
                ("Impersonate-Extra-Scopes", "a,b"),
                ("Impersonate-Extra-scopes", "c"),
            ).extra,
            (("example.com/team", ("x", "y")), ("bad%zz", ("z",)), ("scopes", ("a,b", "c"))),
        )

    def test_first_user(self) -> None:
        """
        Of several Impersonate-User lines, the first counts (Go's Header.Get).
        """
        self.assertEqual(
            requested(("Impersonate-User", "alice"), ("Impersonate-User", "bob")).user, "alice"
        )

    def test_without_user(self) -> None:
        """
        Groups, extras or a uid without a user are the error kube-apiserver gives, with
        the requests listed as it lists them.
        """
        cases = [
            ([("Impersonate-Group", "dev")], "requested [{Group  dev    }] without impersonating a user"),
            ([("Impersonate-Uid", "u1")],
             "requested [{UID  u1  authentication.k8s.io/v1  }] without impersonating a user"),
            ([("Impersonate-Group", "dev"), ("Impersonate-Extra-Scopes", "view")],
             "requested [{Group  dev    } {UserExtra  view  authentication.k8s.io/v1  scopes}]"
             " without impersonating a user"),
            ([("Impersonate-User", ""), ("Impersonate-Group", "dev")],
             "requested [{Group  dev    }] without impersonating a user"),
        ]
        for lines, message in cases:
            with self.assertRaises(ImpersonationError) as raised:
                RequestedImpersonation.from_headers(headers(*lines))
            self.assertEqual((raised.exception.code, raised.exception.message), (500, message))

    def test_without_user_like_apiserver(self) -> None:
        """
        The message is the one the apiserver itself puts in its 500 answer.
        """
        h = ImpersonationHarness(self)
        lines = [("Impersonate-Group", "dev"), ("Impersonate-Extra-Scopes", "view")]
        with self.assertRaises(ImpersonationError) as raised:
            RequestedImpersonation.from_headers(headers(*lines))
        code, body = h.direct(*lines)
        self.assertEqual(
            (code, body.decode()),
            (500, f'Internal Server Error: "/api/v1/namespaces": {raised.exception.message}\n'),
        )

    def test_unsafe_values(self) -> None:
        """
        A value that cannot be carried on in a header is a 400.
        """
        cases = [
            ([("Impersonate-User", "al\x01ice")],
             "Impersonate-User 'al\\x01ice' contains the control character U+0001"),
            ([("Impersonate-User", "alice"), ("Impersonate-Group", "")],
             "Impersonate-Group '' is empty"),
            ([("Impersonate-User", "alice"), ("Impersonate-Extra-A%0Ab", "v")],
             "Impersonate-Extra- key 'a\\nb' contains the control character U+000A"),
            ([("Impersonate-User", "alice"), ("Impersonate-Uid", "u\x7f")],
             "Impersonate-Uid 'u\\x7f' contains the control character U+007F"),
        ]
        for lines, message in cases:
            with self.assertRaises(ImpersonationError) as raised:
                RequestedImpersonation.from_headers(headers(*lines))
            self.assertEqual((raised.exception.code, raised.exception.message), (400, message))
        raw = Headers({b"Impersonate-User": [b"\xff\xfe"]})
        with self.assertRaises(ImpersonationError) as raised:
            RequestedImpersonation.from_headers(raw)
        self.assertEqual(raised.exception.message, "Impersonate-User is not UTF-8")

    def test_checks(self) -> None:
        """
        The checks are kube-apiserver's, in its order: a service account user is
        checked as serviceaccounts in its namespace.
        """
        checks = requested(
            ("Impersonate-User", "system:serviceaccount:ci:deployer"),
            ("Impersonate-Group", "dev"),
            ("Impersonate-Extra-Scopes", "view"),
            ("Impersonate-Uid", "u1"),
        ).checks()
        self.assertEqual(
            [c.resource_attributes() for c in checks],
            [
                {"namespace": "ci", "verb": "impersonate", "resource": "serviceaccounts",
                 "name": "deployer"},
                {"verb": "impersonate", "resource": "groups", "name": "dev"},
                {"verb": "impersonate", "group": "authentication.k8s.io", "version": "v1",
                 "resource": "userextras", "subresource": "scopes", "name": "view"},
                {"verb": "impersonate", "group": "authentication.k8s.io", "version": "v1",
                 "resource": "uids", "name": "u1"},
            ],
        )

    def test_not_a_service_account(self) -> None:
        """
        A user name shaped almost like a service account's is checked as a user.
        """
        for user in ("system:serviceaccount:ci", "system:serviceaccount:ci:a:b",
                     "system:serviceaccount:CI:deployer", "system:serviceaccount::deployer"):
            [check] = requested(("Impersonate-User", user)).checks()
            self.assertEqual((check.resource, check.name), ("users", user))

    def test_impersonated_groups(self) -> None:
        """
        The apiserver's defaults: system:authenticated added unless present (or
        system:unauthenticated is); a service account's groups when none are asked
        for; system:unauthenticated for system:anonymous.
        """
        cases = [
            ([("Impersonate-User", "alice")], ("system:authenticated",)),
            ([("Impersonate-User", "alice"), ("Impersonate-Group", "dev")],
             ("dev", "system:authenticated")),
            ([("Impersonate-User", "alice"), ("Impersonate-Group", "system:unauthenticated")],
             ("system:unauthenticated",)),
            ([("Impersonate-User", "system:serviceaccount:ci:deployer")],
             ("system:serviceaccounts", "system:serviceaccounts:ci", "system:authenticated")),
            ([("Impersonate-User", "system:serviceaccount:ci:deployer"),
              ("Impersonate-Group", "dev")], ("dev", "system:authenticated")),
            ([("Impersonate-User", "system:anonymous")], ("system:unauthenticated",)),
        ]
        for lines, groups in cases:
            self.assertEqual(requested(*lines).impersonated_groups(), groups)

    def test_go_quote(self) -> None:
        """
        Names are quoted as Go's %q quotes them.
        """
        self.assertEqual(go_quote('a"b\\c\td\x01\u00a0é'), '"a\\"b\\\\c\\td\\x01\\u00a0é"')


class AuthorizeTests(SynchronousTestCase):
    """
    ``kubectl --as`` is allowed only when every SubjectAccessReview allows it.
    """

    def test_allowed(self) -> None:
        """
        An allowed user and groups give the requested identity, with
        system:authenticated and extras naming the verified user and groups.
        """
        h = ImpersonationHarness(self)
        d = h.authorize(
            ("Impersonate-User", "alice"),
            ("Impersonate-Group", "dev"),
            ("Impersonate-Group", "a,b"),
        )
        self.assertEqual(
            self.successResultOf(d),
            Identity(
                user="alice",
                groups=("dev", "a,b", "system:authenticated"),
                extra=((ORIGINAL_USER_EXTRA, (ME.user,)), (ORIGINAL_GROUPS_EXTRA, ME.groups)),
            ),
        )
        self.assertEqual(
            (ORIGINAL_USER_EXTRA, ORIGINAL_GROUPS_EXTRA),
            ("originaluser.banyan-kproxy.io/user", "originaluser.banyan-kproxy.io/groups"),
        )

    def test_reviews_sent(self) -> None:
        """
        One SubjectAccessReview per check, all sent before any answer, for the
        verified user with system:authenticated, by the proxy's own service account.
        """
        h = ImpersonationHarness(self)
        d = h.authorizer.authorize(
            ME, requested(("Impersonate-User", "alice"), ("Impersonate-Group", "dev"))
        )
        self.assertEqual(len(h.agent.uris), 2)
        self.assertEqual(h.standin.requests, [])
        h.pump()
        self.successResultOf(d)
        self.assertEqual(
            {r.user for r in h.standin.requests}, {"system:serviceaccount:banyan-kproxy:banyan-kproxy"}
        )
        self.assertEqual(
            sorted(h.reviews(), key=lambda r: r["spec"]["resourceAttributes"]["resource"]),
            [
                {"kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                 "metadata": {"creationTimestamp": None},
                 "spec": {"resourceAttributes": {"verb": "impersonate", "resource": resource,
                                                 "name": name},
                          "user": ME.user, "groups": ["banyan:admins", "system:authenticated"]}}
                for resource, name in (("groups", "dev"), ("users", "alice"))
            ],
        )

    def test_requester_extra_and_uid(self) -> None:
        """
        The verified user's extras and uid go in the review, and the uid is recorded.
        """
        h = ImpersonationHarness(self)
        me = Identity(ME.user, ME.groups, (("acr", ("mfa",)),), uid="me-uid")
        d = h.authorize(("Impersonate-User", "alice"), requester=me)
        identity = self.successResultOf(d)
        [review] = h.reviews()
        self.assertEqual(
            (review["spec"]["extra"], review["spec"]["uid"]), ({"acr": ["mfa"]}, "me-uid")
        )
        self.assertEqual(
            identity.extra,
            ((ORIGINAL_USER_EXTRA, (ME.user,)), (ORIGINAL_GROUPS_EXTRA, ME.groups),
             (ORIGINAL_UID_EXTRA, ("me-uid",))),
        )

    def test_group_denied(self) -> None:
        """
        One group denied refuses the whole request with the apiserver's Forbidden
        message for that group, word for word as the apiserver gives it.
        """
        h = ImpersonationHarness(self)
        lines = [("Impersonate-User", "alice"), ("Impersonate-Group", "dev"),
                 ("Impersonate-Group", "ops")]
        error = self.failureResultOf(h.authorize(*lines), ImpersonationDenied).value
        self.assertEqual(
            (error.code, error.message, error.details),
            (403,
             'groups "ops" is forbidden: User "banyan:me@example.com" cannot impersonate'
             ' resource "groups" in API group "" at the cluster scope',
             {"name": "ops", "kind": "groups"}),
        )
        code, body = h.direct(*lines)
        self.assertEqual((code, json.loads(body)["message"]), (403, error.message))

    def test_user_denied(self) -> None:
        """
        A user the requester may not impersonate is refused with the apiserver's message.
        """
        h = ImpersonationHarness(self)
        error = self.failureResultOf(
            h.authorize(("Impersonate-User", "bob")), ImpersonationDenied
        ).value
        self.assertEqual(
            error.message,
            'users "bob" is forbidden: User "banyan:me@example.com" cannot impersonate'
            ' resource "users" in API group "" at the cluster scope',
        )

    def test_first_denial_reported(self) -> None:
        """
        With several checks denied, the first in the apiserver's order is reported.
        """
        h = ImpersonationHarness(self)
        lines = [("Impersonate-User", "bob"), ("Impersonate-Group", "ops")]
        error = self.failureResultOf(h.authorize(*lines), ImpersonationDenied).value
        code, body = h.direct(*lines)
        self.assertEqual(json.loads(body)["message"], error.message)
        self.assertTrue(error.message.startswith('users "bob" is forbidden'))

    def test_extras(self) -> None:
        """
        Each extra value is checked as userextras with the key as subresource; an
        allowed one is kept, a denied one refused with the apiserver's message.
        """
        h = ImpersonationHarness(self)
        d = h.authorize(
            ("Impersonate-User", "alice"),
            ("Impersonate-Extra-Scopes", "view"),
            ("Impersonate-Extra-Scopes", "edit"),
        )
        self.assertEqual(
            self.successResultOf(d).extra[0], ("scopes", ("view", "edit"))
        )
        extras = [r["spec"]["resourceAttributes"] for r in h.reviews()
                  if r["spec"]["resourceAttributes"]["resource"] == "userextras"]
        self.assertEqual(
            sorted(extras, key=lambda a: a["name"]),
            [{"verb": "impersonate", "group": "authentication.k8s.io", "version": "v1",
              "resource": "userextras", "subresource": "scopes", "name": value}
             for value in ("edit", "view")],
        )
        lines = [("Impersonate-User", "alice"), ("Impersonate-Extra-Scopes", "admin")]
        error = self.failureResultOf(h.authorize(*lines), ImpersonationDenied).value
        self.assertEqual(
            (error.message, error.details),
            ('userextras.authentication.k8s.io "admin" is forbidden: User'
             ' "banyan:me@example.com" cannot impersonate resource "userextras/scopes" in API'
             ' group "authentication.k8s.io" at the cluster scope',
             {"name": "admin", "group": "authentication.k8s.io", "kind": "userextras"}),
        )
        code, body = h.direct(*lines)
        self.assertEqual(json.loads(body)["message"], error.message)

    def test_uid(self) -> None:
        """
        A requested uid is checked as uids and becomes the identity's uid.
        """
        h = ImpersonationHarness(self)
        d = h.authorize(("Impersonate-User", "alice"), ("Impersonate-Uid", "alice-uid"))
        self.assertEqual(self.successResultOf(d).uid, "alice-uid")
        lines = [("Impersonate-User", "alice"), ("Impersonate-Uid", "other")]
        error = self.failureResultOf(h.authorize(*lines), ImpersonationDenied).value
        code, body = h.direct(*lines)
        self.assertEqual(json.loads(body)["message"], error.message)

    def test_service_account(self) -> None:
        """
        A service account is checked as serviceaccounts in its namespace and gets its
        own groups; one in another namespace is refused as the apiserver refuses it.
        """
        h = ImpersonationHarness(self)
        d = h.authorize(("Impersonate-User", "system:serviceaccount:ci:deployer"))
        self.assertEqual(
            self.successResultOf(d).groups,
            ("system:serviceaccounts", "system:serviceaccounts:ci", "system:authenticated"),
        )
        lines = [("Impersonate-User", "system:serviceaccount:ci:builder")]
        error = self.failureResultOf(h.authorize(*lines), ImpersonationDenied).value
        self.assertEqual(
            error.message,
            'serviceaccounts "builder" is forbidden: User "banyan:me@example.com" cannot'
            ' impersonate resource "serviceaccounts" in API group "" in the namespace "ci"',
        )
        code, body = h.direct(*lines)
        self.assertEqual(json.loads(body)["message"], error.message)

    def test_reason_appended(self) -> None:
        """
        A reason in the SubjectAccessReview answer is appended as the apiserver does.
        """
        broken = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: dangling}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: missing}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "banyan:admins"}
"""
        h = ImpersonationHarness(self, rbac=[shipped_rbac(), broken])
        lines = [("Impersonate-User", "alice")]
        error = self.failureResultOf(h.authorize(*lines), ImpersonationDenied).value
        self.assertIn('at the cluster scope: RBAC: clusterrole.rbac.authorization.k8s.io'
                      ' "missing" not found', error.message)
        code, body = h.direct(*lines)
        self.assertEqual(json.loads(body)["message"], error.message)

    def test_reserved_extra(self) -> None:
        """
        A client may not set the original-user extras itself; no review is made.
        """
        h = ImpersonationHarness(self)
        lines = [("Impersonate-User", "alice"),
                 ("Impersonate-Extra-Originaluser.banyan-kproxy.io%2Fuser", "someone-else")]
        error = self.failureResultOf(h.authorize(*lines), ImpersonationDenied).value
        self.assertEqual(
            error.message,
            'userextras.authentication.k8s.io "someone-else" is forbidden: User'
            ' "banyan:me@example.com" cannot impersonate resource'
            ' "userextras/originaluser.banyan-kproxy.io/user" in API group'
            ' "authentication.k8s.io" at the cluster scope: banyan-kproxy sets the extras'
            ' under originaluser.banyan-kproxy.io/ itself',
        )
        self.assertEqual(h.agent.uris, [])

    def test_unavailable(self) -> None:
        """
        Without the optional RBAC role the reviews fail, and the request is a 503
        naming why, not a denial.
        """
        h = ImpersonationHarness(self, rbac=[shipped_rbac(optional=False), IMPERSONATION_RBAC])
        error = self.failureResultOf(
            h.authorize(("Impersonate-User", "alice")), ImpersonationUnavailable
        ).value
        self.assertEqual(
            (error.code, error.message),
            (503,
             'cannot check impersonation: SubjectAccessReview answered HTTP 403:'
             ' subjectaccessreviews.authorization.k8s.io is forbidden: User'
             ' "system:serviceaccount:banyan-kproxy:banyan-kproxy" cannot create resource'
             ' "subjectaccessreviews" in API group "authorization.k8s.io" at the cluster scope'),
        )

    def test_timeout(self) -> None:
        """
        Reviews that get no answer in time make the request unavailable.
        """
        h = Harness(self, resource=CannedAnswer(body=None))
        authorizer = ImpersonationAuthorizer(h.upstream, h.clock, cooperator=h.cooperator)
        d = authorizer.authorize(ME, requested(("Impersonate-User", "alice")))
        h.pump()
        self.assertNoResult(d)
        h.clock.advance(10)
        error = self.failureResultOf(d, ImpersonationUnavailable).value
        self.assertEqual(
            error.message, "cannot check impersonation: no SubjectAccessReview answer within 10s"
        )


class CacheTests(SynchronousTestCase):
    """
    SubjectAccessReview decisions are remembered briefly.
    """

    def test_cached(self) -> None:
        """
        The same request within cache_ttl makes no review, allowed or denied; after
        it, the apiserver is asked again.
        """
        h = ImpersonationHarness(self)
        lines = [("Impersonate-User", "alice"), ("Impersonate-Group", "ops")]
        self.failureResultOf(h.authorize(*lines), ImpersonationDenied)
        self.assertEqual(len(h.reviews()), 2)
        h.clock.advance(9)
        self.failureResultOf(
            h.authorizer.authorize(ME, requested(*lines)), ImpersonationDenied
        )
        self.assertEqual(len(h.reviews()), 2)
        h.clock.advance(1)
        self.failureResultOf(h.authorize(*lines), ImpersonationDenied)
        self.assertEqual(len(h.reviews()), 4)

    def test_per_requester(self) -> None:
        """
        A decision for one user is not used for another.
        """
        h = ImpersonationHarness(self)
        self.successResultOf(h.authorize(("Impersonate-User", "alice")))
        other = Identity("banyan:other@example.com", ("banyan:everyone",))
        self.failureResultOf(
            h.authorize(("Impersonate-User", "alice"), requester=other), ImpersonationDenied
        )
        self.assertEqual(len(h.reviews()), 2)

    def test_bounded(self) -> None:
        """
        No more than cache_size decisions are kept.
        """
        h = ImpersonationHarness(self)
        h.authorizer = ImpersonationAuthorizer(
            h.upstream, h.clock, cache_size=2, cooperator=h.cooperator
        )
        for group in ("dev", "a,b", "ops"):
            h.authorize(("Impersonate-User", "alice"), ("Impersonate-Group", group)).addErrback(
                lambda f: None
            )
        self.assertEqual(len(h.authorizer._cache), 2)


class EndToEndTests(SynchronousTestCase):
    """
    The authorized identity, sent by the proxy, is accepted by the apiserver with the
    shipped RBAC, and its audit record names both users.
    """

    def send(self, h: ImpersonationHarness, identity: Identity) -> Any:
        """
        Send a namespace list upstream as the proxy would, impersonating ``identity``.
        """
        d = h.upstream.request(
            b"GET", b"/api/v1/namespaces", upstream_request_headers(Headers(), identity, None)
        )
        h.pump()
        self.successResultOf(d)
        return h.standin.requests[-1]

    def test_user_and_groups(self) -> None:
        """
        The apiserver serves the request as the impersonated user, with the original
        user and groups in its extras.
        """
        h = ImpersonationHarness(self)
        identity = self.successResultOf(
            h.authorize(("Impersonate-User", "alice"), ("Impersonate-Group", "dev"))
        )
        served = self.send(h, identity)
        self.assertEqual(
            (served.code, served.requester.name, served.user, served.groups, served.extra),
            (200, "system:serviceaccount:banyan-kproxy:banyan-kproxy", "alice",
             ("dev", "system:authenticated"),
             (("originaluser.banyan-kproxy.io/user", (ME.user,)),
              ("originaluser.banyan-kproxy.io/groups", ME.groups))),
        )

    def test_service_account(self) -> None:
        """
        A service account can be impersonated through the proxy with the optional role.
        """
        h = ImpersonationHarness(self)
        identity = self.successResultOf(
            h.authorize(("Impersonate-User", "system:serviceaccount:ci:deployer"))
        )
        served = self.send(h, identity)
        self.assertEqual((served.code, served.user), (200, "system:serviceaccount:ci:deployer"))
