"""
The audit policy: a Kubernetes ``audit.k8s.io/v1`` ``Policy`` read from YAML.

The semantics are kube-apiserver's (``k8s.io/apiserver/pkg/audit/policy``): rules are
tried in order and the first that matches decides the level (``None``, ``Metadata``,
``Request``, ``RequestResponse``) and the stages left out; a request no rule matches
is not audited.  A rule matches when every field it sets matches: ``users`` (the
user name), ``userGroups`` (any of the user's groups), ``verbs``, ``namespaces``
(``""`` for cluster-scoped resources), ``resources`` (group, resources with
``pods/exec``, ``*``, ``*/status`` and ``pods/*`` forms, resourceNames) and
``nonResourceURLs`` (exact, ``*``, or a trailing ``*`` prefix match).  The policy's
``omitStages`` are added to every rule's.

Policies are validated as kube-apiserver validates them, and a little more
strictly: a key kube-apiserver would silently ignore (``resource:`` for
``resources:``) is refused, because a misspelt rule that matches everything or
nothing changes what the audit trail holds without anyone noticing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from attr import frozen

from banyan_kproxy.audit.errors import AuditConfigError

__all__ = [
    "LEVELS",
    "STAGES",
    "PolicyError",
    "Policy",
    "PolicyRule",
    "GroupResources",
    "AuditDecision",
    "DEFAULT_POLICY",
    "load_policy",
    "parse_policy",
]

#: Levels in increasing order of detail.
LEVELS = ("None", "Metadata", "Request", "RequestResponse")
#: Stages of a request, in order.
STAGES = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")

_API_VERSIONS = ("audit.k8s.io/v1", "audit.k8s.io/v1beta1", "audit.k8s.io/v1alpha1")
_POLICY_KEYS = {"apiVersion", "kind", "metadata", "rules", "omitStages", "omitManagedFields"}
_RULE_KEYS = {
    "level", "users", "userGroups", "verbs", "resources", "namespaces",
    "nonResourceURLs", "omitStages", "omitManagedFields",
}
_GROUP_RESOURCE_KEYS = {"group", "resources", "resourceNames"}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class PolicyError(AuditConfigError):
    """
    A policy file that cannot be used; the message names the file and the rule.
    """


@frozen
class GroupResources:
    """
    ``resources`` entry of a rule: one API group, some resources, maybe some names.
    """

    group: str = ""
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()


@frozen
class PolicyRule:
    """
    One rule of the policy, with the policy-wide ``omitStages`` already merged in.
    """

    level: str
    users: tuple[str, ...] = ()
    user_groups: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()
    resources: tuple[GroupResources, ...] = ()
    namespaces: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()
    omit_stages: frozenset[str] = frozenset()
    omit_managed_fields: bool = False


@frozen
class AuditDecision:
    """
    What the policy decided for one request.
    """

    level: str
    omit_stages: frozenset[str] = frozenset()
    omit_managed_fields: bool = False


#: A request no rule matches is not audited.
_NOT_AUDITED = AuditDecision("None")


def _path_matches(path: str, spec: str) -> bool:
    if spec == "*" or spec == path:
        return True
    return spec.endswith("*") and path.startswith(spec.rstrip("*"))


@frozen
class Policy:
    """
    An audit policy: ordered rules, the first match wins.
    """

    rules: tuple[PolicyRule, ...]
    source: str = "<built-in>"

    def evaluate(self, user: str | None, groups: Sequence[str], info: Any) -> AuditDecision:
        """
        The level and omitted stages for a request by ``user`` (None when it was not
        authenticated) in ``groups``, classified as ``info`` (a `RequestInfo`).
        """
        for rule in self.rules:
            if _rule_matches(rule, user, groups, info):
                return AuditDecision(rule.level, rule.omit_stages, rule.omit_managed_fields)
        return _NOT_AUDITED


def _rule_matches(rule: PolicyRule, user: str | None, groups: Sequence[str], info: Any) -> bool:
    if rule.users and (user is None or user not in rule.users):
        return False
    if rule.user_groups:
        if user is None or not any(g in rule.user_groups for g in groups):
            return False
    if rule.verbs and info.verb not in rule.verbs:
        return False
    if rule.namespaces or rule.resources:
        return _rule_matches_resource(rule, info)
    if rule.non_resource_urls:
        if info.resource_request:
            return False
        return any(_path_matches(info.path, spec) for spec in rule.non_resource_urls)
    return True


def _rule_matches_resource(rule: PolicyRule, info: Any) -> bool:
    if not info.resource_request:
        return False
    if rule.namespaces and info.namespace not in rule.namespaces:
        return False
    if not rule.resources:
        return True
    resource, subresource = info.resource, info.subresource
    combined = f"{resource}/{subresource}" if subresource else resource
    for gr in rule.resources:
        if gr.group != info.api_group:
            continue
        if not gr.resources:
            return True
        for res in gr.resources:
            if gr.resource_names and info.name not in gr.resource_names:
                continue
            if res == combined or res == "*":
                return True
            if subresource and res.startswith("*/") and subresource == res.lstrip("*/"):
                return True
            if res.endswith("/*") and resource == res.rstrip("/*"):
                return True
    return False


#: No ``policy_file``: every request at ``Metadata``, one event per stage that ends
#: or starts a response (the seed's ``configmap.yaml`` policy).
DEFAULT_POLICY = Policy(
    (PolicyRule("Metadata", omit_stages=frozenset({"RequestReceived"})),),
    source="<default: Metadata for everything, RequestReceived omitted>",
)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: must be a list of strings")
    return tuple(value)


def _known(value: Any, keys: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where}: must be a mapping")
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        raise PolicyError(
            f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
            f" (known: {', '.join(sorted(keys))})"
        )
    return value


def _stages(value: Any, where: str) -> frozenset[str]:
    stages = _strings(value, where)
    for stage in stages:
        if stage not in STAGES:
            raise PolicyError(f"{where}: unsupported value {stage!r}: supported values: {', '.join(STAGES)}")
    return frozenset(stages)


def _bool(value: Any, where: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise PolicyError(f"{where}: must be true or false")
    return value


def _group_resources(value: Any, where: str) -> tuple[GroupResources, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"{where}: must be a list")
    out = []
    for i, entry in enumerate(value):
        here = f"{where}[{i}]"
        entry = _known(entry, _GROUP_RESOURCE_KEYS, here)
        group = entry.get("group", "") or ""
        if not isinstance(group, str):
            raise PolicyError(f"{here}.group: must be a string")
        if group and (len(group) > 253 or not _DNS_SUBDOMAIN.match(group)):
            raise PolicyError(
                f"{here}.group: {group!r} is not a lower-case DNS subdomain"
                " (give the group without its version: apps, not apps/v1)"
            )
        resources = _strings(entry.get("resources"), f"{here}.resources")
        names = _strings(entry.get("resourceNames"), f"{here}.resourceNames")
        if names and not resources:
            raise PolicyError(f"{here}.resourceNames: using resourceNames requires at least one resource")
        out.append(GroupResources(group, resources, names))
    return tuple(out)


def _rule(value: Any, where: str, omit: frozenset[str], omit_managed: bool) -> PolicyRule:
    value = _known(value, _RULE_KEYS, where)
    level = value.get("level")
    if level is None or level == "":
        raise PolicyError(f"{where}.level: required value")
    if level not in LEVELS:
        raise PolicyError(f"{where}.level: unsupported value {level!r}: supported values: {', '.join(LEVELS)}")
    urls = _strings(value.get("nonResourceURLs"), f"{where}.nonResourceURLs")
    for i, url in enumerate(urls):
        if url == "*":
            continue
        if not url.startswith("/"):
            raise PolicyError(
                f"{where}.nonResourceURLs[{i}]: {url!r}: non-resource URL rules must begin with a '/' character"
            )
        if "*" in url[:-1]:
            raise PolicyError(
                f"{where}.nonResourceURLs[{i}]: {url!r}: non-resource URL wildcards '*' must be the final"
                " character of the rule"
            )
    resources = _group_resources(value.get("resources"), f"{where}.resources")
    namespaces = _strings(value.get("namespaces"), f"{where}.namespaces")
    if urls and (resources or namespaces):
        raise PolicyError(
            f"{where}.nonResourceURLs: rules cannot apply to both regular resources and non-resource URLs"
        )
    rule_omit = _bool(value.get("omitManagedFields"), f"{where}.omitManagedFields")
    return PolicyRule(
        level=level,
        users=_strings(value.get("users"), f"{where}.users"),
        user_groups=_strings(value.get("userGroups"), f"{where}.userGroups"),
        verbs=_strings(value.get("verbs"), f"{where}.verbs"),
        resources=resources,
        namespaces=namespaces,
        non_resource_urls=urls,
        omit_stages=omit | _stages(value.get("omitStages"), f"{where}.omitStages"),
        omit_managed_fields=omit_managed if rule_omit is None else rule_omit,
    )


def parse_policy(text: str | bytes, source: str) -> Policy:
    """
    Parse and validate a policy document; ``source`` names it in errors.

    @raise PolicyError: naming ``source`` and the rule (``rules[3].level: ...``).
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    try:
        document = _known(document, _POLICY_KEYS, "policy")
        kind = document.get("kind")
        if kind != "Policy":
            raise PolicyError(f"kind: {kind!r}: expected Policy")
        api_version = document.get("apiVersion")
        if api_version not in _API_VERSIONS:
            raise PolicyError(f"apiVersion: {api_version!r}: expected audit.k8s.io/v1")
        omit = _stages(document.get("omitStages"), "omitStages")
        omit_managed = bool(_bool(document.get("omitManagedFields"), "omitManagedFields"))
        rules_value = document.get("rules")
        if rules_value is None or rules_value == []:
            raise PolicyError("rules: a policy needs at least one rule (no rule would audit nothing)")
        if not isinstance(rules_value, list):
            raise PolicyError("rules: must be a list")
        rules = tuple(
            _rule(rule, f"rules[{i}]", omit, omit_managed) for i, rule in enumerate(rules_value)
        )
    except PolicyError as e:
        raise PolicyError(f"{source}: {e}") from None
    return Policy(rules, source)


def load_policy(path: str | None) -> Policy:
    """
    The policy in the file at ``path``, or `DEFAULT_POLICY` when there is none.

    @raise PolicyError: naming the file and the rule.
    """
    if not path:
        return DEFAULT_POLICY
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise PolicyError(f"{path}: cannot be read: {e.strerror or e}") from None
    return parse_policy(text, path)


def describe(rules: Iterable[PolicyRule]) -> str:
    """
    A short summary of a policy for the start-up log line.
    """
    levels: dict[str, int] = {}
    for rule in rules:
        levels[rule.level] = levels.get(rule.level, 0) + 1
    return ", ".join(f"{n} {level}" for level, n in levels.items())
