"""
Tests for L{banyan_kproxy.testing.kubeapi}: the Kubernetes API stand-in authenticates,
impersonates and authorizes as kube-apiserver does, serves what kubectl needs, and
works with the real kubectl over TLS.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.iweb import UNKNOWN_LENGTH

import banyan_kproxy
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.kubeapi import (
    KubeAPIStandIn,
    UserInfo,
    human_duration,
    listen,
    parse_token_spec,
    request_info,
)
from banyan_kproxy.testing.rbac import seed_rbac_yaml
from banyan_kproxy.tls import ServerTLS

PROXY_TOKEN = "proxy-token"
ADMIN_TOKEN = "admin-token"
PROXY_SA = UserInfo.service_account("banyan-kproxy", "banyan-kproxy")
USER = "banyan:myuser@example.com"
READER = "banyan:any-employee-personal-device"
ADMIN = "banyan:all-admins-corporate-device"
BASE = "https://kube.example"

#: What the proxy's service account may impersonate in these tests.
IMPERSONATOR_YAML = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: banyan-kproxy-impersonator
rules:
- apiGroups: [""]
  resources: ["users", "groups"]
  verbs: ["impersonate"]
- apiGroups: ["authentication.k8s.io"]
  resources: ["userextras/remote-client-ip", "uids"]
  verbs: ["impersonate"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: banyan-kproxy-impersonator
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: banyan-kproxy-impersonator
subjects:
- kind: ServiceAccount
  name: banyan-kproxy
  namespace: banyan-kproxy
"""

SERVICES_FORBIDDEN = (
    'services is forbidden: User "banyan:myuser@example.com" cannot list resource "services"'
    ' in API group "" in the namespace "default"'
)
TABLE_ACCEPT = (
    "application/json;as=Table;v=v1;g=meta.k8s.io,"
    "application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
)


def as_user(user: str = USER, *groups: str, token: str = PROXY_TOKEN) -> dict[str, Any]:
    """
    Request headers for the proxy's credential impersonating ``user`` in ``groups``.
    """
    headers: dict[str, Any] = {
        "Authorization": f"Bearer {token}",
        "Impersonate-User": user,
    }
    if groups:
        headers["Impersonate-Group"] = list(groups)
    return headers


class StandInMixin:
    """
    A stand-in with the seed's RBAC behind StubTreq, and helpers to call it.
    """

    def make_standin(
        self, rbac_yaml: Sequence[str] = (IMPERSONATOR_YAML,), **kwargs: Any
    ) -> KubeAPIStandIn:
        """
        A stand-in knowing the proxy and admin tokens, on a fresh clock.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.standin = KubeAPIStandIn(
            tokens={
                PROXY_TOKEN: PROXY_SA,
                ADMIN_TOKEN: UserInfo("kubernetes-admin", ("system:masters",)),
            },
            rbac_yaml=[*rbac_yaml, seed_rbac_yaml()],
            clock=self.clock,
            **kwargs,
        )
        self.treq = StubTreq(self.standin.resource())
        return self.standin

    def call(
        self,
        method: str,
        path: str,
        headers: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> tuple[int, Any, bytes]:
        """
        One complete request: status code, response headers and body.
        """
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers = {**(headers or {}), "Content-Type": "application/json"}
        d = self.treq.request(method, BASE + path, headers=headers, data=data)
        self.treq.flush()
        response = self.successResultOf(d)  # type: ignore[attr-defined]
        content = self.successResultOf(self.treq.content(response))  # type: ignore[attr-defined]
        return response.code, response.headers, content

    def json_call(self, method: str, path: str, headers: Mapping[str, Any] | None = None,
                  body: Any = None) -> tuple[int, Any]:
        """
        One complete request whose answer is JSON: status code and decoded body.
        """
        code, _, content = self.call(method, path, headers, body)
        return code, json.loads(content)

    def open_stream(self, path: str, headers: Mapping[str, Any]) -> tuple[Any, list[bytes]]:
        """
        Start a streaming request (watch, logs -f); return the response and the list its
        body chunks are appended to as they arrive.
        """
        d = self.treq.request("GET", BASE + path, headers=headers, unbuffered=True)
        self.treq.flush()
        response = self.successResultOf(d)  # type: ignore[attr-defined]
        chunks: list[bytes] = []
        response.done = self.treq.collect(response, chunks.append)
        self.treq.flush()
        return response, chunks

    def events(self, chunks: list[bytes]) -> list[dict[str, Any]]:
        """
        The watch events received so far.
        """
        self.treq.flush()
        return [json.loads(line) for line in b"".join(chunks).splitlines() if line]


class AuthenticationTests(StandInMixin, SynchronousTestCase):
    """
    Only configured credentials get in; everything else gets the apiserver's 401.
    """

    UNAUTHORIZED = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }

    def setUp(self) -> None:
        self.make_standin()
        self.standin.add_pod("web-1")

    def test_no_credentials(self) -> None:
        """
        A request without credentials gets 401 Unauthorized and is recorded with no user.
        """
        code, body = self.json_call("GET", "/api/v1/namespaces/default/pods")
        self.assertEqual((code, body), (401, self.UNAUTHORIZED))
        [recorded] = self.standin.requests
        self.assertEqual((recorded.requester, recorded.user, recorded.code), (None, None, 401))

    def test_unknown_and_malformed_credentials(self) -> None:
        """
        An unknown bearer token, an empty one and Basic credentials all get 401.
        """
        for value in ["Bearer nope", "Bearer ", "Basic YWRtaW46YWRtaW4=", PROXY_TOKEN]:
            code, body = self.json_call("GET", "/version", {"Authorization": value})
            self.assertEqual((code, body), (401, self.UNAUTHORIZED), value)

    def test_token_authenticates(self) -> None:
        """
        A configured token is served as its user, with system:authenticated added once.
        """
        code, body = self.json_call(
            "GET", "/api/v1/namespaces/default/pods", {"Authorization": f"bearer {ADMIN_TOKEN}"}
        )
        self.assertEqual((code, [i["metadata"]["name"] for i in body["items"]]), (200, ["web-1"]))
        recorded = self.standin.requests[-1]
        self.assertEqual(recorded.user, "kubernetes-admin")
        self.assertEqual(recorded.groups, ("system:masters", "system:authenticated"))
        code, _ = self.json_call("GET", "/version", {"Authorization": f"Bearer {PROXY_TOKEN}"})
        self.assertEqual(self.standin.requests[-1].groups, PROXY_SA.groups)

    def test_websocket_protocol_token(self) -> None:
        """
        A WebSocket upgrade may carry its token as base64url.bearer.authorization.k8s.io.
        """
        encoded = base64.urlsafe_b64encode(ADMIN_TOKEN.encode()).decode().rstrip("=")
        self.call("GET", "/api/v1/namespaces/default/pods/web-1/exec?command=ls", {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Protocol": f"v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.{encoded}",
        })
        self.assertEqual(self.standin.requests[-1].user, "kubernetes-admin")

    def test_anonymous(self) -> None:
        """
        With anonymous access on, no credentials means system:anonymous: /version is
        public, discovery is Forbidden, and a bad token is still 401.
        """
        self.make_standin(anonymous=True)
        code, _ = self.json_call("GET", "/version")
        self.assertEqual(code, 200)
        code, body = self.json_call("GET", "/api")
        self.assertEqual(
            (code, body["message"]), (403, 'forbidden: User "system:anonymous" cannot get path "/api"')
        )
        code, _ = self.json_call("GET", "/version", {"Authorization": "Bearer nope"})
        self.assertEqual(code, 401)


class ImpersonationTests(StandInMixin, SynchronousTestCase):
    """
    Impersonate-* headers are checked and applied exactly as kube-apiserver does.
    """

    def setUp(self) -> None:
        self.make_standin()
        self.standin.add_pod("web-1")

    def test_seed_reader(self) -> None:
        """
        The seed's personal-device employee lists pods but gets the exact Forbidden
        Status for services.
        """
        code, body = self.json_call("GET", "/api/v1/namespaces/default/pods", as_user(USER, READER))
        self.assertEqual((code, body["kind"]), (200, "PodList"))
        code, body = self.json_call("GET", "/api/v1/namespaces/default/services",
                                    as_user(USER, READER))
        self.assertEqual(code, 403)
        self.assertEqual(body, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": SERVICES_FORBIDDEN,
            "reason": "Forbidden",
            "details": {"kind": "services"},
            "code": 403,
        })
        recorded = self.standin.requests[-1]
        self.assertEqual(recorded.requester, PROXY_SA)
        self.assertEqual((recorded.user, recorded.groups), (USER, (READER, "system:authenticated")))

    def test_seed_admin(self) -> None:
        """
        The seed's corporate-device admin may list both pods and services.
        """
        for resource in ["pods", "services"]:
            code, _ = self.json_call("GET", f"/api/v1/namespaces/default/{resource}",
                                     as_user(USER, ADMIN))
            self.assertEqual(code, 200, resource)

    def test_without_impersonation_permission(self) -> None:
        """
        A requester not allowed to impersonate gets the apiserver's impersonation 403.
        """
        self.make_standin(rbac_yaml=())
        code, body = self.json_call("GET", "/api/v1/namespaces/default/pods", as_user("alice"))
        self.assertEqual(code, 403)
        self.assertEqual(
            body["message"],
            'users "alice" is forbidden: User "system:serviceaccount:banyan-kproxy:banyan-kproxy"'
            ' cannot impersonate resource "users" in API group "" at the cluster scope',
        )
        self.assertEqual(body["details"], {"name": "alice", "kind": "users"})
        self.assertIsNone(self.standin.requests[-1].user)

    def test_repeated_group_lines_not_split_on_commas(self) -> None:
        """
        Each Impersonate-Group line is one group; a comma inside a line stays in the name.
        """
        code, _ = self.json_call("GET", "/api/v1/namespaces/default/pods",
                                 as_user(USER, "team,a", READER))
        self.assertEqual(code, 200)
        recorded = self.standin.requests[-1]
        self.assertEqual(recorded.groups, ("team,a", READER, "system:authenticated"))
        self.assertEqual(recorded.header_values("impersonate-group"),
                         [b"team,a", READER.encode()])
        code, body = self.json_call("GET", "/api/v1/namespaces/default/pods",
                                    as_user(USER, f"{READER},banyan:other"))
        self.assertEqual(code, 403)
        self.assertEqual(
            body["message"],
            'pods is forbidden: User "banyan:myuser@example.com" cannot list resource "pods"'
            ' in API group "" in the namespace "default"',
        )

    def test_explicit_authenticated_group_not_repeated(self) -> None:
        """
        system:authenticated is added only when neither it nor system:unauthenticated
        was asked for.
        """
        self.json_call("GET", "/version", as_user(USER, "system:authenticated", READER))
        self.assertEqual(self.standin.requests[-1].groups, ("system:authenticated", READER))
        self.json_call("GET", "/version", as_user(USER))
        self.assertEqual(self.standin.requests[-1].groups, ("system:authenticated",))

    def test_groups_without_user(self) -> None:
        """
        Impersonate-Group without Impersonate-User is refused with the apiserver's 500.
        """
        headers = {"Authorization": f"Bearer {PROXY_TOKEN}", "Impersonate-Group": [READER, "g2"]}
        code, response_headers, body = self.call("GET", "/api/v1/namespaces/default/pods", headers)
        self.assertEqual(code, 500)
        self.assertEqual(
            body.decode(),
            'Internal Server Error: "/api/v1/namespaces/default/pods": requested'
            " [{Group  banyan:any-employee-personal-device    } {Group  g2    }] without"
            " impersonating a user\n",
        )
        self.assertEqual(response_headers.getRawHeaders("content-type"),
                         ["text/plain; charset=utf-8"])

    def test_extra_and_uid(self) -> None:
        """
        Impersonate-Extra keys are percent-decoded and each needs userextras/<key>;
        Impersonate-Uid needs uids.
        """
        headers = {
            **as_user(USER, READER),
            "Impersonate-Extra-Remote-Client-Ip": ["10.0.0.1", "10.0.0.2"],
            "Impersonate-Uid": "u-1",
        }
        code, _ = self.json_call("GET", "/version", headers)
        self.assertEqual(code, 200)
        recorded = self.standin.requests[-1]
        self.assertEqual(recorded.extra, (("remote-client-ip", ("10.0.0.1", "10.0.0.2")),))
        self.assertEqual(recorded.uid, "u-1")
        code, body = self.json_call(
            "GET", "/version", {**as_user(USER), "Impersonate-Extra-Acme.com%2Fproject": "p1"}
        )
        self.assertEqual(code, 403)
        self.assertEqual(
            body["message"],
            'userextras.authentication.k8s.io "p1" is forbidden: User'
            ' "system:serviceaccount:banyan-kproxy:banyan-kproxy" cannot impersonate resource'
            ' "userextras/acme.com/project" in API group "authentication.k8s.io" at the cluster'
            " scope",
        )
        self.assertEqual(
            body["details"],
            {"name": "p1", "group": "authentication.k8s.io", "kind": "userextras"},
        )

    def test_group_not_allowed(self) -> None:
        """
        Each group is authorized on its own: the first refused one is named.
        """
        self.make_standin(rbac_yaml=["""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: users-only}
rules:
- {apiGroups: [""], resources: [users], verbs: [impersonate]}
- {apiGroups: [""], resources: [groups], resourceNames: [ok], verbs: [impersonate]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: users-only}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: users-only}
subjects: [{kind: ServiceAccount, name: banyan-kproxy, namespace: banyan-kproxy}]
"""])
        code, body = self.json_call("GET", "/version", as_user(USER, "ok", READER))
        self.assertEqual(
            (code, body["message"]),
            (403, f'groups "{READER}" is forbidden: User "{PROXY_SA.name}" cannot impersonate'
                  ' resource "groups" in API group "" at the cluster scope'),
        )

    def test_service_account(self) -> None:
        """
        Impersonating a service account needs serviceaccounts in its namespace and
        gives its groups.
        """
        code, body = self.json_call("GET", "/version", as_user("system:serviceaccount:ci:bot"))
        self.assertEqual(
            (code, body["message"]),
            (403, f'serviceaccounts "bot" is forbidden: User "{PROXY_SA.name}" cannot'
                  ' impersonate resource "serviceaccounts" in API group "" in the namespace "ci"'),
        )
        code, _ = self.json_call(
            "GET", "/version", as_user("system:serviceaccount:ci:bot", token=ADMIN_TOKEN)
        )
        self.assertEqual(self.standin.requests[-1].groups, (
            "system:serviceaccounts", "system:serviceaccounts:ci", "system:authenticated"
        ))

    def test_headers_recorded_as_received(self) -> None:
        """
        The record keeps every header line as received, credentials included.
        """
        self.call("GET", "/api/v1/namespaces/default/pods?limit=500",
                  {**as_user(USER, READER, "g2"), "Audit-ID": "abc"})
        recorded = self.standin.requests[-1]
        self.assertEqual(recorded.method, "GET")
        self.assertEqual(recorded.path, "/api/v1/namespaces/default/pods")
        self.assertEqual((recorded.query, recorded.args), ("limit=500", {"limit": ("500",)}))
        self.assertEqual(recorded.header_values("Authorization"), [b"Bearer proxy-token"])
        self.assertEqual(recorded.header_values(b"IMPERSONATE-GROUP"), [READER.encode(), b"g2"])
        self.assertEqual(recorded.header_values("Audit-Id"), [b"abc"])

    def test_audit_id_echoed(self) -> None:
        """
        The response carries the request's Audit-ID, or a fresh one.
        """
        _, headers, _ = self.call("GET", "/version", {**as_user(USER), "Audit-ID": "abc"})
        self.assertEqual(headers.getRawHeaders("audit-id"), ["abc"])
        _, headers, _ = self.call("GET", "/version", as_user(USER))
        self.assertEqual(len(headers.getRawHeaders("audit-id")[0]), 36)


class ResourceTests(StandInMixin, SynchronousTestCase):
    """
    Pods, services and namespaces behave as kubectl expects.
    """

    def setUp(self) -> None:
        self.make_standin()
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def test_pod_table(self) -> None:
        """
        kubectl's Table Accept header gets meta.k8s.io/v1 Table rows for pods.
        """
        self.standin.add_pod("web-1", labels={"app": "web"})
        self.clock.advance(75)
        code, headers, content = self.call(
            "GET", "/api/v1/namespaces/default/pods?limit=500",
            {**as_user(USER, READER), "Accept": TABLE_ACCEPT},
        )
        table = json.loads(content)
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"),
                         ["application/json;as=Table;v=v1;g=meta.k8s.io"])
        self.assertEqual((table["kind"], table["apiVersion"]), ("Table", "meta.k8s.io/v1"))
        self.assertEqual(
            [(c["name"], c["priority"]) for c in table["columnDefinitions"]],
            [("Name", 0), ("Ready", 0), ("Status", 0), ("Restarts", 0), ("Age", 0), ("IP", 1),
             ("Node", 1), ("Nominated Node", 1), ("Readiness Gates", 1)],
        )
        [row] = table["rows"]
        self.assertEqual(row["cells"][:5], ["web-1", "1/1", "Running", "0", "75s"])
        self.assertEqual(row["object"]["kind"], "PartialObjectMetadata")
        self.assertEqual(row["object"]["metadata"]["labels"], {"app": "web"})

    def test_service_table(self) -> None:
        """
        Services print NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE SELECTOR.
        """
        self.standin.add_service("web", ports=[80, (53, "UDP")], selector={"app": "web"},
                                 cluster_ip="10.96.0.20")
        self.clock.advance(3 * 3600)
        code, table = self.json_call("GET", "/api/v1/namespaces/default/services",
                                     {**self.admin, "Accept": TABLE_ACCEPT})
        self.assertEqual(
            [c["name"] for c in table["columnDefinitions"]],
            ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"],
        )
        self.assertEqual(
            table["rows"][0]["cells"],
            ["web", "ClusterIP", "10.96.0.20", "<none>", "80/TCP,53/UDP", "3h", "app=web"],
        )

    def test_empty_table(self) -> None:
        """
        An empty namespace gives a Table with no rows (kubectl: "No resources found").
        """
        code, table = self.json_call("GET", "/api/v1/namespaces/default/pods",
                                     {**self.admin, "Accept": TABLE_ACCEPT})
        self.assertEqual((code, table["rows"]), (200, []))

    def test_create_and_duplicate(self) -> None:
        """
        Creating a pod sets uid, creationTimestamp and resourceVersion; creating it again
        is 409 AlreadyExists.
        """
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "new-1"},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        path = "/api/v1/namespaces/default/pods?fieldManager=kubectl-create&fieldValidation=Strict"
        code, created = self.json_call("POST", path, self.admin, pod)
        self.assertEqual(code, 201)
        metadata = created["metadata"]
        self.assertEqual((metadata["name"], metadata["namespace"]), ("new-1", "default"))
        self.assertEqual(metadata["creationTimestamp"], "2023-11-14T22:13:20Z")
        self.assertEqual(metadata["resourceVersion"], self.standin.resource_version)
        self.assertEqual(len(metadata["uid"]), 36)
        self.assertEqual(created["status"]["phase"], "Pending")
        code, body = self.json_call("POST", path, self.admin, pod)
        self.assertEqual((code, body), (409, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'pods "new-1" already exists',
            "reason": "AlreadyExists",
            "details": {"name": "new-1", "kind": "pods"},
            "code": 409,
        }))

    def test_create_checks(self) -> None:
        """
        Creation is refused in a missing namespace, with a mismatched namespace, or
        without a name; dryRun stores nothing.
        """
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": {"containers": [{"name": "c", "image": "i"}]}}
        code, body = self.json_call("POST", "/api/v1/namespaces/nope/pods", self.admin, pod)
        self.assertEqual((code, body["message"]), (404, 'namespaces "nope" not found'))
        code, body = self.json_call(
            "POST", "/api/v1/namespaces/default/pods", self.admin,
            {**pod, "metadata": {"name": "p", "namespace": "other"}},
        )
        self.assertEqual((code, body["reason"]), (400, "BadRequest"))
        code, body = self.json_call("POST", "/api/v1/namespaces/default/pods", self.admin,
                                    {**pod, "metadata": {}})
        self.assertEqual((code, body["reason"]), (422, "Invalid"))
        code, _ = self.json_call("POST", "/api/v1/namespaces/default/pods?dryRun=All",
                                 self.admin, pod)
        self.assertEqual(code, 201)
        self.assertIsNone(self.standin.get_object("pods", "p", "default"))

    def test_get_forbidden_and_missing(self) -> None:
        """
        A named get names the object when forbidden and when not found.
        """
        code, body = self.json_call("GET", "/api/v1/namespaces/kube-system/pods/web-1",
                                    as_user(USER, READER))
        self.assertEqual(
            (code, body["message"], body["details"]),
            (403, 'pods "web-1" is forbidden: User "banyan:myuser@example.com" cannot get'
                  ' resource "pods" in API group "" in the namespace "kube-system"',
             {"name": "web-1", "kind": "pods"}),
        )
        code, body = self.json_call("GET", "/api/v1/namespaces/default/pods/nope",
                                    as_user(USER, READER))
        self.assertEqual((code, body["message"], body["reason"]),
                         (404, 'pods "nope" not found', "NotFound"))

    def test_exec_needs_create(self) -> None:
        """
        A pod reader may not exec: the Forbidden names create on pods/exec.
        """
        self.standin.add_pod("web-1")
        code, body = self.json_call(
            "POST", "/api/v1/namespaces/default/pods/web-1/exec?command=ls&stdout=true",
            as_user(USER, READER),
        )
        self.assertEqual(
            (code, body["message"]),
            (403, 'pods "web-1" is forbidden: User "banyan:myuser@example.com" cannot create'
                  ' resource "pods/exec" in API group "" in the namespace "default"'),
        )
        code, body = self.json_call("POST", "/api/v1/namespaces/default/pods/web-1/exec",
                                    self.admin)
        self.assertEqual((code, body["message"]), (400, "Upgrade request required"))

    def test_delete_and_namespaces(self) -> None:
        """
        Deleting returns the object and removes it; namespaces list and get at the
        cluster scope.
        """
        self.standin.add_pod("web-1")
        code, body = self.json_call("DELETE", "/api/v1/namespaces/default/pods/web-1", self.admin)
        self.assertEqual((code, body["metadata"]["name"]), (200, "web-1"))
        code, _ = self.json_call("DELETE", "/api/v1/namespaces/default/pods/web-1", self.admin)
        self.assertEqual(code, 404)
        code, body = self.json_call("GET", "/api/v1/namespaces", self.admin)
        self.assertEqual(
            [i["metadata"]["name"] for i in body["items"]],
            ["default", "kube-node-lease", "kube-public", "kube-system"],
        )
        code, body = self.json_call("GET", "/api/v1/namespaces/default", as_user(USER, READER))
        self.assertEqual(
            body["message"],
            'namespaces "default" is forbidden: User "banyan:myuser@example.com" cannot get'
            ' resource "namespaces" in API group "" in the namespace "default"',
        )

    def test_python_api(self) -> None:
        """
        add_pod makes a missing namespace and refuses duplicates; deleting a missing
        pod is a KeyError.
        """
        pod = self.standin.add_pod("job-1", namespace="team-a", phase="Pending")
        self.assertEqual(pod["metadata"]["namespace"], "team-a")
        self.assertEqual(self.standin.get_object("namespaces", "team-a")["status"],
                         {"phase": "Active"})
        self.assertRaises(ValueError, self.standin.add_pod, "job-1", namespace="team-a")
        self.assertRaises(KeyError, self.standin.delete_pod, "nope")
        code, table = self.json_call("GET", "/api/v1/namespaces/team-a/pods",
                                     {**self.admin, "Accept": TABLE_ACCEPT})
        self.assertEqual(table["rows"][0]["cells"][:3], ["job-1", "0/1", "ContainerCreating"])

    def test_selectors(self) -> None:
        """
        labelSelector and fieldSelector narrow lists; unknown fields are a 400.
        """
        self.standin.add_pod("a", labels={"app": "web", "tier": "front"})
        self.standin.add_pod("b", labels={"app": "db"})
        self.standin.add_pod("c", namespace="kube-system")

        def names(query: str) -> list[str]:
            code, body = self.json_call("GET", "/api/v1/pods?" + query, self.admin)
            return [i["metadata"]["name"] for i in body["items"]]

        self.assertEqual(names(""), ["a", "b", "c"])
        self.assertEqual(names("labelSelector=app%3Dweb"), ["a"])
        self.assertEqual(names("labelSelector=app+in+(web,db),tier"), ["a"])
        self.assertEqual(names("labelSelector=app!%3Dweb"), ["b", "c"])
        self.assertEqual(names("fieldSelector=metadata.name%3Db"), ["b"])
        self.assertEqual(names("fieldSelector=metadata.namespace!%3Ddefault"), ["c"])
        code, body = self.json_call("GET", "/api/v1/pods?fieldSelector=spec.bogus%3D1", self.admin)
        self.assertEqual((code, body["message"]), (400, "field label not supported: spec.bogus"))

    def test_logs(self) -> None:
        """
        pods/log returns the log text; follow=true streams later lines until the pod goes.
        """
        self.standin.add_pod("web-1", logs="one\ntwo\n")
        code, _, content = self.call("GET", "/api/v1/namespaces/default/pods/web-1/log",
                                     as_user(USER, READER))
        self.assertEqual((code, content), (200, b"one\ntwo\n"))
        code, _, content = self.call(
            "GET", "/api/v1/namespaces/default/pods/web-1/log?tailLines=1", as_user(USER, READER)
        )
        self.assertEqual(content, b"two\n")
        response, chunks = self.open_stream(
            "/api/v1/namespaces/default/pods/web-1/log?follow=true", as_user(USER, READER)
        )
        self.standin.append_pod_log("web-1", "three\n")
        self.treq.flush()
        self.assertEqual(b"".join(chunks), b"one\ntwo\nthree\n")
        self.assertNoResult(response.done)
        self.standin.delete_pod("web-1")
        self.treq.flush()
        self.successResultOf(response.done)

    def test_discovery(self) -> None:
        """
        /version, /api, /api/v1 and /apis describe a v1.31 server with pods and their
        subresources.
        """
        reader = as_user(USER, READER)
        code, version = self.json_call("GET", "/version?timeout=32s", reader)
        self.assertEqual((code, version["gitVersion"], version["minor"]), (200, "v1.31.0", "31"))
        code, api = self.json_call("GET", "/api", reader)
        self.assertEqual(api["versions"], ["v1"])
        code, resources = self.json_call("GET", "/api/v1", reader)
        names = [r["name"] for r in resources["resources"]]
        for name in ["pods", "pods/log", "pods/exec", "pods/attach", "pods/portforward",
                     "services", "namespaces"]:
            self.assertIn(name, names)
        code, groups = self.json_call("GET", "/apis", reader)
        self.assertIn("authorization.k8s.io", [g["name"] for g in groups["groups"]])
        code, openapi = self.json_call("GET", "/openapi/v3", reader)
        self.assertIn("api/v1", openapi["paths"])
        code, _, _ = self.call("GET", "/metrics", reader)
        self.assertEqual(code, 403)

    def test_reviews(self) -> None:
        """
        SelfSubjectAccessReview, SubjectAccessReview and TokenReview answer from the
        same RBAC and tokens.
        """
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": {"namespace": "default", "verb": "list",
                                                  "resource": "services"}}}
        code, body = self.json_call(
            "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            as_user(USER, READER), review,
        )
        self.assertEqual((code, body["status"]), (201, {"allowed": False}))
        sar = {"spec": {"user": USER, "groups": [READER],
                        "resourceAttributes": {"namespace": "default", "verb": "get",
                                               "resource": "pods"}}}
        code, body = self.json_call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                                    self.admin, sar)
        self.assertTrue(body["status"]["allowed"])
        code, body = self.json_call("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                    self.admin, {"spec": {"token": PROXY_TOKEN}})
        self.assertEqual(body["status"]["user"]["username"], PROXY_SA.name)
        code, body = self.json_call("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                    as_user(USER, READER), {"spec": {"token": PROXY_TOKEN}})
        self.assertEqual(code, 403)
        code, body = self.json_call("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                    as_user(USER, READER), {})
        self.assertEqual(body["status"]["userInfo"],
                         {"username": USER, "groups": [READER, "system:authenticated"]})


class WatchTests(StandInMixin, SynchronousTestCase):
    """
    Watches stream JSON events, one per line, as changes happen.
    """

    def setUp(self) -> None:
        self.make_standin()
        self.standin.add_pod("before-1")

    def test_added_after_watch_began(self) -> None:
        """
        A pod created after a watch began arrives as an ADDED event on the open stream.
        """
        code, listing = self.json_call("GET", "/api/v1/namespaces/default/pods",
                                       as_user(USER, READER))
        rv = listing["metadata"]["resourceVersion"]
        response, chunks = self.open_stream(
            f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}", as_user(USER, READER)
        )
        self.assertEqual((response.code, self.events(chunks)), (200, []))
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.standin.add_pod("after-1")
        self.standin.add_pod("elsewhere", namespace="kube-system")
        [event] = self.events(chunks)
        self.assertEqual((event["type"], event["object"]["metadata"]["name"]), ("ADDED", "after-1"))
        self.standin.delete_pod("after-1")
        self.assertEqual([e["type"] for e in self.events(chunks)], ["ADDED", "DELETED"])
        self.assertNoResult(response.done)
        self.assertEqual(self.standin.requests[-1].code, 200)

    def test_initial_events_and_replay(self) -> None:
        """
        Without a resourceVersion existing pods come first as ADDED; with an old one the
        changes since are replayed.
        """
        _, chunks = self.open_stream("/api/v1/namespaces/default/pods?watch=true",
                                     as_user(USER, ADMIN))
        self.assertEqual([e["object"]["metadata"]["name"] for e in self.events(chunks)],
                         ["before-1"])
        rv = self.standin.resource_version
        self.standin.add_pod("second")
        self.standin.delete_pod("before-1")
        _, chunks = self.open_stream(f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}",
                                     as_user(USER, ADMIN))
        self.assertEqual(
            [(e["type"], e["object"]["metadata"]["name"]) for e in self.events(chunks)],
            [("ADDED", "second"), ("DELETED", "before-1")],
        )

    def test_timeout_seconds(self) -> None:
        """
        timeoutSeconds ends the stream when the clock reaches it.
        """
        response, _ = self.open_stream(
            "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=30", as_user(USER, READER)
        )
        self.clock.advance(29)
        self.treq.flush()
        self.assertNoResult(response.done)
        self.clock.advance(1)
        self.treq.flush()
        self.successResultOf(response.done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_watches(self) -> None:
        """
        close_watches ends every open stream, as an apiserver restart would.
        """
        first, _ = self.open_stream("/api/v1/namespaces/default/pods?watch=1",
                                    as_user(USER, READER))
        second, _ = self.open_stream("/api/v1/pods?watch=1", as_user(USER, ADMIN))
        self.standin.close_watches()
        self.treq.flush()
        self.successResultOf(first.done)
        self.successResultOf(second.done)

    def test_table_events(self) -> None:
        """
        With kubectl's Table Accept header each event carries a one-row Table.
        """
        _, chunks = self.open_stream(
            "/api/v1/namespaces/default/pods?watch=1&resourceVersion="
            + self.standin.resource_version,
            {**as_user(USER, READER), "Accept": TABLE_ACCEPT},
        )
        self.standin.add_pod("after-1")
        [event] = self.events(chunks)
        self.assertEqual(event["type"], "ADDED")
        self.assertEqual(event["object"]["kind"], "Table")
        self.assertEqual(event["object"]["rows"][0]["cells"][:3], ["after-1", "1/1", "Running"])

    def test_named_watch(self) -> None:
        """
        The legacy /watch/ path with a name watches that one pod.
        """
        _, chunks = self.open_stream("/api/v1/watch/namespaces/default/pods/before-1",
                                     as_user(USER, READER))
        self.standin.add_pod("other")
        self.standin.delete_pod("before-1")
        self.assertEqual(
            [(e["type"], e["object"]["metadata"]["name"]) for e in self.events(chunks)],
            [("ADDED", "before-1"), ("DELETED", "before-1")],
        )

    def test_forbidden_watch(self) -> None:
        """
        A watch the user may not make is an ordinary Forbidden naming the watch verb.
        """
        code, body = self.json_call("GET", "/api/v1/namespaces/default/services?watch=1",
                                    as_user(USER, READER))
        self.assertEqual(
            (code, body["message"]),
            (403, 'services is forbidden: User "banyan:myuser@example.com" cannot watch'
                  ' resource "services" in API group "" in the namespace "default"'),
        )


class HelperTests(SynchronousTestCase):
    """
    The request classifier, age formatting and --token parsing.
    """

    def test_request_info(self) -> None:
        """
        Requests classify as kube-apiserver's RequestInfoFactory does.
        """
        info = request_info("GET", "/api/v1/namespaces/default/pods", {"watch": ("true",)})
        self.assertEqual((info.verb, info.resource, info.namespace, info.name),
                         ("watch", "pods", "default", ""))
        info = request_info("GET", "/api/v1/namespaces/default/pods",
                            {"fieldSelector": ("metadata.name=web-1",)})
        self.assertEqual((info.verb, info.name), ("list", "web-1"))
        info = request_info("GET", "/api/v1/namespaces/kube-system", {})
        self.assertEqual((info.resource, info.name, info.namespace),
                         ("namespaces", "kube-system", "kube-system"))
        info = request_info("POST", "/api/v1/namespaces/default/pods/web-1/exec", {})
        self.assertEqual((info.verb, info.resource, info.subresource), ("create", "pods", "exec"))
        info = request_info("DELETE", "/apis/apps/v1/namespaces/a/deployments", {})
        self.assertEqual((info.verb, info.api_group), ("deletecollection", "apps"))
        for path in ["/apis/apps/v1", "/api/v1", "/healthz", "/openapi/v3/api/v1"]:
            info = request_info("GET", path, {})
            self.assertEqual((info.resource_request, info.verb, info.path), (False, "get", path))

    def test_human_duration(self) -> None:
        """
        Ages print like kubectl's.
        """
        self.assertEqual(
            [human_duration(s) for s in [5, 119, 150, 600, 3 * 3600 + 5, 5 * 3600 + 60,
                                         30 * 3600, 3 * 86400 + 7200, 30 * 86400]],
            ["5s", "119s", "2m30s", "10m", "3h", "5h1m", "30h", "3d2h", "30d"],
        )

    def test_token_spec(self) -> None:
        """
        --token FILE=USER[:GROUP,GROUP] keeps service account names whole.
        """
        self.assertEqual(parse_token_spec("t=admin:system:masters,ops"),
                         ("t", UserInfo("admin", ("system:masters", "ops"))))
        self.assertEqual(parse_token_spec("t=system:serviceaccount:banyan-kproxy:banyan-kproxy"),
                         ("t", PROXY_SA))
        self.assertEqual(parse_token_spec("t=banyan\\:me@example.com"),
                         ("t", UserInfo("banyan:me@example.com")))
        self.assertRaises(ValueError, parse_token_spec, "no-user")


def kubectl_binary(version: str | None = None) -> str:
    """
    The real kubectl (or the versioned one beside it); the test is skipped without it.
    """
    default = shutil.which("kubectl")
    if default is None:
        raise SkipTest("kubectl is not on PATH")
    if version is None:
        return default
    path = os.path.join(os.path.dirname(os.path.realpath(default)), f"kubectl.{version}")
    if not os.path.exists(path):
        raise SkipTest(f"{path} does not exist")
    return path


class KubectlTests(TestCase):
    """
    The real kubectl against the stand-in on 127.0.0.1 over TLS.
    """

    timeout = 90

    def setUp(self) -> None:
        kubectl_binary()
        from twisted.internet import reactor

        self.reactor = reactor
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.directory, "home"))
        tls_directory = os.path.join(self.directory, "tls")
        os.makedirs(tls_directory)
        ca = CertificateAuthority.generate()
        cert_file, key_file = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(
            tls_directory, "server"
        )
        self.client = ca.issue("alice", organizations=[READER], client=True)
        self.ca_data = base64.b64encode(ca.cert_pem).decode()
        self.standin = KubeAPIStandIn(
            tokens={PROXY_TOKEN: PROXY_SA},
            rbac_yaml=[IMPERSONATOR_YAML, seed_rbac_yaml()],
            clock=reactor,
            client_certificates=True,
        )
        self.standin.add_pod("web-1")
        self.listening = listen(
            reactor, self.standin,
            tls=ServerTLS.from_files(
                cert_file, key_file, ca.write_cert(tls_directory),
                require_client_certificate=False,
            ),
        )
        self.addCleanup(self.listening.stop)

    def kubeconfig(self, user: Mapping[str, Any]) -> str:
        """
        Write a kubeconfig for the stand-in with the given user entry; return its path.
        """
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {
                "server": self.listening.url, "certificate-authority-data": self.ca_data}}],
            "users": [{"name": "u", "user": dict(user)}],
            "contexts": [{"name": "standin", "context": {
                "cluster": "standin", "user": "u", "namespace": "default"}}],
            "current-context": "standin",
        }
        path = os.path.join(self.directory, f"kubeconfig-{len(os.listdir(self.directory))}")
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def impersonating(self, *groups: str) -> str:
        """
        A kubeconfig using the proxy's token to impersonate the seed's user in ``groups``.
        """
        return self.kubeconfig({"token": PROXY_TOKEN, "as": USER, "as-groups": list(groups)})

    async def kubectl(self, config: str, *args: str, binary: str | None = None) -> tuple[str, str, int]:
        """
        Run kubectl without blocking the reactor the stand-in runs in.
        """
        out, err, code = await getProcessOutputAndValue(
            binary or kubectl_binary(),
            ["--kubeconfig", config, "--cache-dir", os.path.join(self.directory, "cache"), *args],
            env={"HOME": os.path.join(self.directory, "home"), "PATH": os.environ.get("PATH", "")},
            reactor=self.reactor,
        )
        return out.decode(), err.decode(), code

    def test_seed_scenario(self) -> None:
        """
        kubectl lists pods as the seed's reader, gets the seed's exact Forbidden line for
        services, and the admin group lists both.
        """

        async def run() -> None:
            reader = self.impersonating(READER)
            out, err, code = await self.kubectl(reader, "get", "pods")
            self.assertEqual((code, err), (0, ""))
            lines = out.splitlines()
            self.assertEqual(lines[0].split(), ["NAME", "READY", "STATUS", "RESTARTS", "AGE"])
            self.assertEqual(lines[1].split()[:4], ["web-1", "1/1", "Running", "0"])
            out, err, code = await self.kubectl(reader, "get", "services")
            self.assertEqual((code, out), (1, ""))
            self.assertEqual(err.strip(), "Error from server (Forbidden): " + SERVICES_FORBIDDEN)
            admin = self.impersonating(ADMIN)
            out, err, code = await self.kubectl(admin, "get", "services")
            self.assertEqual((code, err.strip()), (0, "No resources found in default namespace."))
            groups = {r.groups for r in self.standin.requests if r.path.endswith("/services")}
            self.assertEqual(groups, {(READER, "system:authenticated"),
                                      (ADMIN, "system:authenticated")})

        return Deferred.fromCoroutine(run())

    def test_client_certificate(self) -> None:
        """
        A client certificate authenticates as CN in the O groups (kubectl auth whoami).
        """

        async def run() -> None:
            config = self.kubeconfig({
                "client-certificate-data": base64.b64encode(self.client.cert_pem).decode(),
                "client-key-data": base64.b64encode(self.client.key_pem).decode(),
            })
            out, err, code = await self.kubectl(config, "auth", "whoami", "-o", "json")
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out)["status"]["userInfo"],
                             {"username": "alice", "groups": [READER, "system:authenticated"]})
            out, err, code = await self.kubectl(config, "auth", "can-i", "list", "services")
            self.assertEqual(out.strip(), "no")

        return Deferred.fromCoroutine(run())

    def test_create_duplicate_and_watch(self) -> None:
        """
        kubectl create works, a second create is AlreadyExists, and get -w prints a pod
        added while it watches.
        """

        async def run() -> None:
            admin = self.impersonating(ADMIN)
            manifest = os.path.join(self.directory, "pod.json")
            with open(manifest, "w") as f:
                json.dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "new-1"},
                           "spec": {"containers": [{"name": "c", "image": "busybox"}]}}, f)
            out, err, code = await self.kubectl(admin, "create", "-f", manifest)
            self.assertEqual((code, out.strip()), (0, "pod/new-1 created"), err)
            out, err, code = await self.kubectl(admin, "create", "-f", manifest)
            self.assertEqual(
                (code, err.strip()),
                (1, 'Error from server (AlreadyExists): error when creating'
                    f' "{manifest}": pods "new-1" already exists'),
            )
            watching = Deferred.fromCoroutine(self.kubectl(admin, "get", "pods", "-w"))
            for _ in range(200):
                if any("watch=" in r.query for r in self.standin.requests):
                    break
                await deferLater(self.reactor, 0.05, lambda: None)
            else:
                self.fail("kubectl never started watching")
            self.standin.add_pod("after-1")
            await deferLater(self.reactor, 0.5, lambda: None)
            self.standin.close_watches()
            out, err, code = await watching
            self.assertIn("after-1", [line.split()[0] for line in out.splitlines()[1:]], out + err)

        return Deferred.fromCoroutine(run())

    def test_kubectl_versions(self) -> None:
        """
        Every versioned kubectl beside the default one (1.29 to 1.33) lists pods and
        prints the seed's Forbidden line.
        """

        async def run() -> None:
            ran = 0
            for version in ["1.29", "1.30", "1.31", "1.32", "1.33"]:
                try:
                    binary = kubectl_binary(version)
                except SkipTest:
                    continue
                ran += 1
                reader = self.impersonating(READER)
                out, err, code = await self.kubectl(reader, "get", "pods", binary=binary)
                self.assertEqual(out.split()[5:9], ["web-1", "1/1", "Running", "0"], version)
                out, err, code = await self.kubectl(reader, "get", "services", binary=binary)
                self.assertEqual(err.strip(), "Error from server (Forbidden): " + SERVICES_FORBIDDEN,
                                 version)
            if not ran:
                raise SkipTest("no versioned kubectl binaries")

        return Deferred.fromCoroutine(run())


class MainTests(TestCase):
    """
    ``python -m banyan_kproxy.testing.kubeapi`` serves until SIGTERM.
    """

    timeout = 60

    def test_process(self) -> None:
        """
        The command prints its URL, writes the port file, answers /version with the
        configured token and exits 0 on SIGTERM.
        """
        from twisted.internet import reactor

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        token_file = os.path.join(directory, "token")
        with open(token_file, "w") as f:
            f.write("sekrit\n")
        port_file = os.path.join(directory, "port")
        source_root = os.path.dirname(os.path.dirname(os.path.abspath(banyan_kproxy.__file__)))

        async def run() -> None:
            from twisted.internet.protocol import ProcessProtocol

            class Collect(ProcessProtocol):
                def __init__(self) -> None:
                    self.out = b""
                    self.err = b""
                    self.ended: Deferred[int] = Deferred()

                def outReceived(self, data: bytes) -> None:
                    self.out += data

                def errReceived(self, data: bytes) -> None:
                    self.err += data

                def processEnded(self, reason: Any) -> None:
                    self.ended.callback(reason.value.exitCode)

            protocol = Collect()
            process = reactor.spawnProcess(
                protocol, sys.executable,
                [sys.executable, "-m", "banyan_kproxy.testing.kubeapi", "--port-file", port_file,
                 "--token", f"{token_file}=admin:system:masters"],
                env={**os.environ, "PYTHONPATH": os.pathsep.join([source_root, *sys.path])},
            )
            try:
                for _ in range(300):
                    if b"listening on" in protocol.out or protocol.ended.called:
                        break
                    await deferLater(reactor, 0.05, lambda: None)
                else:
                    self.fail("the stand-in never said it was listening")
                self.assertFalse(protocol.ended.called, protocol.err.decode())
                with open(port_file) as f:
                    port = int(f.read())
                self.assertEqual(protocol.out, f"listening on http://127.0.0.1:{port}\n".encode())
                import treq

                response = await treq.get(f"http://127.0.0.1:{port}/version",
                                          headers={"Authorization": "Bearer sekrit"},
                                          reactor=reactor, persistent=False)
                self.assertEqual(json.loads(await response.content())["gitVersion"], "v1.31.0")
            finally:
                if not protocol.ended.called:
                    process.signalProcess("TERM")
                code = await protocol.ended
            self.assertEqual(code, 0)

        return Deferred.fromCoroutine(run())
