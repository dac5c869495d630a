"""
Tests for `banyan_kproxy.audit.policy`: kube-apiserver's audit policy semantics and
validation.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.audit.errors import AuditConfigError
from banyan_kproxy.audit.policy import DEFAULT_POLICY, PolicyError, load_policy, parse_policy
from banyan_kproxy.requestinfo import parse_request
from banyan_kproxy.testing.stack import repository_file

NS = "/api/v1/namespaces/default"

POLICY = """
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    nonResourceURLs: ["/healthz*", /version]
  - level: None
    users: ["system:kube-proxy"]
    verbs: [watch]
  - level: RequestResponse
    users: ["banyan:alice@example.com"]
  - level: Metadata
    resources:
      - group: ""
        resources: ["secrets", "configmaps"]
  - level: Request
    resources:
      - group: ""
        resources: ["pods/exec", "pods/attach"]
    omitStages: [ResponseStarted]
  - level: Request
    userGroups: ["banyan:all-admins-corporate-device"]
    namespaces: ["kube-system"]
  - level: RequestResponse
    resources:
      - group: apps
        resources: ["deployments/*"]
        resourceNames: [critical]
  - level: Request
    resources:
      - group: apps
        resources: ["*/scale"]
  - level: Request
    resources:
      - group: rbac.authorization.k8s.io
  - level: Metadata
    nonResourceURLs: ["/apis/*"]
  - level: Metadata
    omitStages: [ResponseComplete]
    resources: [{group: ""}]
    namespaces: [""]
"""

READER = ("banyan:bob@example.com", ("banyan:any-employee-personal-device", "system:authenticated"))
ADMIN = ("banyan:carol@example.com", ("banyan:all-admins-corporate-device", "system:authenticated"))


class PolicySemanticsTests(SynchronousTestCase):
    """
    Rules are matched as kube-apiserver matches them; the first match wins.
    """

    def setUp(self) -> None:
        self.policy = parse_policy(POLICY, "policy.yaml")

    def level(self, user: tuple[str, tuple[str, ...]] | None, method: str, uri: str) -> str:
        name, groups = user if user is not None else (None, ())
        return self.policy.evaluate(name, groups, parse_request(method, uri)).level

    def test_table(self) -> None:
        """
        Each request gets the level of the first rule that matches it.
        """
        cases = [
            (READER, "GET", "/healthz", "None"),
            (READER, "GET", "/healthz/etcd", "None"),
            (READER, "GET", "/version", "None"),
            (READER, "GET", "/versions", "None"),  # no rule matches: not audited
            (("system:kube-proxy", ()), "GET", f"{NS}/pods?watch=1", "None"),
            (("system:kube-proxy", ()), "GET", f"{NS}/pods", "None"),  # no later rule matches
            (("banyan:alice@example.com", ()), "GET", f"{NS}/secrets/s", "RequestResponse"),
            (READER, "GET", f"{NS}/secrets/s", "Metadata"),
            (READER, "POST", f"{NS}/pods/p/exec", "Request"),
            (READER, "GET", f"{NS}/pods/p/log", "None"),  # pods/exec does not cover pods/log
            (ADMIN, "GET", "/api/v1/namespaces/kube-system/pods", "Request"),
            (READER, "GET", "/api/v1/namespaces/kube-system/pods", "None"),
            (None, "GET", "/api/v1/namespaces/kube-system/pods", "None"),  # userGroups needs a user
            (READER, "PATCH", "/apis/apps/v1/namespaces/x/deployments/critical", "RequestResponse"),
            (READER, "PATCH", "/apis/apps/v1/namespaces/x/deployments/critical/status", "RequestResponse"),
            (READER, "PATCH", "/apis/apps/v1/namespaces/x/deployments/other", "None"),
            (READER, "GET", "/apis/apps/v1/namespaces/x/statefulsets/db/scale", "Request"),
            (READER, "GET", "/apis/apps/v1/namespaces/x/statefulsets/db", "None"),
            (READER, "DELETE", "/apis/rbac.authorization.k8s.io/v1/clusterroles/x", "Request"),
            (READER, "GET", "/apis/apps/v1", "Metadata"),  # non-resource, /apis/* prefix
            (READER, "GET", "/api/v1/nodes", "Metadata"),  # cluster-scoped core resource
            (READER, "GET", f"{NS}/services", "None"),  # namespaced: namespaces [""] does not match
        ]
        wrong = [
            (user and user[0], method, uri, self.level(user, method, uri), expected)
            for user, method, uri, expected in cases
            if self.level(user, method, uri) != expected
        ]
        self.assertEqual(wrong, [])

    def test_omit_stages_merged(self) -> None:
        """
        The policy's omitStages are added to every rule's own.
        """
        exec_rule = self.policy.evaluate(*READER, parse_request("POST", f"{NS}/pods/p/exec"))
        self.assertEqual(exec_rule.omit_stages, {"RequestReceived", "ResponseStarted"})
        nodes = self.policy.evaluate(*READER, parse_request("GET", "/api/v1/nodes"))
        self.assertEqual(nodes.omit_stages, {"RequestReceived", "ResponseComplete"})

    def test_default_policy(self) -> None:
        """
        Without a policy file everything is audited at Metadata without RequestReceived.
        """
        self.assertIs(load_policy(None), DEFAULT_POLICY)
        for user, method, uri in [(None, "GET", "/healthz"), (READER[0], "DELETE", f"{NS}/pods")]:
            decision = DEFAULT_POLICY.evaluate(user, (), parse_request(method, uri))
            self.assertEqual((decision.level, decision.omit_stages), ("Metadata", {"RequestReceived"}))

    def test_shipped_policies(self) -> None:
        """
        The shipped policy and the commented example load and behave as documented.
        """
        shipped = load_policy(repository_file("etc", "banyan-kproxy", "audit-policy.yaml"))
        decision = shipped.evaluate(*READER, parse_request("GET", f"{NS}/pods"))
        self.assertEqual((decision.level, decision.omit_stages), ("Metadata", {"RequestReceived"}))
        example = load_policy(repository_file("etc", "banyan-kproxy", "audit-policy-example.yaml"))
        self.assertEqual(
            example.evaluate(*READER, parse_request("GET", f"{NS}/secrets/x")).level, "Metadata"
        )
        self.assertEqual(
            example.evaluate(*READER, parse_request("POST", f"{NS}/pods/p/exec")).level, "Request"
        )
        self.assertEqual(example.evaluate(*READER, parse_request("GET", "/healthz")).level, "None")


class PolicyValidationTests(SynchronousTestCase):
    """
    A bad policy is refused with a message naming the file and the rule.
    """

    def refused(self, text: str) -> str:
        error = self.assertRaises(PolicyError, parse_policy, text, "/etc/p.yaml")
        self.assertIsInstance(error, AuditConfigError)
        self.assertIsInstance(error, ValueError)
        return str(error)

    def test_messages(self) -> None:
        """
        Each kind of mistake gets its own one-line message.
        """
        head = "apiVersion: audit.k8s.io/v1\nkind: Policy\n"
        cases = {
            head + "rules:\n- level: Metadta\n":
                "/etc/p.yaml: rules[0].level: unsupported value 'Metadta': supported values: "
                "None, Metadata, Request, RequestResponse",
            head + "rules:\n- level: Metadata\n- users: [a]\n": "/etc/p.yaml: rules[1].level: required value",
            head + "rules:\n- level: None\n  nonResourceURLs: [healthz]\n":
                "/etc/p.yaml: rules[0].nonResourceURLs[0]: 'healthz': non-resource URL rules must "
                "begin with a '/' character",
            head + "rules:\n- level: None\n  nonResourceURLs: ['/a*/b']\n":
                "/etc/p.yaml: rules[0].nonResourceURLs[0]: '/a*/b': non-resource URL wildcards '*' "
                "must be the final character of the rule",
            head + "rules:\n- level: None\n  nonResourceURLs: [/x]\n  namespaces: [a]\n":
                "/etc/p.yaml: rules[0].nonResourceURLs: rules cannot apply to both regular "
                "resources and non-resource URLs",
            head + "rules:\n- level: None\n  resources: [{group: apps/v1}]\n":
                "/etc/p.yaml: rules[0].resources[0].group: 'apps/v1' is not a lower-case DNS "
                "subdomain (give the group without its version: apps, not apps/v1)",
            head + "rules:\n- level: None\n  resources: [{resourceNames: [x]}]\n":
                "/etc/p.yaml: rules[0].resources[0].resourceNames: using resourceNames requires "
                "at least one resource",
            head + "rules:\n- level: None\n  resource: [pods]\n":
                "/etc/p.yaml: rules[0]: unknown field resource (known: level, namespaces, "
                "nonResourceURLs, omitManagedFields, omitStages, resources, userGroups, users, verbs)",
            head + "omitStages: [Started]\nrules:\n- level: None\n":
                "/etc/p.yaml: omitStages: unsupported value 'Started': supported values: "
                "RequestReceived, ResponseStarted, ResponseComplete, Panic",
            head + "rules: []\n":
                "/etc/p.yaml: rules: a policy needs at least one rule (no rule would audit nothing)",
            "apiVersion: audit.k8s.io/v1\nkind: Pollicy\nrules: [{level: None}]\n":
                "/etc/p.yaml: kind: 'Pollicy': expected Policy",
            "kind: Policy\nrules: [{level: None}]\n": "/etc/p.yaml: apiVersion: None: expected audit.k8s.io/v1",
            head + "rules:\n- level: None\n  users: alice\n": "/etc/p.yaml: rules[0].users: must be a list of strings",
            "rules: [\n": "/etc/p.yaml: not valid YAML:",
        }
        for text, message in cases.items():
            self.assertTrue(self.refused(text).startswith(message), (self.refused(text), message))
            self.assertNotIn("\n", self.refused(text))

    def test_kubernetes_extras_accepted(self) -> None:
        """
        metadata, omitManagedFields and older API versions, as real policies carry
        them, are accepted.
        """
        policy = parse_policy(
            "apiVersion: audit.k8s.io/v1beta1\nkind: Policy\nmetadata: {name: p}\n"
            "omitManagedFields: true\nrules:\n- level: Request\n  omitManagedFields: false\n- level: Metadata\n",
            "p",
        )
        self.assertEqual([r.omit_managed_fields for r in policy.rules], [False, True])

    def test_unreadable_file(self) -> None:
        """
        A policy file that cannot be read is named in the error.
        """
        path = os.path.join(self.mktemp(), "missing.yaml")
        error = self.assertRaises(PolicyError, load_policy, path)
        self.assertEqual(str(error), f"{path}: cannot be read: No such file or directory")
