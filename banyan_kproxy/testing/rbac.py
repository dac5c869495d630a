"""
Kubernetes RBAC, evaluated the way kube-apiserver's RBAC authorizer does, for tests.

`RBAC` holds Roles, ClusterRoles, RoleBindings and ClusterRoleBindings loaded from
the same YAML one would ``kubectl apply`` (multi-document streams and ``kind: List``
included), on top of the built-in ClusterRoles of a fresh cluster that matter here
(``cluster-admin``, ``system:discovery``, ``system:basic-user``,
``system:public-info-viewer``, ``system:auth-delegator``).  `RBAC.authorize` takes
the request `Attributes` kube-apiserver derives from a request and answers allow or
deny with the same reason strings; `forbidden_status` builds the ``Status`` body the
apiserver answers a denied request with, message and ``details`` included.

The matching rules follow ``k8s.io/kubernetes/pkg/apis/rbac/v1`` (``VerbMatches``,
``APIGroupMatches``, ``ResourceMatches`` with ``*/subresource``,
``ResourceNameMatches``, ``NonResourceURLMatches`` with a trailing ``*``) and the
authorizer's visiting order (ClusterRoleBindings, then the RoleBindings of the
request's namespace).  Aggregated ClusterRoles (``aggregationRule``) are not expanded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources as _resources
from typing import Any, Union

import yaml
from attr import field, frozen

from banyan_kproxy.status import forbidden_message as _forbidden_message
from banyan_kproxy.status import go_quote, status

#: The API group of RBAC objects, and of ``User`` / ``Group`` subjects.
RBAC_GROUP = "rbac.authorization.k8s.io"

#: The group every authenticated user is in, and the one anonymous requests get.
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
ANONYMOUS = "system:anonymous"

_SA_PREFIX = "system:serviceaccount:"

PathLike = Union[str, "os.PathLike[str]"]


class RBACError(ValueError):
    """
    An RBAC document that cannot be loaded (wrong shape, missing name or roleRef).
    """


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise RBACError(f"expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


@frozen
class PolicyRule:
    """
    One ``rules`` entry of a Role or ClusterRole.
    """

    verbs: tuple[str, ...] = ()
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, rule: Mapping[str, Any]) -> PolicyRule:
        """
        The rule a YAML ``rules`` entry describes.
        """
        if not isinstance(rule, Mapping):
            raise RBACError(f"a rule must be a mapping, got {rule!r}")
        return cls(
            verbs=_strings(rule.get("verbs")),
            api_groups=_strings(rule.get("apiGroups")),
            resources=_strings(rule.get("resources")),
            resource_names=_strings(rule.get("resourceNames")),
            non_resource_urls=_strings(rule.get("nonResourceURLs")),
        )

    def allows(self, attributes: Attributes) -> bool:
        """
        Whether this rule grants the request ``attributes`` describe (``RuleAllows``).
        """
        if not ("*" in self.verbs or attributes.verb in self.verbs):
            return False
        if not attributes.resource_request:
            return self._url_matches(attributes.path)
        if not ("*" in self.api_groups or attributes.api_group in self.api_groups):
            return False
        if not self._resource_matches(attributes.resource, attributes.subresource):
            return False
        return not self.resource_names or attributes.name in self.resource_names

    def _resource_matches(self, resource: str, subresource: str) -> bool:
        combined = resource + "/" + subresource if subresource else resource
        for rule_resource in self.resources:
            if rule_resource == "*" or rule_resource == combined:
                return True
            if subresource and rule_resource == "*/" + subresource:
                return True
        return False

    def _url_matches(self, path: str) -> bool:
        for url in self.non_resource_urls:
            if url == "*" or url == path:
                return True
            if url.endswith("*") and path.startswith(url.rstrip("*")):
                return True
        return False


@frozen
class Role:
    """
    A Role (``namespace`` set) or a ClusterRole (``namespace`` empty).
    """

    name: str
    namespace: str
    rules: tuple[PolicyRule, ...]

    @property
    def kind(self) -> str:
        """
        ``Role`` or ``ClusterRole``.
        """
        return "Role" if self.namespace else "ClusterRole"


@frozen
class Subject:
    """
    One ``subjects`` entry of a binding: a User, Group or ServiceAccount.
    """

    kind: str
    name: str
    namespace: str = ""

    def applies_to(self, user: str, groups: Sequence[str], binding_namespace: str) -> bool:
        """
        Whether a request by ``user`` in ``groups`` is this subject (``appliesToUser``).
        """
        if self.kind == "User":
            return user == self.name
        if self.kind == "Group":
            return self.name in groups
        if self.kind == "ServiceAccount":
            namespace = self.namespace or binding_namespace
            if not namespace:
                return False
            return user == f"{_SA_PREFIX}{namespace}:{self.name}"
        return False

    def describe(self, binding_namespace: str) -> str:
        """
        The subject as the RBAC authorizer's "allowed by" reason names it.
        """
        if self.kind == "ServiceAccount":
            namespace = self.namespace or binding_namespace
            return f"{self.kind} {go_quote(self.name + '/' + namespace)}"
        return f"{self.kind} {go_quote(self.name)}"


@frozen
class Binding:
    """
    A RoleBinding (``namespace`` set) or a ClusterRoleBinding (``namespace`` empty).
    """

    name: str
    namespace: str
    role_kind: str
    role_name: str
    subjects: tuple[Subject, ...]

    @property
    def kind(self) -> str:
        """
        ``RoleBinding`` or ``ClusterRoleBinding``.
        """
        return "RoleBinding" if self.namespace else "ClusterRoleBinding"

    def describe(self, subject: Subject) -> str:
        """
        The binding as the RBAC authorizer's "allowed by" reason names it.
        """
        name = self.name + "/" + self.namespace if self.namespace else self.name
        return (
            f"{self.kind} {go_quote(name)} of {self.role_kind} {go_quote(self.role_name)}"
            f" to {subject.describe(self.namespace)}"
        )


def _tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@frozen
class Attributes:
    """
    What kube-apiserver asks its authorizer about one request (``authorizer.Attributes``).

    A resource request names ``verb``, ``api_group``, ``resource`` (plural),
    ``subresource``, ``namespace`` (empty at the cluster scope) and ``name`` (empty for
    collections); a non-resource request names ``verb`` (the HTTP method in lower case)
    and ``path``.
    """

    user: str
    groups: tuple[str, ...] = field(converter=_tuple, default=())
    verb: str = "get"
    resource_request: bool = True
    namespace: str = ""
    api_group: str = ""
    api_version: str = "v1"
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""


@frozen
class Decision:
    """
    An authorization answer and the reason the RBAC authorizer gives for it.
    """

    allowed: bool
    reason: str = ""


def qualified_resource(resource: str, api_group: str) -> str:
    """
    ``schema.GroupResource.String()``: ``pods``, or ``userextras.authentication.k8s.io``.
    """
    return f"{resource}.{api_group}" if api_group else resource


def forbidden_message(attributes: Attributes, reason: str = "") -> str:
    """
    The ``message`` of kube-apiserver's Forbidden ``Status`` for a denied request
    (L{banyan_kproxy.status.forbidden_message} for these attributes).
    """
    if not attributes.resource_request:
        return _forbidden_message(attributes.user, attributes.verb, path=attributes.path, reason=reason)
    return _forbidden_message(
        attributes.user,
        attributes.verb,
        resource=attributes.resource,
        subresource=attributes.subresource,
        api_group=attributes.api_group,
        namespace=attributes.namespace,
        name=attributes.name,
        reason=reason,
    )


def forbidden_status(attributes: Attributes, reason: str = "") -> dict[str, Any]:
    """
    The whole 403 ``Status`` object kube-apiserver answers a denied request with.

    ``details`` holds ``name`` (named requests), ``group`` (non-core groups) and
    ``kind`` (the plural resource, without subresource); it is ``{}`` for
    non-resource requests, as Go's ``omitempty`` leaves it.
    """
    details: dict[str, Any] = {}
    if attributes.resource_request:
        if attributes.name:
            details["name"] = attributes.name
        if attributes.api_group:
            details["group"] = attributes.api_group
        if attributes.resource:
            details["kind"] = attributes.resource
    return with_details(status(403, forbidden_message(attributes, reason), "Forbidden"), details)


def with_details(body: Mapping[str, Any], details: Mapping[str, Any]) -> dict[str, Any]:
    """
    A ``Status`` with ``details`` set (even when empty), its keys in the order
    kube-apiserver writes them (``details`` just before ``code``).
    """
    out = {k: v for k, v in body.items() if k not in ("details", "code")}
    out["details"] = dict(details)
    out["code"] = body["code"]
    return out


def load_documents(text: str | bytes) -> list[dict[str, Any]]:
    """
    The objects in a YAML (or JSON) stream, with ``kind: List`` (and ``RoleList`` and
    the like) flattened into their items and empty documents dropped.
    """
    out: list[dict[str, Any]] = []

    def add(document: Any) -> None:
        if document is None:
            return
        if not isinstance(document, Mapping):
            raise RBACError(f"a document must be a mapping, got {document!r}")
        kind = document.get("kind", "")
        if isinstance(kind, str) and kind.endswith("List") and "items" in document:
            for item in document.get("items") or ():
                add(item)
            return
        out.append(dict(document))

    for document in yaml.safe_load_all(text):
        add(document)
    return out


def _metadata(document: Mapping[str, Any]) -> tuple[str, str]:
    metadata = document.get("metadata") or {}
    name = metadata.get("name")
    if not name:
        raise RBACError(f"{document.get('kind')} without metadata.name")
    return str(name), str(metadata.get("namespace") or "")


class RBAC:
    """
    An RBAC policy store and authorizer, built from real Role / ClusterRole /
    RoleBinding / ClusterRoleBinding documents.

    Documents of other kinds are ignored, so a manifest that also holds a Namespace or
    ServiceAccount loads as it is.  A Role or RoleBinding without a namespace lands in
    ``default``, as ``kubectl apply`` with a default context would put it; a document
    replaces an earlier one of the same kind, namespace and name.
    """

    def __init__(self, *, bootstrap: bool = True) -> None:
        """
        An empty policy, holding the built-in roles and bindings when ``bootstrap``.
        """
        self._roles: dict[tuple[str, str], Role] = {}
        self._bindings: dict[tuple[str, str], Binding] = {}
        if bootstrap:
            self.load_yaml(bootstrap_yaml())

    @classmethod
    def from_yaml(cls, *texts: str | bytes, bootstrap: bool = True) -> RBAC:
        """
        A policy holding the built-ins (when ``bootstrap``) and every given YAML text.
        """
        rbac = cls(bootstrap=bootstrap)
        for text in texts:
            rbac.load_yaml(text)
        return rbac

    def load_yaml(self, text: str | bytes) -> None:
        """
        Add every RBAC object in a YAML stream.
        """
        self.load_documents(load_documents(text))

    def load_file(self, path: PathLike) -> None:
        """
        Add every RBAC object in a YAML file.
        """
        with open(path, "rb") as f:
            self.load_yaml(f.read())

    def load_documents(self, documents: Iterable[Mapping[str, Any]]) -> None:
        """
        Add RBAC objects already parsed into mappings.
        """
        for document in documents:
            kind = document.get("kind")
            api_version = str(document.get("apiVersion") or "")
            if kind not in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
                continue
            if not api_version.startswith(RBAC_GROUP + "/"):
                raise RBACError(f"{kind} with apiVersion {api_version!r}")
            name, namespace = _metadata(document)
            if kind in ("Role", "RoleBinding"):
                namespace = namespace or "default"
            else:
                namespace = ""
            if kind in ("Role", "ClusterRole"):
                rules = tuple(PolicyRule.from_dict(r) for r in document.get("rules") or ())
                self._roles[(namespace, name)] = Role(name, namespace, rules)
            else:
                self._bindings[(namespace, name)] = self._binding(
                    document, kind, name, namespace
                )

    @staticmethod
    def _binding(
        document: Mapping[str, Any], kind: str, name: str, namespace: str
    ) -> Binding:
        role_ref = document.get("roleRef") or {}
        role_kind = role_ref.get("kind")
        role_name = role_ref.get("name")
        if role_kind not in ("Role", "ClusterRole") or not role_name:
            raise RBACError(f"{kind} {name!r} has no usable roleRef: {role_ref!r}")
        if kind == "ClusterRoleBinding" and role_kind != "ClusterRole":
            raise RBACError(f"ClusterRoleBinding {name!r} may only reference a ClusterRole")
        subjects = []
        for s in document.get("subjects") or ():
            if s.get("kind") not in ("User", "Group", "ServiceAccount") or not s.get("name"):
                raise RBACError(f"{kind} {name!r} has an unusable subject: {s!r}")
            subjects.append(
                Subject(str(s["kind"]), str(s["name"]), str(s.get("namespace") or ""))
            )
        return Binding(name, namespace, str(role_kind), str(role_name), tuple(subjects))

    def roles(self) -> list[Role]:
        """
        Every Role and ClusterRole held.
        """
        return list(self._roles.values())

    def bindings(self) -> list[Binding]:
        """
        Every RoleBinding and ClusterRoleBinding held.
        """
        return list(self._bindings.values())

    def _rules_for(self, binding: Binding) -> tuple[tuple[PolicyRule, ...] | None, str]:
        namespace = binding.namespace if binding.role_kind == "Role" else ""
        role = self._roles.get((namespace, binding.role_name))
        if role is None:
            resource = "role" if binding.role_kind == "Role" else "clusterrole"
            return None, f"{resource}.{RBAC_GROUP} {go_quote(binding.role_name)} not found"
        return role.rules, ""

    def _applicable(
        self, user: str, groups: Sequence[str], namespace: str
    ) -> list[tuple[Binding, Subject]]:
        candidates = [b for b in self._bindings.values() if not b.namespace]
        if namespace:
            candidates += [b for b in self._bindings.values() if b.namespace == namespace]
        out = []
        for binding in candidates:
            for subject in binding.subjects:
                if subject.applies_to(user, groups, binding.namespace):
                    out.append((binding, subject))
                    break
        return out

    def rules_review(
        self, user: str, groups: Sequence[str], namespace: str
    ) -> dict[str, Any]:
        """
        The ``status`` of a SelfSubjectRulesReview: every rule granted to the user in
        ``namespace`` (cluster-wide ones included).
        """
        resource_rules: list[dict[str, Any]] = []
        non_resource_rules: list[dict[str, Any]] = []
        errors: list[str] = []
        for binding, _ in self._applicable(user, groups, namespace):
            rules, error = self._rules_for(binding)
            if rules is None:
                errors.append(error)
                continue
            for rule in rules:
                if rule.non_resource_urls:
                    non_resource_rules.append(
                        {"verbs": list(rule.verbs), "nonResourceURLs": list(rule.non_resource_urls)}
                    )
                if rule.resources:
                    entry: dict[str, Any] = {
                        "verbs": list(rule.verbs),
                        "apiGroups": list(rule.api_groups),
                        "resources": list(rule.resources),
                    }
                    if rule.resource_names:
                        entry["resourceNames"] = list(rule.resource_names)
                    resource_rules.append(entry)
        out: dict[str, Any] = {
            "resourceRules": resource_rules,
            "nonResourceRules": non_resource_rules,
            "incomplete": bool(errors),
        }
        if errors:
            out["evaluationError"] = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
        return out

    def authorize(self, attributes: Attributes) -> Decision:
        """
        Allow or deny a request as kube-apiserver's RBAC authorizer does.

        An allow carries ``RBAC: allowed by ClusterRoleBinding "b" of ClusterRole "r"
        to Group "g"``; a deny carries ``RBAC: ...`` only when a binding that applies
        to the user references a role that does not exist (otherwise it is empty).
        """
        errors: list[str] = []
        applicable = self._applicable(attributes.user, attributes.groups, attributes.namespace)
        for binding, subject in applicable:
            rules, error = self._rules_for(binding)
            if rules is None:
                errors.append(error)
                continue
            if any(rule.allows(attributes) for rule in rules):
                return Decision(True, f"RBAC: allowed by {binding.describe(subject)}")
        if not errors:
            return Decision(False, "")
        if len(errors) == 1:
            return Decision(False, "RBAC: " + errors[0])
        return Decision(False, "RBAC: [" + ", ".join(errors) + "]")


def _read_fixture(name: str) -> str:
    return _resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def bootstrap_yaml() -> str:
    """
    The built-in ClusterRoles and ClusterRoleBindings a fresh cluster has, as YAML.
    """
    return _read_fixture("bootstrap-rbac.yaml")


def seed_rbac_yaml() -> str:
    """
    The seed document's Step 4 Role, RoleBinding and ClusterRoleBinding, as YAML.
    """
    return _read_fixture("seed-rbac.yaml")
