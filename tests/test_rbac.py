"""
Tests for L{banyan_kproxy.testing.rbac}: RBAC decisions and Forbidden messages as
kube-apiserver makes them.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.testing.rbac import (
    AUTHENTICATED,
    RBAC,
    Attributes,
    Decision,
    RBACError,
    forbidden_message,
    forbidden_status,
    go_quote,
    load_documents,
    seed_rbac_yaml,
)

USER = "banyan:myuser@example.com"
READER = (
    "banyan:any-employee-personal-device",
    AUTHENTICATED,
)
ADMIN = ("banyan:all-admins-corporate-device", AUTHENTICATED)

SEED_SERVICES_MESSAGE = (
    'services is forbidden: User "banyan:myuser@example.com" cannot list resource "services"'
    ' in API group "" in the namespace "default"'
)


def reader(**kwargs: object) -> Attributes:
    """
    Request attributes for the seed's reader (any-employee-personal-device).
    """
    return Attributes(user=USER, groups=READER, **kwargs)  # type: ignore[arg-type]


class SeedPolicyTests(SynchronousTestCase):
    """
    The seed's Step 4 RBAC objects, decided as a real cluster decides them.
    """

    def setUp(self) -> None:
        self.rbac = RBAC.from_yaml(seed_rbac_yaml())

    def test_reader_lists_pods_in_default(self) -> None:
        """
        A personal-device employee may list pods in default, allowed by the RoleBinding.
        """
        decision = self.rbac.authorize(reader(verb="list", resource="pods", namespace="default"))
        self.assertEqual(
            decision,
            Decision(
                True,
                'RBAC: allowed by RoleBinding "pod-reader-default-binding/default" of Role'
                ' "pod-reader-default" to Group "banyan:any-employee-personal-device"',
            ),
        )

    def test_reader_reads_pod_logs_and_watches(self) -> None:
        """
        The Role's pods/log and watch grants apply in default only.
        """
        self.assertTrue(
            self.rbac.authorize(
                reader(verb="get", resource="pods", subresource="log", name="web-1",
                       namespace="default")
            ).allowed
        )
        self.assertTrue(
            self.rbac.authorize(reader(verb="watch", resource="pods", namespace="default")).allowed
        )
        self.assertFalse(
            self.rbac.authorize(reader(verb="list", resource="pods", namespace="kube-system")).allowed
        )
        self.assertFalse(
            self.rbac.authorize(reader(verb="list", resource="pods")).allowed
        )

    def test_reader_services_forbidden_with_seed_message(self) -> None:
        """
        Listing services is denied with exactly the message the seed shows.
        """
        attributes = reader(verb="list", resource="services", namespace="default")
        decision = self.rbac.authorize(attributes)
        self.assertEqual(decision, Decision(False, ""))
        self.assertEqual(forbidden_message(attributes), SEED_SERVICES_MESSAGE)

    def test_forbidden_status_body(self) -> None:
        """
        The Forbidden Status carries reason Forbidden, code 403 and details.kind only.
        """
        attributes = reader(verb="list", resource="services", namespace="default")
        self.assertEqual(
            forbidden_status(attributes),
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": SEED_SERVICES_MESSAGE,
                "reason": "Forbidden",
                "details": {"kind": "services"},
                "code": 403,
            },
        )

    def test_admin_may_do_anything(self) -> None:
        """
        The all-admins-corporate-device group gets cluster-admin, paths included.
        """
        for attributes in [
            Attributes(USER, ADMIN, verb="list", resource="services", namespace="default"),
            Attributes(USER, ADMIN, verb="delete", resource="namespaces", name="kube-system",
                       namespace="kube-system"),
            Attributes(USER, ADMIN, verb="create", api_group="apps", resource="deployments",
                       namespace="prod"),
            Attributes(USER, ADMIN, verb="post", resource_request=False, path="/metrics/x"),
        ]:
            decision = self.rbac.authorize(attributes)
            self.assertEqual(
                decision.reason,
                'RBAC: allowed by ClusterRoleBinding "cluster-admin-binding" of ClusterRole'
                ' "cluster-admin" to Group "banyan:all-admins-corporate-device"',
            )

    def test_seed_fixture_is_the_seed_text(self) -> None:
        """
        The fixture holds the three Step 4 objects with the seed's names and subjects.
        """
        documents = load_documents(seed_rbac_yaml())
        self.assertEqual(
            [(d["kind"], d["metadata"]["name"]) for d in documents],
            [
                ("Role", "pod-reader-default"),
                ("RoleBinding", "pod-reader-default-binding"),
                ("ClusterRoleBinding", "cluster-admin-binding"),
            ],
        )
        self.assertEqual(
            documents[0]["rules"],
            [{"apiGroups": [""], "resources": ["pods", "pods/log"],
              "verbs": ["get", "list", "watch"]}],
        )


class MessageTests(SynchronousTestCase):
    """
    Forbidden messages and details in every shape kube-apiserver produces.
    """

    def test_named_object(self) -> None:
        """
        A named request names the object before "is forbidden" and in details.
        """
        attributes = Attributes("bob", verb="get", resource="pods", name="web-1", namespace="default")
        body = forbidden_status(attributes)
        self.assertEqual(
            body["message"],
            'pods "web-1" is forbidden: User "bob" cannot get resource "pods" in API group ""'
            ' in the namespace "default"',
        )
        self.assertEqual(body["details"], {"name": "web-1", "kind": "pods"})

    def test_subresource(self) -> None:
        """
        A subresource shows as resource/subresource after "cannot create resource".
        """
        attributes = Attributes(
            USER, READER, verb="create", resource="pods", subresource="exec", name="web-1",
            namespace="default",
        )
        self.assertEqual(
            forbidden_message(attributes),
            'pods "web-1" is forbidden: User "banyan:myuser@example.com" cannot create resource'
            ' "pods/exec" in API group "" in the namespace "default"',
        )
        self.assertEqual(forbidden_status(attributes)["details"], {"name": "web-1", "kind": "pods"})

    def test_cluster_scope(self) -> None:
        """
        A request without a namespace is "at the cluster scope".
        """
        self.assertEqual(
            forbidden_message(Attributes("bob", verb="list", resource="namespaces")),
            'namespaces is forbidden: User "bob" cannot list resource "namespaces" in API group ""'
            " at the cluster scope",
        )

    def test_api_group(self) -> None:
        """
        A non-core group qualifies the resource in the prefix and shows in details.group.
        """
        attributes = Attributes(
            "bob", verb="list", api_group="apps", resource="deployments", namespace="default"
        )
        body = forbidden_status(attributes)
        self.assertEqual(
            body["message"],
            'deployments.apps is forbidden: User "bob" cannot list resource "deployments" in API'
            ' group "apps" in the namespace "default"',
        )
        self.assertEqual(body["details"], {"group": "apps", "kind": "deployments"})

    def test_impersonation_of_a_user(self) -> None:
        """
        Refused impersonation names the user and the impersonate verb at the cluster scope.
        """
        attributes = Attributes(
            "system:serviceaccount:x:y", verb="impersonate", resource="users", name="alice"
        )
        self.assertEqual(
            forbidden_message(attributes),
            'users "alice" is forbidden: User "system:serviceaccount:x:y" cannot impersonate'
            ' resource "users" in API group "" at the cluster scope',
        )

    def test_non_resource_path(self) -> None:
        """
        A non-resource request is "forbidden: ... cannot get path" with empty details.
        """
        attributes = Attributes("bob", verb="get", resource_request=False, path="/healthz")
        body = forbidden_status(attributes)
        self.assertEqual(body["message"], 'forbidden: User "bob" cannot get path "/healthz"')
        self.assertEqual(body["details"], {})

    def test_reason_appended(self) -> None:
        """
        An authorizer reason follows the message after a colon.
        """
        self.assertEqual(
            forbidden_message(Attributes("bob", verb="list", resource="pods", namespace="a"), "why"),
            'pods is forbidden: User "bob" cannot list resource "pods" in API group "" in the'
            ' namespace "a": why',
        )

    def test_go_quoting(self) -> None:
        """
        Names are quoted like Go's %q: quotes, backslashes and control bytes escaped.
        """
        self.assertEqual(go_quote('a"b\\c\nd\x01é'), '"a\\"b\\\\c\\nd\\x01é"')


def policy(*texts: str) -> RBAC:
    """
    An RBAC policy of the built-ins plus the given YAML.
    """
    return RBAC.from_yaml(*texts)


class RuleMatchingTests(SynchronousTestCase):
    """
    Rule fields match as in k8s.io/kubernetes/pkg/apis/rbac/v1.
    """

    def test_resource_names(self) -> None:
        """
        A rule with resourceNames grants those objects only, never collections.
        """
        rbac = policy("""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: one-pod}
rules:
- apiGroups: [""]
  resources: [pods]
  resourceNames: [web-1]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: one-pod}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: one-pod}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
""")
        self.assertTrue(
            rbac.authorize(Attributes("bob", verb="get", resource="pods", name="web-1",
                                      namespace="a")).allowed
        )
        self.assertFalse(
            rbac.authorize(Attributes("bob", verb="get", resource="pods", name="web-2",
                                      namespace="a")).allowed
        )
        self.assertFalse(
            rbac.authorize(Attributes("bob", verb="list", resource="pods", namespace="a")).allowed
        )

    def test_wildcards(self) -> None:
        """
        "*" verbs, groups and resources, "*/scale" and "/logs/*" URLs match what they cover.
        """
        rbac = policy("""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: mixed}
rules:
- apiGroups: ["*"]
  resources: ["*/scale"]
  verbs: ["*"]
- nonResourceURLs: ["/logs/*", "/exact"]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: mixed}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: mixed}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: ops}
""")

        def allowed(**kwargs: object) -> bool:
            return rbac.authorize(Attributes("u", ("ops",), **kwargs)).allowed  # type: ignore[arg-type]

        self.assertTrue(allowed(verb="patch", api_group="apps", resource="deployments",
                                subresource="scale", namespace="a"))
        self.assertFalse(allowed(verb="patch", api_group="apps", resource="deployments",
                                 namespace="a"))
        self.assertTrue(allowed(verb="get", resource_request=False, path="/logs/kubelet.log"))
        self.assertTrue(allowed(verb="get", resource_request=False, path="/exact"))
        self.assertFalse(allowed(verb="get", resource_request=False, path="/exact/more"))
        self.assertFalse(allowed(verb="post", resource_request=False, path="/logs/x"))

    def test_service_account_subjects(self) -> None:
        """
        A ServiceAccount subject is system:serviceaccount:NS:NAME, its namespace defaulting
        to the RoleBinding's.
        """
        rbac = policy("""
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: sa-view, namespace: team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader}
subjects:
- {kind: ServiceAccount, name: builder}
- {kind: ServiceAccount, name: deployer, namespace: ci}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules:
- {apiGroups: [""], resources: [pods], verbs: [list]}
""")

        def can_list(user: str, namespace: str) -> Decision:
            return rbac.authorize(Attributes(user, verb="list", resource="pods", namespace=namespace))

        self.assertEqual(
            can_list("system:serviceaccount:team:builder", "team").reason,
            'RBAC: allowed by RoleBinding "sa-view/team" of ClusterRole "reader" to'
            ' ServiceAccount "builder/team"',
        )
        self.assertTrue(can_list("system:serviceaccount:ci:deployer", "team").allowed)
        self.assertFalse(can_list("system:serviceaccount:ci:builder", "team").allowed)
        self.assertFalse(can_list("system:serviceaccount:team:builder", "other").allowed)

    def test_missing_role_reason(self) -> None:
        """
        A binding to a role that does not exist makes the denial say so, as RBAC does.
        """
        rbac = policy("""
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: dangling, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: nope}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
""")
        attributes = Attributes("bob", verb="list", resource="pods", namespace="default")
        decision = rbac.authorize(attributes)
        self.assertEqual(
            decision, Decision(False, 'RBAC: role.rbac.authorization.k8s.io "nope" not found')
        )
        self.assertEqual(
            forbidden_message(attributes, decision.reason),
            'pods is forbidden: User "bob" cannot list resource "pods" in API group "" in the'
            ' namespace "default": RBAC: role.rbac.authorization.k8s.io "nope" not found',
        )

    def test_built_in_discovery(self) -> None:
        """
        Every authenticated user may read discovery and create self reviews; anonymous
        users only /version and health.
        """
        rbac = policy()
        for path in ["/api", "/api/v1", "/apis", "/apis/apps/v1", "/version", "/openapi/v3",
                     "/openapi/v3/api/v1", "/healthz"]:
            self.assertTrue(
                rbac.authorize(Attributes("u", (AUTHENTICATED,), verb="get",
                                          resource_request=False, path=path)).allowed,
                path,
            )
        self.assertTrue(
            rbac.authorize(Attributes("u", (AUTHENTICATED,), verb="create",
                                      api_group="authorization.k8s.io",
                                      resource="selfsubjectaccessreviews")).allowed
        )
        anonymous = ("system:unauthenticated",)
        self.assertTrue(rbac.authorize(Attributes("system:anonymous", anonymous, verb="get",
                                                  resource_request=False, path="/version")).allowed)
        self.assertFalse(rbac.authorize(Attributes("system:anonymous", anonymous, verb="get",
                                                   resource_request=False, path="/api")).allowed)
        self.assertFalse(rbac.authorize(Attributes("u", (AUTHENTICATED,), verb="get",
                                                   resource_request=False, path="/metrics")).allowed)

    def test_rules_review(self) -> None:
        """
        A rules review lists the namespace's rules and the cluster-wide ones.
        """
        review = RBAC.from_yaml(seed_rbac_yaml()).rules_review(USER, READER, "default")
        self.assertIn(
            {"verbs": ["get", "list", "watch"], "apiGroups": [""], "resources": ["pods", "pods/log"]},
            review["resourceRules"],
        )
        self.assertIn({"verbs": ["get"], "nonResourceURLs": ["/healthz", "/livez", "/readyz",
                                                             "/version", "/version/"]},
                      review["nonResourceRules"])
        self.assertFalse(review["incomplete"])


class LoadingTests(SynchronousTestCase):
    """
    YAML is loaded the way kubectl apply would take it.
    """

    def test_list_and_other_kinds(self) -> None:
        """
        kind: List items are loaded and non-RBAC documents are skipped.
        """
        rbac = RBAC.from_yaml("""
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: banyan-kproxy}
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRole
  metadata: {name: impersonator}
  rules:
  - {apiGroups: [""], resources: [users, groups], verbs: [impersonate]}
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRoleBinding
  metadata: {name: impersonator}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: impersonator}
  subjects:
  - {kind: ServiceAccount, name: banyan-kproxy, namespace: banyan-kproxy}
""", bootstrap=False)
        self.assertEqual(
            sorted((r.kind, r.name) for r in rbac.roles()), [("ClusterRole", "impersonator")]
        )
        self.assertTrue(
            rbac.authorize(Attributes(
                "system:serviceaccount:banyan-kproxy:banyan-kproxy", verb="impersonate",
                resource="groups", name="banyan:any-employee-personal-device",
            )).allowed
        )

    def test_later_document_replaces_earlier(self) -> None:
        """
        Loading an object again under the same name replaces it, as kubectl apply does.
        """
        role = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: r}
rules:
- {apiGroups: [""], resources: [%s], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: r}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: r}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}]
"""
        rbac = RBAC.from_yaml(role % "pods", role % "services", bootstrap=False)
        get = Attributes("bob", verb="get", resource="services", name="x", namespace="default")
        self.assertTrue(rbac.authorize(get).allowed)
        self.assertFalse(rbac.authorize(Attributes("bob", verb="get", resource="pods", name="x",
                                                   namespace="default")).allowed)

    def test_load_file(self) -> None:
        """
        A YAML file on disk loads like its text.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(seed_rbac_yaml())
        rbac = RBAC(bootstrap=False)
        rbac.load_file(path)
        self.assertEqual(
            sorted((b.kind, b.name) for b in rbac.bindings()),
            [("ClusterRoleBinding", "cluster-admin-binding"),
             ("RoleBinding", "pod-reader-default-binding")],
        )

    def test_bad_documents(self) -> None:
        """
        Bindings without a usable roleRef, nameless objects and non-mappings are refused.
        """
        for text in [
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: x}\n",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {}\n",
            "- just a list\n",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n"
            "metadata: {name: x}\nroleRef: {kind: Role, name: r}\n",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: x}\n"
            "rules: [{verbs: get}]\n",
        ]:
            self.assertRaises(RBACError, RBAC.from_yaml, text)
