"""
A Kubernetes API server stand-in for tests and the demo: the "upstream" behind the proxy.

`KubeAPIStandIn` enforces what the real kube-apiserver does for this project, in the
same order: authentication (configured bearer tokens, optionally TLS client
certificates, optionally anonymous), impersonation (``Impersonate-User``, one group per
``Impersonate-Group`` line, ``Impersonate-Extra-<percent-encoded key>``,
``Impersonate-Uid``, each authorized with the ``impersonate`` verb), then RBAC
authorization from real YAML (`banyan_kproxy.testing.rbac`), answering 401 and 403 with
the same ``Status`` bodies and messages.  Every request is recorded, as received, with
the identity it was served as, in `KubeAPIStandIn.requests`.

Behind that sits enough API for real ``kubectl``: discovery (``/version``, ``/api``,
``/api/v1``, ``/apis``, ...), pods, services and namespaces (get, list, create, delete,
watch with ``resourceVersion`` and ``timeoutSeconds``), server-side printing as
``meta.k8s.io/v1`` ``Table`` (also inside watch events), ``pods/log`` (with
``follow``), and the review APIs (SelfSubjectAccessReview, SelfSubjectRulesReview,
SelfSubjectReview, SubjectAccessReview, TokenReview).

``pods/exec``, ``pods/attach`` and ``pods/portforward`` are served for real kubectl,
over WebSocket (``v5.channel.k8s.io`` and the older channel protocols;
``SPDY/3.1+portforward.k8s.io``) and over SPDY/3.1 (`banyan_kproxy.testing.upgrades`).
Each pod is a fake container (`banyan_kproxy.testing.containers`): an in-memory
filesystem (`KubeAPIStandIn.pod_filesystem`; ``add_pod(files=...)``) and built-in
commands (``cat``, ``echo``, ``sh -c``, ``tar`` for ``kubectl cp``, ``ls``, ...), never
host processes.  ``add_pod(ports={80: 8080})`` makes a port-forward to the pod's port
80 reach 127.0.0.1:8080.  Every upgraded session is recorded in
`KubeAPIStandIn.sessions`.  A request without the upgrade headers gets the real
"Upgrade request required" answer.

Use it in memory (``StubTreq(standin.resource())``), on loopback (`listen`), or as a
process: ``python -m banyan_kproxy.testing.kubeapi --help``.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import collections
import copy
import itertools
import json
import secrets
import re
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attr import define, evolve, field, frozen
from twisted.internet.defer import Deferred, TimeoutError, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from banyan_kproxy.requestinfo import RequestInfo, request_info
from banyan_kproxy.status import status as _status
from banyan_kproxy.testing.containers import Container, PodFilesystem
from banyan_kproxy.testing.rbac import (
    ANONYMOUS,
    AUTHENTICATED,
    RBAC,
    UNAUTHENTICATED,
    Attributes,
    forbidden_status,
    go_quote,
    with_details,
)
from banyan_kproxy.testing.upgrades import (
    PORTFORWARD_PROTOCOL,
    SPDY_EXEC_PROTOCOLS,
    TUNNELED_PORTFORWARD_PROTOCOL,
    WEBSOCKET_EXEC_PROTOCOLS,
    ExecOptions,
    Flow,
    PortForward,
    SpdyRemoteCommand,
    StreamSession,
    WebSocketRemoteCommand,
    WebSocketSpdyTunnel,
    negotiate,
    response_head,
    spdy_protocol,
    take_over,
)
from banyan_kproxy.testing.websocket import (
    HandshakeError,
    WebSocketProtocol,
    handshake_response,
    split_header_list,
)
from banyan_kproxy.testing.loopback import Served, serve
from banyan_kproxy.tls import ServerTLS, TLSConfigError

#: The identity of the proxy's own service account in the demo and the tests.
PROXY_SERVICE_ACCOUNT = "system:serviceaccount:banyan-kproxy:banyan-kproxy"

#: The namespaces a fresh cluster has.
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

_WEBSOCKET_TOKEN_PREFIX = "base64url.bearer.authorization.k8s.io."

_log = Logger()


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@frozen
class UserInfo:
    """
    An authenticated Kubernetes identity: user name, groups, extra and uid.
    """

    name: str
    groups: tuple[str, ...] = field(converter=_strings, default=())
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    uid: str = ""

    @classmethod
    def service_account(cls, namespace: str, name: str) -> UserInfo:
        """
        A service account's identity with the groups its token authenticates with.
        """
        return cls(
            f"system:serviceaccount:{namespace}:{name}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
        )


@frozen
class RecordedRequest:
    """
    One request as it reached the stand-in, and who it was served as.

    ``path`` and ``query`` are as received (not percent-decoded); ``args`` is the
    decoded query; ``headers`` are the (name, value) lines as Twisted parsed them (one
    pair per line, names in Twisted's canonical case).  ``requester`` is the
    authenticated identity (``None`` when authentication failed); ``user``, ``groups``,
    ``extra`` and ``uid`` are the identity after impersonation, the one RBAC decided
    for.  ``code`` is the response status.
    """

    method: str
    path: str
    query: str
    args: Mapping[str, tuple[str, ...]]
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    requester: UserInfo | None
    user: str | None
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...]
    uid: str
    code: int

    def header_values(self, name: str | bytes) -> list[bytes]:
        """
        Every value of the named header, in the order received (name case-insensitive).
        """
        wanted = (name.encode("ascii") if isinstance(name, str) else name).lower()
        return [v for n, v in self.headers if n.lower() == wanted]


def _query_bool(values: Sequence[str]) -> bool:
    return bool(values) and values[0].lower() not in ("", "false", "0")


class _StatusError(Exception):
    """
    A failure answered with a ``Status`` body.
    """

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.body = _status(code, message, reason)
        if details is not None:
            self.body = with_details(self.body, details)
        self.code = code


def _not_found(resource: str, name: str, group: str = "") -> _StatusError:
    details = {"name": name, "kind": resource}
    if group:
        details = {"name": name, "group": group, "kind": resource}
    qualified = f"{resource}.{group}" if group else resource
    return _StatusError(404, f"{qualified} {go_quote(name)} not found", "NotFound", details)


def _no_such_resource() -> _StatusError:
    return _StatusError(404, "the server could not find the requested resource", "NotFound", {})


def _method_not_allowed() -> _StatusError:
    return _StatusError(
        405, "the server does not allow this method on the requested resource",
        "MethodNotAllowed", {},
    )


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _parse_rfc3339(value: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def human_duration(seconds: float) -> str:
    """
    A duration the way ``kubectl`` shows ages (``duration.HumanDuration``): ``45s``,
    ``3m20s``, ``25m``, ``5h10m``, ``3d4h``.
    """
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


# -- selectors -----------------------------------------------------------------------


def _split_terms(selector: str) -> list[str]:
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    terms.append("".join(current).strip())
    return [t for t in terms if t]


_SET_TERM = re.compile(r"^([^\s!=]+)\s+(in|notin)\s+\((.*)\)$")


def _parse_label_selector(selector: str) -> list[tuple[str, str, frozenset[str]]]:
    """
    A label selector as (key, operator, values) terms; operators are ``in``,
    ``notin``, ``exists`` and ``!exists`` (``=``/``==`` is ``in``, ``!=`` is ``notin``).
    """
    terms = []
    for term in _split_terms(selector):
        match = _SET_TERM.match(term)
        if match:
            values = frozenset(v.strip() for v in match.group(3).split(","))
            terms.append((match.group(1), match.group(2), values))
        elif "!=" in term:
            key, _, value = term.partition("!=")
            terms.append((key.strip(), "notin", frozenset([value.strip()])))
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            terms.append((key.strip(), "in", frozenset([value.strip()])))
        elif term.startswith("!"):
            terms.append((term[1:].strip(), "!exists", frozenset()))
        else:
            terms.append((term, "exists", frozenset()))
    return terms


def _labels_match(terms: Sequence[tuple[str, str, frozenset[str]]], labels: Mapping[str, str]) -> bool:
    for key, op, values in terms:
        if op == "in" and labels.get(key) not in values:
            return False
        if op == "notin" and labels.get(key) in values:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
    return True


def _parse_field_selector(
    selector: str, fields: Mapping[str, Callable[[dict[str, Any]], str]]
) -> list[tuple[Callable[[dict[str, Any]], str], str, bool]]:
    """
    A field selector as (getter, value, negated) terms, for the fields ``fields`` names.
    """
    terms = []
    for term in _split_terms(selector):
        negate = "!=" in term
        key, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
        key = key.strip()
        if key not in fields:
            raise _StatusError(400, f"field label not supported: {key}", "BadRequest")
        terms.append((fields[key], value.strip(), negate))
    return terms


def _fields_match(
    terms: Sequence[tuple[Callable[[dict[str, Any]], str], str, bool]], obj: dict[str, Any]
) -> bool:
    return all((getter(obj) == value) != negate for getter, value, negate in terms)


# -- the kinds served ----------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


_COMMON_FIELDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "metadata.name": lambda o: _meta(o).get("name", ""),
    "metadata.namespace": lambda o: _meta(o).get("namespace", ""),
}


def _column(name: str, description: str, priority: int = 0, fmt: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "format": fmt,
        "description": description,
        "priority": priority,
    }


_NAME_COLUMN = _column(
    "Name",
    "Name must be unique within a namespace. Is required when creating resources, although"
    " some resources may allow a client to request the generation of an appropriate name"
    " automatically. Name is primarily intended for creation idempotence and configuration"
    " definition. Cannot be updated.",
    fmt="name",
)
_AGE_COLUMN = _column(
    "Age",
    "CreationTimestamp is a timestamp representing the server time when this object was"
    " created.",
)


def _pod_cells(pod: dict[str, Any], age: str) -> list[Any]:
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    containers = spec.get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    restarts = sum(int(s.get("restartCount") or 0) for s in statuses)
    reason = status.get("reason") or status.get("phase") or "Unknown"
    for s in statuses:
        waiting = (s.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            reason = waiting["reason"]
    if _meta(pod).get("deletionTimestamp"):
        reason = "Terminating"
    return [
        _meta(pod).get("name", ""),
        f"{ready}/{len(containers)}",
        reason,
        str(restarts),
        age,
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        "<none>",
    ]


def _service_cells(service: dict[str, Any], age: str) -> list[Any]:
    spec = service.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    external = ",".join(spec.get("externalIPs") or ())
    if kind == "LoadBalancer" and not external:
        ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress")
        external = ",".join(i.get("ip") or i.get("hostname", "") for i in ingress or ())
        external = external or "<pending>"
    if kind == "ExternalName":
        external = spec.get("externalName") or ""
    ports = []
    for port in spec.get("ports") or ():
        text = str(port.get("port"))
        if port.get("nodePort"):
            text += f":{port['nodePort']}"
        ports.append(f"{text}/{port.get('protocol') or 'TCP'}")
    selector = spec.get("selector") or {}
    return [
        _meta(service).get("name", ""),
        kind,
        spec.get("clusterIP") or "<none>",
        external or "<none>",
        ",".join(ports) or "<none>",
        age,
        ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>",
    ]


def _namespace_cells(namespace: dict[str, Any], age: str) -> list[Any]:
    phase = (namespace.get("status") or {}).get("phase") or "Active"
    return [_meta(namespace).get("name", ""), phase, age]


@frozen
class _Kind:
    """
    A resource the stand-in stores and serves.
    """

    resource: str
    kind: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...]
    columns: tuple[dict[str, Any], ...]
    cells: Callable[[dict[str, Any], str], list[Any]]
    fields: Mapping[str, Callable[[dict[str, Any]], str]]


_KINDS = {
    "pods": _Kind(
        "pods",
        "Pod",
        "pod",
        True,
        ("po",),
        (
            _NAME_COLUMN,
            _column("Ready", "The aggregate readiness state of this pod for accepting traffic."),
            _column("Status", "The aggregate status of the containers in this pod."),
            _column(
                "Restarts",
                "The number of times the containers in this pod have been restarted and when"
                " the last container in this pod has restarted.",
            ),
            _AGE_COLUMN,
            _column("IP", "podIP address allocated to the pod.", 1),
            _column("Node", "NodeName indicates in which node this pod is scheduled.", 1),
            _column("Nominated Node", "nominatedNodeName is set when this pod preempts other"
                    " pods on the node.", 1),
            _column("Readiness Gates", "If specified, all readiness gates will be evaluated"
                    " for pod readiness.", 1),
        ),
        _pod_cells,
        {
            **_COMMON_FIELDS,
            "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
            "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
        },
    ),
    "services": _Kind(
        "services",
        "Service",
        "service",
        True,
        ("svc",),
        (
            _NAME_COLUMN,
            _column("Type", "type determines how the Service is exposed."),
            _column("Cluster-IP", "clusterIP is the IP address of the service."),
            _column("External-IP", "externalIPs is a list of IP addresses for which nodes in"
                    " the cluster will also accept traffic for this service."),
            _column("Port(s)", "The list of ports that are exposed by this service."),
            _AGE_COLUMN,
            _column("Selector", "Route service traffic to pods with label keys and values"
                    " matching this selector.", 1),
        ),
        _service_cells,
        dict(_COMMON_FIELDS),
    ),
    "namespaces": _Kind(
        "namespaces",
        "Namespace",
        "namespace",
        False,
        ("ns",),
        (
            _NAME_COLUMN,
            _column("Status", "The status of the namespace"),
            _AGE_COLUMN,
        ),
        _namespace_cells,
        {
            "metadata.name": lambda o: _meta(o).get("name", ""),
            "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
        },
    ),
}

_RW_VERBS = ["create", "delete", "get", "list", "watch"]

_CORE_RESOURCES: list[dict[str, Any]] = [
    {
        "name": "namespaces", "singularName": "namespace", "namespaced": False,
        "kind": "Namespace", "verbs": _RW_VERBS, "shortNames": ["ns"],
    },
    {
        "name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
        "verbs": _RW_VERBS, "shortNames": ["po"], "categories": ["all"],
    },
    {
        "name": "pods/attach", "singularName": "", "namespaced": True,
        "kind": "PodAttachOptions", "verbs": ["create", "get"],
    },
    {
        "name": "pods/exec", "singularName": "", "namespaced": True,
        "kind": "PodExecOptions", "verbs": ["create", "get"],
    },
    {
        "name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
        "verbs": ["get"],
    },
    {
        "name": "pods/portforward", "singularName": "", "namespaced": True,
        "kind": "PodPortForwardOptions", "verbs": ["create", "get"],
    },
    {
        "name": "services", "singularName": "service", "namespaced": True,
        "kind": "Service", "verbs": _RW_VERBS, "shortNames": ["svc"],
        "categories": ["all"],
    },
    {
        "name": "serviceaccounts/token", "singularName": "", "namespaced": True,
        "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest",
        "verbs": ["create"],
    },
]

_GROUP_RESOURCES: dict[str, list[dict[str, Any]]] = {
    "authentication.k8s.io": [
        {
            "name": "selfsubjectreviews", "singularName": "selfsubjectreview",
            "namespaced": False, "kind": "SelfSubjectReview", "verbs": ["create"],
        },
        {
            "name": "tokenreviews", "singularName": "tokenreview", "namespaced": False,
            "kind": "TokenReview", "verbs": ["create"],
        },
    ],
    "authorization.k8s.io": [
        {
            "name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
            "namespaced": False, "kind": "SelfSubjectAccessReview", "verbs": ["create"],
        },
        {
            "name": "selfsubjectrulesreviews", "singularName": "selfsubjectrulesreview",
            "namespaced": False, "kind": "SelfSubjectRulesReview", "verbs": ["create"],
        },
        {
            "name": "subjectaccessreviews", "singularName": "subjectaccessreview",
            "namespaced": False, "kind": "SubjectAccessReview", "verbs": ["create"],
        },
    ],
}


_OPENAPI_HASH = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def _openapi_documents() -> dict[str, dict[str, Any]]:
    """
    Just enough OpenAPI v3 for kubectl: each kind's PATCH operation declares the
    ``fieldValidation`` query parameter, so that kubectl (1.27+) validates on the
    server (``?fieldValidation=Strict``) instead of downloading schemas.
    """
    field_validation = {
        "name": "fieldValidation",
        "in": "query",
        "description": "fieldValidation instructs the server on how to handle objects in"
        " the request containing unknown or duplicate fields.",
        "schema": {"type": "string", "uniqueItems": True},
    }
    paths: dict[str, Any] = {}
    for kind in _KINDS.values():
        if kind.namespaced:
            item = f"/api/v1/namespaces/{{namespace}}/{kind.resource}/{{name}}"
        else:
            item = f"/api/v1/{kind.resource}/{{name}}"
        paths[item] = {
            "patch": {
                "operationId": f"patchCoreV1{'Namespaced' if kind.namespaced else ''}{kind.kind}",
                "parameters": [field_validation],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": kind.kind},
            }
        }
    return {
        "api/v1": {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "unversioned"},
            "paths": paths,
            "components": {"schemas": {}},
        }
    }


def _api_group(name: str) -> dict[str, Any]:
    version = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {"name": name, "versions": [version], "preferredVersion": version}


# -- per-request state ---------------------------------------------------------------


@define
class _Call:
    """
    One request being served: what arrived and who it is served as.
    """

    request: Request
    method: str
    raw_path: str
    path: str
    query: str
    args: dict[str, tuple[str, ...]]
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    requester: UserInfo | None = None
    user: UserInfo | None = None

    def header(self, name: str) -> list[str]:
        """
        Every value of a request header, decoded.
        """
        values = self.request.requestHeaders.getRawHeaders(name.encode("ascii")) or []
        return [v.decode("latin-1") for v in values]

    def arg(self, name: str, default: str = "") -> str:
        """
        The first value of a query parameter.
        """
        return self.args.get(name, (default,))[0]


@frozen
class _Format:
    """
    A ``meta.k8s.io`` transformation asked for with ``Accept: application/json;as=...``.
    """

    kind: str
    version: str

    @property
    def media_type(self) -> bytes:
        """
        The Content-Type of a response in this format.
        """
        return f"application/json;as={self.kind};v={self.version};g=meta.k8s.io".encode("ascii")


_AS_KINDS = {"Table", "PartialObjectMetadata", "PartialObjectMetadataList"}


def _negotiate(accept: str) -> _Format | None:
    """
    The first acceptable ``meta.k8s.io`` form an Accept header asks for (Table or
    PartialObjectMetadata), or ``None`` for the plain object.
    """
    for media in accept.split(","):
        pieces = [p.strip() for p in media.split(";")]
        params = dict(p.partition("=")[::2] for p in pieces[1:])
        if pieces[0] not in ("application/json", "*/*", "application/*", ""):
            continue
        if not params.get("as"):
            return None
        if (
            params["as"] in _AS_KINDS
            and params.get("g") == "meta.k8s.io"
            and params.get("v") in ("v1", "v1beta1")
        ):
            return _Format(params["as"].replace("List", ""), params["v"])
    return None


@define(eq=False)
class _Stream:
    """
    An open watch or ``logs -f`` response.
    """

    call: _Call
    kind: _Kind | None
    namespace: str
    matches: Callable[[dict[str, Any]], bool]
    form: _Format | None
    include_object: str
    timeout: Any = None
    pod: tuple[str, str] | None = None
    done: bool = False


@frozen
class _Event:
    rv: int
    type: str
    resource: str
    obj: dict[str, Any]


@define(eq=False)
class _PodRuntime:
    """
    What runs in a pod: its containers (sharing one filesystem) and where its ports
    forward to.
    """

    filesystem: PodFilesystem
    containers: dict[str, Container]
    ports: dict[int, tuple[str, int]] = field(factory=dict)


class KubeAPIStandIn:
    """
    An in-process kube-apiserver double: authentication, impersonation, RBAC, and the
    handful of APIs kubectl and banyan-kproxy use.

    ``tokens`` maps bearer tokens to the `UserInfo` they authenticate as;
    ``rbac_yaml`` holds Role / ClusterRole / RoleBinding / ClusterRoleBinding YAML
    texts loaded over the built-in roles.  ``client_certificates`` makes a TLS
    client certificate authenticate (CN = user, O = groups): set it only when the
    listener verifies client certificates against a CA (a `ServerTLS` with
    ``client_ca_file``; ``require_client_certificate=False`` keeps tokens usable).
    ``anonymous`` serves requests without credentials as ``system:anonymous``, as a
    default kube-apiserver does; without it they get 401.  ``reactor`` makes the
    loopback connections of port-forwards (default: ``clock`` when it can, else the
    global reactor).
    """

    def __init__(
        self,
        *,
        tokens: Mapping[str, UserInfo],
        rbac_yaml: Sequence[str | bytes] = (),
        clock: IReactorTime | None = None,
        client_certificates: bool = False,
        anonymous: bool = False,
        git_version: str = "v1.31.0",
        namespaces: Iterable[str] = DEFAULT_NAMESPACES,
        history: int = 10000,
        reactor: Any = None,
    ) -> None:
        """
        A stand-in with the given credentials and policy and no pods or services.
        """
        self.tokens = dict(tokens)
        self.service_accounts: set[tuple[str, str]] = set()
        self.rbac = RBAC.from_yaml(*rbac_yaml)
        self.requests: list[RecordedRequest] = []
        #: Requests to /healthz, /livez and /readyz (health probes, such as the
        #: proxy's), kept apart so that they do not count as API traffic.
        self.health_checks: list[RecordedRequest] = []
        self.client_certificates = client_certificates
        self.anonymous = anonymous
        self.git_version = git_version
        self._clock = clock
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            name: {} for name in _KINDS
        }
        self._rv = 0
        self._history: collections.deque[_Event] = collections.deque(maxlen=history)
        self._streams: list[_Stream] = []
        self._logs: dict[tuple[str, str], list[str]] = {}
        self._ips = itertools.count(10)
        self._reactor = reactor
        self._runtimes: dict[tuple[str, str], _PodRuntime] = {}
        self._forwards: list[PortForward] = []
        #: Every exec, attach and port-forward session served, in order.
        self.sessions: list[StreamSession] = []
        #: A slow apiserver: requests for a path (without the query) in here are
        #: answered that many seconds after they arrive (on ``clock``), or when
        #: `release_delayed` is called.
        self.response_delays: dict[str, float] = {}
        self._delayed_calls: list[Any] = []
        for namespace in namespaces:
            self.add_namespace(namespace)

    # -- public API --------------------------------------------------------------

    @property
    def clock(self) -> IReactorTime:
        """
        The clock timestamps, ages and watch timeouts use (the reactor by default).
        """
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock  # type: ignore[return-value]

    def resource(self) -> IResource:
        """
        A `twisted.web` resource serving the API at every path: ``Site(standin.resource())``.
        """
        return _KubeAPIResource(self)

    @property
    def delayed(self) -> int:
        """
        How many requests delayed by ``response_delays`` wait for their answer now.
        """
        self._delayed_calls = [call for call in self._delayed_calls if call.active()]
        return len(self._delayed_calls)

    def release_delayed(self) -> None:
        """
        Answer every delayed request now.
        """
        for call in self._delayed_calls:
            if call.active():
                call.reset(0)

    @property
    def resource_version(self) -> str:
        """
        The current (latest) resourceVersion.
        """
        return str(self._rv)

    def add_namespace(self, name: str, **fields: Any) -> dict[str, Any]:
        """
        Store a namespace (phase Active) and tell watchers; return a copy of it.

        Raises `ValueError` if it exists already.
        """
        obj = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        return self._add_local("namespaces", "", _merge(obj, fields))

    def _add_local(self, resource: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        """
        `_add` for the Python API: the namespace is made if missing, and a duplicate is
        a `ValueError` rather than a 409.
        """
        if namespace and ("", namespace) not in self._objects["namespaces"]:
            self.add_namespace(namespace)
        try:
            return self._add(resource, namespace, obj)
        except _StatusError as e:
            raise ValueError(e.body["message"]) from None

    def _delete_local(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self._delete(resource, namespace, name)
        except _StatusError as e:
            raise KeyError(e.body["message"]) from None

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        labels: Mapping[str, str] | None = None,
        phase: str = "Running",
        image: str = "nginx:1.27",
        containers: Sequence[str] | None = None,
        node: str = "node-1",
        logs: str = "",
        ports: Mapping[int, int | tuple[str, int]] | None = None,
        files: Mapping[str, bytes | str] | None = None,
        attach_banner: bytes | str = b"",
        **fields: Any,
    ) -> dict[str, Any]:
        """
        Store a pod and tell watchers (an ADDED event); return a copy of it.  The
        namespace is created if missing; an existing pod is a `ValueError`.

        The pod has one container per name in ``containers`` (default: one named like
        the pod), all ready when ``phase`` is Running; ``logs`` is its log text so far.
        ``files`` seeds its filesystem (``{"/srv/index.html": "..."}``), which its
        containers share; ``attach_banner`` is what ``kubectl attach`` shows first;
        ``ports`` maps pod ports to where a port-forward connects (``{80: 8080}`` is
        127.0.0.1:8080, or give ``(host, port)``).  Other keyword arguments are merged
        into the object (``spec={...}``).
        """
        names = list(containers) if containers else [name]
        running = phase == "Running"
        now = _rfc3339(self.clock.seconds())
        obj: dict[str, Any] = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "containers": [{"name": c, "image": image} for c in names],
                "nodeName": node,
            },
            "status": {
                "phase": phase,
                "podIP": f"10.244.0.{next(self._ips) % 250 + 2}",
                "containerStatuses": [
                    {
                        "name": c,
                        "image": image,
                        "ready": running,
                        "restartCount": 0,
                        "started": running,
                        "state": {"running": {"startedAt": now}} if running else {
                            "waiting": {"reason": "ContainerCreating"}
                        },
                    }
                    for c in names
                ],
            },
        }
        if labels:
            obj["metadata"]["labels"] = dict(labels)
        stored = self._add_local("pods", namespace, _merge(obj, fields))
        self._logs[(namespace, name)] = [logs] if logs else []
        runtime = self._runtime(namespace, name)
        for path, data in (files or {}).items():
            runtime.filesystem.write(path, data)
        banner = attach_banner.encode("utf-8") if isinstance(attach_banner, str) else attach_banner
        for container in runtime.containers.values():
            container.attach_banner = banner
        for port, target in (ports or {}).items():
            self.set_pod_port(name, port, target, namespace)
        return stored

    def pod_filesystem(self, name: str, namespace: str = "default") -> PodFilesystem:
        """
        The in-memory filesystem of a pod's containers (what ``kubectl cp`` reads and
        writes); `KeyError` if there is no such pod.
        """
        return self._pod_runtime(namespace, name).filesystem

    def container(self, pod: str, container: str | None = None,
                  namespace: str = "default") -> Container:
        """
        One of a pod's fake containers (the first without ``container``), to inspect
        or to add commands to (``.commands["date"] = ...``).
        """
        runtime = self._pod_runtime(namespace, pod)
        if container is None:
            return next(iter(runtime.containers.values()))
        return runtime.containers[container]

    def set_pod_port(self, name: str, port: int, target: int | tuple[str, int],
                     namespace: str = "default") -> None:
        """
        Make a port-forward to the pod's ``port`` connect to ``target`` (a loopback
        port number, or ``(host, port)``).
        """
        where = ("127.0.0.1", target) if isinstance(target, int) else tuple(target)
        self._pod_runtime(namespace, name).ports[int(port)] = (str(where[0]), int(where[1]))

    def close_streams(self) -> Deferred[None]:
        """
        Cut the loopback connections of every port-forward; fires once they closed.
        """
        waits = []
        for forward in self._forwards:
            forward.connection_lost()
            waits.append(forward.when_locals_closed())
        self._forwards = []
        return gatherResults(waits).addCallback(lambda _: None)

    def _runtime(self, namespace: str, name: str) -> _PodRuntime:
        runtime = self._runtimes.get((namespace, name))
        if runtime is None:
            pod = self._objects["pods"].get((namespace, name)) or {}
            names = [c.get("name", name) for c in (pod.get("spec") or {}).get("containers") or []]
            filesystem = PodFilesystem(hostname=name, clock=self.clock.seconds)
            runtime = _PodRuntime(filesystem, {
                c: Container(c, filesystem, hostname=name) for c in names or [name]
            })
            self._runtimes[(namespace, name)] = runtime
        return runtime

    def _pod_runtime(self, namespace: str, name: str) -> _PodRuntime:
        if (namespace, name) not in self._objects["pods"]:
            raise KeyError(f"no pod {namespace}/{name}")
        return self._runtime(namespace, name)

    @property
    def _tcp(self) -> Any:
        if self._reactor is not None:
            return self._reactor
        if IReactorTCP.providedBy(self.clock):
            return self.clock
        from twisted.internet import reactor

        return reactor

    def add_service(
        self,
        name: str,
        namespace: str = "default",
        *,
        type: str = "ClusterIP",
        ports: Sequence[int | tuple[int, str]] = (80,),
        selector: Mapping[str, str] | None = None,
        cluster_ip: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """
        Store a service and tell watchers; return a copy of it.  The namespace is
        created if missing; an existing service is a `ValueError`.

        ``ports`` holds port numbers or (port, protocol) pairs.
        """
        spec_ports = []
        for port in ports:
            number, protocol = port if isinstance(port, tuple) else (port, "TCP")
            spec_ports.append(
                {"name": f"port-{number}", "port": number, "protocol": protocol,
                 "targetPort": number}
            )
        obj: dict[str, Any] = {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "type": type,
                "clusterIP": cluster_ip or f"10.96.{next(self._ips) % 250}.{len(name) % 250 + 1}",
                "ports": spec_ports,
            },
            "status": {"loadBalancer": {}},
        }
        if selector:
            obj["spec"]["selector"] = dict(selector)
        return self._add_local("services", namespace, _merge(obj, fields))

    def delete_pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        """
        Remove a pod, tell watchers (a DELETED event) and end its ``logs -f`` streams.

        Raises `KeyError` if there is no such pod.
        """
        return self._delete_local("pods", namespace, name)

    def delete_service(self, name: str, namespace: str = "default") -> dict[str, Any]:
        """
        Remove a service and tell watchers; `KeyError` if there is no such service.
        """
        return self._delete_local("services", namespace, name)

    def get_object(self, resource: str, name: str, namespace: str = "") -> dict | None:
        """
        A copy of a stored object (``resource`` is the plural: pods, services,
        namespaces), or ``None``.
        """
        obj = self._objects[resource].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def append_pod_log(self, name: str, text: str, namespace: str = "default") -> None:
        """
        Add text to a pod's log and send it to every ``logs -f`` stream of that pod.
        """
        self._logs.setdefault((namespace, name), []).append(text)
        for stream in list(self._streams):
            if stream.pod == (namespace, name):
                stream.call.request.write(text.encode("utf-8"))

    def close_watches(self) -> None:
        """
        End every open watch and ``logs -f`` stream, as an apiserver restart would.
        """
        for stream in list(self._streams):
            self._end_stream(stream)

    # -- storage ---------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _add(self, resource: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        metadata = obj.setdefault("metadata", {})
        key = (namespace, metadata["name"])
        if key in self._objects[resource]:
            raise _StatusError(
                409,
                f"{resource} {go_quote(metadata['name'])} already exists",
                "AlreadyExists",
                {"name": metadata["name"], "kind": resource},
            )
        if namespace:
            metadata["namespace"] = namespace
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", _rfc3339(self.clock.seconds()))
        rv = self._next_rv()
        metadata["resourceVersion"] = str(rv)
        self._objects[resource][key] = obj
        self._notify(_Event(rv, "ADDED", resource, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def _delete(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self._objects[resource].pop((namespace, name), None)
        if obj is None:
            raise _not_found(resource, name)
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        self._notify(_Event(rv, "DELETED", resource, copy.deepcopy(obj)))
        if resource == "pods":
            self._logs.pop((namespace, name), None)
            self._runtimes.pop((namespace, name), None)
            for stream in list(self._streams):
                if stream.pod == (namespace, name):
                    self._end_stream(stream)
        return copy.deepcopy(obj)

    def _notify(self, event: _Event) -> None:
        self._history.append(event)
        for stream in list(self._streams):
            if stream.kind is not None and stream.kind.resource == event.resource:
                self._send_event(stream, event.type, event.obj)

    # -- the HTTP side -----------------------------------------------------------------

    def _render(self, request: Request) -> bytes | int:
        raw_path = request.path.decode("latin-1")
        uri = request.uri.decode("latin-1")
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read()
        raw_args: dict[bytes, list[bytes]] = request.args or {}
        args = {
            k.decode("utf-8", "replace"): tuple(v.decode("utf-8", "replace") for v in vs)
            for k, vs in raw_args.items()
        }
        headers = tuple(
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        )
        call = _Call(
            request=request,
            method=request.method.decode("ascii"),
            raw_path=raw_path,
            path=urllib.parse.unquote(raw_path),
            query=uri.partition("?")[2],
            args=args,
            headers=headers,
            body=body,
        )
        audit_id = (call.header("Audit-Id") or [str(uuid.uuid4())])[0]
        request.setHeader(b"Audit-Id", audit_id.encode("latin-1"))
        request.setHeader(b"Cache-Control", b"no-cache, private")
        try:
            return self._serve(call)
        except _StatusError as e:
            return self._respond(call, e.code, e.body)

    def _respond(
        self,
        call: _Call,
        code: int,
        body: bytes | Mapping[str, Any] | list[Any],
        content_type: bytes = b"application/json",
    ) -> bytes:
        self._record(call, code)
        call.request.setResponseCode(code)
        call.request.setHeader(b"Content-Type", content_type)
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        call.request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return body

    def _record(self, call: _Call, code: int) -> None:
        user = call.user
        recorded = RecordedRequest(
            method=call.method,
            path=call.raw_path,
            query=call.query,
            args=call.args,
            headers=call.headers,
            body=call.body,
            requester=call.requester,
            user=user.name if user else None,
            groups=user.groups if user else (),
            extra=user.extra if user else (),
            uid=user.uid if user else "",
            code=code,
        )
        if call.path.rstrip("/") in ("/healthz", "/livez", "/readyz"):
            self.health_checks.append(recorded)
            return
        self.requests.append(recorded)
        _log.info(
            "{method} {uri} as {user!r} -> {code}",
            method=call.method,
            uri=call.request.uri.decode("latin-1"),
            user=user.name if user else None,
            code=code,
        )

    def _serve(self, call: _Call) -> bytes | int:
        call.requester = self._authenticate(call)
        if call.requester is None:
            raise _StatusError(401, "Unauthorized", "Unauthorized")
        impersonated = self._impersonate(call)
        if isinstance(impersonated, bytes):
            return impersonated
        call.user = impersonated
        info = request_info(call.method, call.path, call.args)
        attributes = Attributes(
            user=call.user.name,
            groups=call.user.groups,
            verb=info.verb,
            resource_request=info.resource_request,
            namespace=info.namespace,
            api_group=info.api_group,
            api_version=info.api_version,
            resource=info.resource,
            subresource=info.subresource,
            name=info.name,
            path=info.path,
        )
        self._authorize(attributes)
        if info.resource_request and info.resource == "pods" and info.subresource in (
            "exec", "attach", "portforward"
        ) and info.verb == "get":
            # AuthorizePodWebsocketUpgradeCreatePermission (on since 1.31): a GET
            # upgrade to these subresources also needs "create".
            self._authorize(evolve(attributes, verb="create"))
        if not info.resource_request:
            return self._non_resource(call)
        return self._resource(call, info)

    def _authorize(self, attributes: Attributes) -> None:
        decision = self.rbac.authorize(attributes)
        if not decision.allowed:
            raise _Forbidden(forbidden_status(attributes, decision.reason))

    # -- authentication and impersonation ------------------------------------------------

    def _authenticate(self, call: _Call) -> UserInfo | None:
        user = self._certificate_user(call)
        if user is not None:
            return user
        authorization = (call.header("Authorization") or [""])[0].strip()
        failed = False
        if authorization:
            scheme, _, rest = authorization.partition(" ")
            token = rest.split(" ")[0] if rest else ""
            if scheme.lower() == "bearer" and token:
                user = self.tokens.get(token)
                failed = user is None
        if user is None:
            websocket_token = self._websocket_token(call)
            if websocket_token is not None:
                user = self.tokens.get(websocket_token)
                failed = failed or user is None
        if user is not None:
            if AUTHENTICATED not in user.groups:
                user = UserInfo(user.name, user.groups + (AUTHENTICATED,), user.extra, user.uid)
            return user
        if self.anonymous and not failed:
            return UserInfo(ANONYMOUS, (UNAUTHENTICATED,))
        return None

    def _certificate_user(self, call: _Call) -> UserInfo | None:
        if not self.client_certificates:
            return None
        transport = call.request.transport
        get_peer = getattr(transport, "getPeerCertificate", None)
        certificate = get_peer() if get_peer is not None else None
        if certificate is None:
            return None
        name = ""
        groups: list[str] = []
        for key, value in certificate.get_subject().get_components():
            if key == b"CN":
                name = value.decode("utf-8")
            elif key == b"O":
                groups.append(value.decode("utf-8"))
        if not name:
            return None
        return UserInfo(name, tuple(groups) + (AUTHENTICATED,))

    def _websocket_token(self, call: _Call) -> str | None:
        connection = ",".join(call.header("Connection")).lower()
        upgrade = ",".join(call.header("Upgrade")).lower()
        if "upgrade" not in connection or upgrade.strip() != "websocket":
            return None
        for value in call.header("Sec-WebSocket-Protocol"):
            for entry in value.split(","):
                entry = entry.strip()
                if entry.startswith(_WEBSOCKET_TOKEN_PREFIX):
                    encoded = entry[len(_WEBSOCKET_TOKEN_PREFIX):]
                    try:
                        padded = encoded + "=" * (-len(encoded) % 4)
                        return base64.urlsafe_b64decode(padded).decode("utf-8")
                    except (ValueError, UnicodeDecodeError):
                        return ""
        return None

    def _impersonate(self, call: _Call) -> UserInfo | bytes:
        requester = call.requester
        assert requester is not None
        user = (call.header("Impersonate-User") or [""])[0]
        groups = call.header("Impersonate-Group")
        uid = (call.header("Impersonate-Uid") or [""])[0]
        extras: list[tuple[str, str]] = []
        for header_name, header_value in call.headers:
            lowered = header_name.decode("latin-1").lower()
            if lowered.startswith("impersonate-extra-"):
                key = urllib.parse.unquote(lowered[len("impersonate-extra-"):])
                extras.append((key, header_value.decode("latin-1")))
        if not (user or groups or extras or uid):
            return requester
        refs: list[str] = []
        checks: list[Attributes] = []
        new_groups: list[str] = []
        base: dict[str, Any] = {
            "user": requester.name, "groups": requester.groups, "verb": "impersonate"
        }
        if user:
            sa = user.split(":")
            if len(sa) == 4 and user.startswith("system:serviceaccount:") and all(sa[2:]):
                refs.append(f"{{ServiceAccount {sa[2]} {sa[3]}    }}")
                checks.append(Attributes(
                    **base, resource="serviceaccounts", namespace=sa[2], name=sa[3]
                ))
                if not groups:
                    new_groups = ["system:serviceaccounts", f"system:serviceaccounts:{sa[2]}"]
            else:
                refs.append(f"{{User  {user}    }}")
                checks.append(Attributes(**base, resource="users", name=user))
        for group in groups:
            refs.append(f"{{Group  {group}    }}")
            checks.append(Attributes(**base, resource="groups", name=group))
            new_groups.append(group)
        extra: dict[str, list[str]] = {}
        for key, value in extras:
            refs.append(f"{{UserExtra  {value}  authentication.k8s.io/v1  {key}}}")
            checks.append(Attributes(
                **base, api_group="authentication.k8s.io", resource="userextras",
                subresource=key, name=value,
            ))
            extra.setdefault(key, []).append(value)
        if uid:
            refs.append(f"{{UID  {uid}  authentication.k8s.io/v1  }}")
            checks.append(Attributes(
                **base, api_group="authentication.k8s.io", resource="uids", name=uid
            ))
        if not user:
            # kube-apiserver (through 1.31 at least) answers this with InternalError:
            # a 500 with a text/plain body, not a Status.
            message = (
                f"Internal Server Error: {go_quote(call.request.uri.decode('latin-1'))}:"
                f" requested [{' '.join(refs)}] without impersonating a user\n"
            )
            call.request.setHeader(b"X-Content-Type-Options", b"nosniff")
            return self._respond(
                call, 500, message.encode("utf-8"), b"text/plain; charset=utf-8"
            )
        for attributes in checks:
            self._authorize(attributes)
        if user != ANONYMOUS:
            if not any(g in (AUTHENTICATED, UNAUTHENTICATED) for g in new_groups):
                new_groups.append(AUTHENTICATED)
        elif UNAUTHENTICATED not in new_groups:
            new_groups.append(UNAUTHENTICATED)
        return UserInfo(
            user,
            tuple(new_groups),
            tuple((k, tuple(v)) for k, v in extra.items()),
            uid,
        )

    # -- non-resource paths --------------------------------------------------------------

    def _non_resource(self, call: _Call) -> bytes:
        path = call.path.rstrip("/") or "/"
        if call.method not in ("GET", "HEAD"):
            if path in ("/api", "/apis", "/version") or path.startswith(("/api/", "/apis/")):
                raise _method_not_allowed()
            return self._respond(call, 404, b"404 page not found\n", b"text/plain; charset=utf-8")
        if path == "/version":
            minor = self.git_version.lstrip("v").split(".")[1]
            return self._respond(call, 200, {
                "major": "1",
                "minor": minor,
                "gitVersion": self.git_version,
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2024-08-13T07:28:49Z",
                "goVersion": "go1.22.5",
                "compiler": "gc",
                "platform": "linux/amd64",
            })
        if path == "/openapi/v3":
            return self._respond(call, 200, {
                "paths": {
                    gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={_OPENAPI_HASH}"}
                    for gv in _openapi_documents()
                }
            })
        if path.startswith("/openapi/v3/") and path[len("/openapi/v3/"):] in _openapi_documents():
            return self._respond(call, 200, _openapi_documents()[path[len("/openapi/v3/"):]])
        if path in ("/healthz", "/livez", "/readyz"):
            return self._respond(call, 200, b"ok", b"text/plain; charset=utf-8")
        if path == "/api":
            host = call.request.getRequestHostname().decode("latin-1")
            return self._respond(call, 200, {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": host}
                ],
            })
        if path == "/api/v1":
            return self._respond(call, 200, {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": _CORE_RESOURCES,
            })
        if path == "/apis":
            return self._respond(call, 200, {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_api_group(g) for g in _GROUP_RESOURCES],
            })
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in _GROUP_RESOURCES:
            return self._respond(
                call, 200, {"kind": "APIGroup", "apiVersion": "v1", **_api_group(parts[1])}
            )
        if (
            parts[0] == "apis"
            and len(parts) == 3
            and parts[1] in _GROUP_RESOURCES
            and parts[2] == "v1"
        ):
            return self._respond(call, 200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{parts[1]}/v1",
                "resources": _GROUP_RESOURCES[parts[1]],
            })
        return self._respond(call, 404, b"404 page not found\n", b"text/plain; charset=utf-8")

    # -- resources -----------------------------------------------------------------------

    def _resource(self, call: _Call, info: RequestInfo) -> bytes | int:
        if info.api_group in _GROUP_RESOURCES and info.api_version == "v1":
            if info.resource not in {r["name"] for r in _GROUP_RESOURCES[info.api_group]}:
                raise _no_such_resource()
            if info.verb != "create" or info.name:
                raise _method_not_allowed()
            return self._review(call, info)
        if (not info.api_group and info.resource == "serviceaccounts"
                and info.subresource == "token" and info.verb == "create"):
            return self._token_request(call, info.namespace, info.name)
        if info.api_group or info.api_version != "v1" or info.resource not in _KINDS:
            raise _no_such_resource()
        kind = _KINDS[info.resource]
        namespace = info.namespace if kind.namespaced else ""
        if not kind.namespaced and info.parts[:1] == ("namespaces",):
            # /api/v1/namespaces/NAME names the namespace itself.
            namespace = ""
        if info.subresource:
            if kind.resource == "pods" and info.subresource == "log" and info.verb == "get":
                return self._pod_log(call, namespace, info.name)
            if kind.resource == "pods" and info.subresource in ("exec", "attach", "portforward"):
                pod = self._get(kind, namespace, info.name)
                return self._upgrade(call, info, namespace, pod)
            raise _no_such_resource()
        if kind.namespaced and len(info.parts) >= 2 and not info.namespace:
            # /api/v1/pods/NAME: named objects live under their namespace.
            raise _no_such_resource()
        if info.verb == "list":
            return self._list(call, kind, namespace)
        if info.verb == "watch":
            return self._watch(call, kind, namespace, info)
        if info.verb == "get":
            obj = self._get(kind, namespace, info.name)
            return self._respond_object(call, 200, kind, obj)
        if info.verb == "create":
            return self._create(call, kind, namespace)
        if info.verb == "delete":
            obj = self._delete(kind.resource, namespace, info.name)
            return self._respond_object(call, 200, kind, obj)
        raise _method_not_allowed()

    def add_service_account(self, name: str, namespace: str = "default") -> None:
        """
        Register a service account, so ``kubectl create token NAME`` can mint tokens
        for it (TokenRequest); those tokens then authenticate as the account.
        """
        self.service_accounts.add((namespace, name))

    def _token_request(self, call: _Call, namespace: str, name: str) -> bytes:
        """
        ``POST .../serviceaccounts/NAME/token``: a new bearer token for the account.
        """
        if (namespace, name) not in self.service_accounts:
            raise _not_found("serviceaccounts", name)
        try:
            request = json.loads(call.body or b"{}")
        except ValueError as e:
            raise _StatusError(400, f"the body of the request was in an unknown format: {e}",
                               "BadRequest")
        spec = dict(request.get("spec") or {})
        seconds = int(spec.get("expirationSeconds") or 3600)
        spec["expirationSeconds"] = seconds
        spec.setdefault("audiences", ["https://kubernetes.default.svc.cluster.local"])
        token = "sa." + secrets.token_urlsafe(32)
        self.tokens[token] = UserInfo.service_account(namespace, name)
        call.request.setResponseCode(201)
        call.request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
            "spec": spec,
            "status": {"token": token,
                       "expirationTimestamp": _rfc3339(self.clock.seconds() + seconds)},
        }).encode()

    def _get(self, kind: _Kind, namespace: str, name: str) -> dict[str, Any]:
        obj = self._objects[kind.resource].get((namespace, name))
        if obj is None:
            raise _not_found(kind.resource, name)
        return copy.deepcopy(obj)

    def _selected(self, call: _Call, kind: _Kind) -> Callable[[dict[str, Any]], bool]:
        labels = _parse_label_selector(call.arg("labelSelector"))
        fields = _parse_field_selector(call.arg("fieldSelector"), kind.fields)
        return lambda obj: _labels_match(labels, _meta(obj).get("labels") or {}) and _fields_match(
            fields, obj
        )

    def _table(
        self, kind: _Kind, objs: Sequence[dict[str, Any]], version: str, include: str,
        rv: str,
    ) -> dict[str, Any]:
        now = self.clock.seconds()
        rows = []
        for obj in objs:
            created = _parse_rfc3339(_meta(obj).get("creationTimestamp", ""))
            age = "<unknown>" if created is None else human_duration(now - created)
            row: dict[str, Any] = {"cells": kind.cells(obj, age)}
            if include == "Object":
                row["object"] = obj
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": _meta(obj),
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": f"meta.k8s.io/{version}",
            "metadata": {"resourceVersion": rv},
            "columnDefinitions": list(kind.columns),
            "rows": rows,
        }

    def _transform(
        self, kind: _Kind, form: _Format | None, obj: dict[str, Any], include: str
    ) -> dict[str, Any]:
        """
        One object as a plain object, a one-row Table or PartialObjectMetadata.
        """
        if form is None:
            return obj
        if form.kind == "Table":
            return self._table(
                kind, [obj], form.version, include, _meta(obj).get("resourceVersion", "")
            )
        return {
            "kind": "PartialObjectMetadata",
            "apiVersion": f"meta.k8s.io/{form.version}",
            "metadata": _meta(obj),
        }

    def _respond_object(
        self, call: _Call, code: int, kind: _Kind, obj: dict[str, Any]
    ) -> bytes:
        form = _negotiate(",".join(call.header("Accept")))
        body = self._transform(kind, form, obj, call.arg("includeObject", "Metadata"))
        return self._respond(call, code, body, form.media_type if form else b"application/json")

    def _list(self, call: _Call, kind: _Kind, namespace: str) -> bytes:
        selected = self._selected(call, kind)
        objs = [
            copy.deepcopy(obj)
            for (ns, _), obj in sorted(self._objects[kind.resource].items())
            if (not namespace or ns == namespace) and selected(obj)
        ]
        rv = str(self._rv)
        form = _negotiate(",".join(call.header("Accept")))
        if form is not None and form.kind == "Table":
            body = self._table(kind, objs, form.version, call.arg("includeObject", "Metadata"), rv)
            return self._respond(call, 200, body, form.media_type)
        if form is not None:
            return self._respond(call, 200, {
                "kind": "PartialObjectMetadataList",
                "apiVersion": f"meta.k8s.io/{form.version}",
                "metadata": {"resourceVersion": rv},
                "items": [self._transform(kind, form, obj, "") for obj in objs],
            }, f"application/json;as=PartialObjectMetadataList;v={form.version};g=meta.k8s.io"
                .encode("ascii"))
        for obj in objs:
            obj.pop("kind", None)
            obj.pop("apiVersion", None)
        return self._respond(call, 200, {
            "kind": kind.kind + "List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": rv},
            "items": objs,
        })

    def _create(self, call: _Call, kind: _Kind, namespace: str) -> bytes:
        try:
            obj = json.loads(call.body or b"null")
        except ValueError as e:
            raise _StatusError(400, f"the body of the request was in an unknown format: {e}",
                               "BadRequest")
        if not isinstance(obj, dict):
            raise _StatusError(400, "the body of the request was in an unknown format",
                               "BadRequest")
        if obj.get("kind", kind.kind) != kind.kind or obj.get("apiVersion", "v1") != "v1":
            raise _StatusError(
                400,
                f"the API version in the data ({obj.get('apiVersion')}) does not match the"
                f" expected API version (v1)",
                "BadRequest",
            )
        obj["kind"], obj["apiVersion"] = kind.kind, "v1"
        metadata = obj.setdefault("metadata", {})
        body_namespace = metadata.get("namespace")
        if kind.namespaced and body_namespace and body_namespace != namespace:
            raise _StatusError(
                400,
                "the namespace of the provided object does not match the namespace sent on"
                " the request",
                "BadRequest",
            )
        if not metadata.get("name"):
            if metadata.get("generateName"):
                metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise _StatusError(
                    422,
                    f'{kind.kind} "" is invalid: metadata.name: Required value: name or'
                    f" generateName is required",
                    "Invalid",
                    {"kind": kind.kind, "causes": [{
                        "reason": "FieldValueRequired",
                        "message": "Required value: name or generateName is required",
                        "field": "metadata.name",
                    }]},
                )
        if kind.namespaced and ("", namespace) not in self._objects["namespaces"]:
            raise _not_found("namespaces", namespace)
        for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"):
            metadata.pop(key, None)
        if kind.resource == "pods":
            containers = (obj.get("spec") or {}).get("containers") or []
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
            if not containers:
                raise _StatusError(
                    422,
                    f"Pod {go_quote(metadata['name'])} is invalid: spec.containers: Required"
                    f" value",
                    "Invalid",
                    {"name": metadata["name"], "kind": "Pod"},
                )
        elif kind.resource == "services":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("clusterIP", f"10.96.{next(self._ips) % 250}.1")
            obj["status"] = {"loadBalancer": {}}
        elif kind.resource == "namespaces":
            obj.setdefault("status", {"phase": "Active"})
        if call.arg("dryRun"):
            if (namespace, metadata["name"]) in self._objects[kind.resource]:
                raise _StatusError(
                    409, f"{kind.resource} {go_quote(metadata['name'])} already exists",
                    "AlreadyExists", {"name": metadata["name"], "kind": kind.resource},
                )
            return self._respond_object(call, 201, kind, obj)
        stored = self._add(kind.resource, namespace, obj)
        if kind.resource == "pods":
            self._logs.setdefault((namespace, metadata["name"]), [])
        return self._respond_object(call, 201, kind, stored)

    # -- streams ---------------------------------------------------------------------------

    def _start_stream(self, call: _Call, stream: _Stream, content_type: bytes) -> None:
        self._record(call, 200)
        request = call.request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", content_type)
        request.write(b"")
        self._streams.append(stream)
        timeout = call.arg("timeoutSeconds")
        if timeout:
            try:
                seconds = int(timeout)
            except ValueError:
                seconds = 0
            if seconds > 0:
                stream.timeout = self.clock.callLater(seconds, self._end_stream, stream)

        def gone(_: object) -> None:
            stream.done = True
            self._forget(stream)

        request.notifyFinish().addBoth(gone)

    def _forget(self, stream: _Stream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
        if stream.timeout is not None and stream.timeout.active():
            stream.timeout.cancel()
        stream.timeout = None

    def _end_stream(self, stream: _Stream) -> None:
        self._forget(stream)
        if not stream.done:
            stream.done = True
            stream.call.request.finish()

    def _watch(self, call: _Call, kind: _Kind, namespace: str, info: RequestInfo) -> int:
        selected = self._selected(call, kind)
        form = _negotiate(",".join(call.header("Accept")))
        # /api/v1/watch/namespaces/NS/pods/NAME watches one object.
        named = info.name if len(info.parts) >= 2 else ""
        stream = _Stream(
            call=call,
            kind=kind,
            namespace=namespace,
            matches=lambda obj: (
                (not namespace or _meta(obj).get("namespace", "") == namespace)
                and (not named or _meta(obj).get("name") == named)
                and selected(obj)
            ),
            form=form,
            include_object=call.arg("includeObject", "Metadata"),
        )
        rv_arg = call.arg("resourceVersion")
        try:
            since = int(rv_arg) if rv_arg not in ("", "0") else None
        except ValueError:
            raise _StatusError(
                400, f"resourceVersion: Invalid value: {go_quote(rv_arg)}: must be a number",
                "BadRequest",
            )
        self._start_stream(call, stream, form.media_type if form else b"application/json")
        if since is None:
            for _key, obj in sorted(self._objects[kind.resource].items()):
                self._send_event(stream, "ADDED", copy.deepcopy(obj))
        else:
            oldest = self._history[0].rv if self._history else self._rv + 1
            if since < oldest - 1 and len(self._history) == self._history.maxlen:
                self._send_raw(stream, {
                    "type": "ERROR",
                    "object": _status(
                        410, f"too old resource version: {since} ({oldest - 1})", "Expired"
                    ),
                })
                self._end_stream(stream)
                return NOT_DONE_YET
            for event in list(self._history):
                if event.rv > since and event.resource == kind.resource:
                    self._send_event(stream, event.type, copy.deepcopy(event.obj))
        return NOT_DONE_YET

    def _send_event(self, stream: _Stream, event_type: str, obj: dict[str, Any]) -> None:
        if stream.done or stream.kind is None or not stream.matches(obj):
            return
        obj = self._transform(stream.kind, stream.form, obj, stream.include_object)
        self._send_raw(stream, {"type": event_type, "object": obj})

    def _send_raw(self, stream: _Stream, event: Mapping[str, Any]) -> None:
        if not stream.done:
            stream.call.request.write(json.dumps(event).encode("utf-8") + b"\n")

    def _pod_log(self, call: _Call, namespace: str, name: str) -> bytes | int:
        pod = self._get(_KINDS["pods"], namespace, name)
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = call.arg("container")
        if container and container not in containers:
            raise _StatusError(
                400, f"container {container} is not valid for pod {name}", "BadRequest"
            )
        if not container and len(containers) > 1:
            raise _StatusError(
                400,
                f"a container name must be specified for pod {name}, choose one of:"
                f" [{' '.join(containers)}]",
                "BadRequest",
            )
        text = "".join(self._logs.get((namespace, name), []))
        tail = call.arg("tailLines")
        if tail.isdigit():
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail):]) if int(tail) else ""
        if not _query_bool(call.args.get("follow", ())):
            return self._respond(call, 200, text.encode("utf-8"), b"text/plain")
        stream = _Stream(
            call=call,
            kind=None,
            namespace=namespace,
            matches=lambda obj: False,
            form=None,
            include_object="None",
            pod=(namespace, name),
        )
        self._start_stream(call, stream, b"text/plain")
        if text:
            call.request.write(text.encode("utf-8"))
        return NOT_DONE_YET

    # -- exec, attach and port-forward ---------------------------------------------------

    def _exec_options(self, call: _Call, subresource: str, pod: dict[str, Any]) -> ExecOptions:
        """
        The ``PodExecOptions`` / ``PodAttachOptions`` of a request, validated.
        """
        name = _meta(pod).get("name", "")
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = call.arg("container")
        if not container:
            if len(containers) != 1:
                raise _StatusError(
                    400,
                    f"a container name must be specified for pod {name}, choose one of:"
                    f" [{' '.join(containers)}]",
                    "BadRequest",
                )
            container = containers[0]
        elif container not in containers:
            raise _StatusError(400, f"container {container} is not valid for pod {name}",
                               "BadRequest")
        if (pod.get("status") or {}).get("phase") != "Running":
            raise _StatusError(400, f'container not found ("{container}")', "BadRequest")
        flags = {key: _query_bool(call.args.get(key, ())) for key in
                 ("stdin", "stdout", "stderr", "tty")}
        argv = tuple(call.args.get("command", ()))
        if subresource == "exec" and not argv:
            raise _StatusError(400, "you must specify at least 1 command", "BadRequest")
        if not (flags["stdin"] or flags["stdout"] or flags["stderr"]):
            raise _StatusError(
                400, "you must specify at least one of stdin, stdout, stderr", "BadRequest"
            )
        return ExecOptions(subresource, container, argv, **flags)

    def _upgrade(self, call: _Call, info: RequestInfo, namespace: str,
                 pod: dict[str, Any]) -> bytes | int:
        """
        Serve exec, attach or port-forward: negotiate WebSocket or SPDY/3.1, answer 101
        and hand the connection to the session.
        """
        connection = [v.lower() for v in split_header_list(call.header("Connection"))]
        upgrade = [v.lower() for v in split_header_list(call.header("Upgrade"))]
        if "upgrade" not in connection or not upgrade or upgrade[0] not in ("websocket", "spdy/3.1"):
            raise _StatusError(400, "Upgrade request required", "BadRequest")
        name = info.name
        options = None if info.subresource == "portforward" else self._exec_options(
            call, info.subresource, pod
        )
        runtime = self._runtime(namespace, name)
        user = call.user.name if call.user is not None else None

        def target(port: int) -> tuple[str, int] | None:
            return runtime.ports.get(port)

        protocol: Any
        flow = Flow()
        if upgrade[0] == "websocket":
            offered = [
                p for p in split_header_list(call.header("Sec-WebSocket-Protocol"))
                if not p.startswith(_WEBSOCKET_TOKEN_PREFIX)
            ]
            supported: Sequence[str] = (
                (TUNNELED_PORTFORWARD_PROTOCOL,) if options is None
                else tuple(WEBSOCKET_EXEC_PROTOCOLS)
            )
            chosen = negotiate(offered, supported)
            if chosen is None and (offered or options is None):
                raise _StatusError(
                    400,
                    f"unable to upgrade: unable to negotiate protocol: client supports"
                    f" [{' '.join(offered)}], server supports [{' '.join(supported)}]",
                    "BadRequest",
                )
            try:
                headers = handshake_response(call.method, call.header, lambda _offered: chosen)
            except HandshakeError as e:
                raise _StatusError(400, f"unable to upgrade: {e}", "BadRequest")
            if options is None:
                record = StreamSession(namespace, name, "portforward", "websocket+spdy",
                                       TUNNELED_PORTFORWARD_PROTOCOL, user)
                forward = PortForward(record, target, self._tcp, flow)
                self._forwards.append(forward)
                handler: Any = WebSocketSpdyTunnel(forward)
            else:
                record = StreamSession(namespace, name, options.subresource, "websocket",
                                       chosen or "channel.k8s.io", user, options.container,
                                       options.argv, options.tty)
                handler = WebSocketRemoteCommand(
                    chosen or "channel.k8s.io", options, runtime.containers[options.container],
                    record,
                )
            protocol = WebSocketProtocol(handler, self.clock)
        else:
            offered = split_header_list(call.header("X-Stream-Protocol-Version"))
            supported = (PORTFORWARD_PROTOCOL,) if options is None else SPDY_EXEC_PROTOCOLS
            if not offered:
                return self._respond(
                    call, 400, b"unable to upgrade: X-Stream-Protocol-Version is required\n",
                    b"text/plain; charset=utf-8",
                )
            chosen = negotiate(offered, supported)
            if chosen is None:
                for accepted in supported:
                    call.request.responseHeaders.addRawHeader(
                        b"X-Accepted-Stream-Protocol-Versions", accepted.encode("ascii")
                    )
                return self._respond(
                    call, 403,
                    (f"unable to upgrade: unable to negotiate protocol: client supports"
                     f" [{' '.join(offered)}], server accepts [{' '.join(supported)}]\n"
                     ).encode(),
                    b"text/plain; charset=utf-8",
                )
            headers = [
                ("Connection", "Upgrade"),
                ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", chosen),
            ]
            if options is None:
                record = StreamSession(namespace, name, "portforward", "spdy", chosen, user)
                forward = PortForward(record, target, self._tcp, flow)
                self._forwards.append(forward)
                protocol = spdy_protocol(forward)
            else:
                record = StreamSession(namespace, name, options.subresource, "spdy", chosen,
                                       user, options.container, options.argv, options.tty)
                protocol = spdy_protocol(SpdyRemoteCommand(
                    chosen, options, runtime.containers[options.container], record, self.clock
                ))
        audit_id = (call.request.responseHeaders.getRawHeaders(b"Audit-Id") or [b""])[0]
        headers.append(("Audit-Id", audit_id.decode("latin-1")))
        self._record(call, 101)
        self.sessions.append(record)
        take_over(call.request, protocol, response_head(headers), self.clock, flow)
        return NOT_DONE_YET

    # -- review APIs -------------------------------------------------------------------

    def _review(self, call: _Call, info: RequestInfo) -> bytes:
        try:
            review = json.loads(call.body or b"{}")
        except ValueError as e:
            raise _StatusError(400, f"the body of the request was in an unknown format: {e}",
                               "BadRequest")
        spec = review.get("spec") or {}
        user = call.user
        assert user is not None
        kind = next(r["kind"] for r in _GROUP_RESOURCES[info.api_group]
                    if r["name"] == info.resource)
        out: dict[str, Any] = {
            "kind": kind,
            "apiVersion": f"{info.api_group}/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        if info.resource == "selfsubjectreviews":
            user_info: dict[str, Any] = {"username": user.name, "groups": list(user.groups)}
            if user.uid:
                user_info["uid"] = user.uid
            if user.extra:
                user_info["extra"] = {k: list(v) for k, v in user.extra}
            out["status"] = {"userInfo": user_info}
        elif info.resource == "tokenreviews":
            token_user = self.tokens.get(spec.get("token") or "")
            audiences = spec.get("audiences") or ["https://kubernetes.default.svc.cluster.local"]
            if token_user is None:
                out["status"] = {"user": {}, "error": "invalid bearer token"}
            else:
                token_groups = list(token_user.groups)
                if AUTHENTICATED not in token_groups:
                    token_groups.append(AUTHENTICATED)
                reviewed: dict[str, Any] = {"username": token_user.name, "groups": token_groups}
                if token_user.uid:
                    reviewed["uid"] = token_user.uid
                out["status"] = {
                    "authenticated": True, "user": reviewed, "audiences": audiences
                }
        elif info.resource == "selfsubjectrulesreviews":
            out["status"] = self.rbac.rules_review(
                user.name, user.groups, spec.get("namespace") or ""
            )
        else:
            name: str
            groups: tuple[str, ...]
            if info.resource == "subjectaccessreviews":
                name, groups = spec.get("user") or "", tuple(spec.get("groups") or ())
            else:
                name, groups = user.name, user.groups
            resource_attributes = spec.get("resourceAttributes")
            non_resource = spec.get("nonResourceAttributes")
            if resource_attributes is not None:
                attributes = Attributes(
                    user=name,
                    groups=groups,
                    verb=resource_attributes.get("verb") or "",
                    namespace=resource_attributes.get("namespace") or "",
                    api_group=resource_attributes.get("group") or "",
                    resource=resource_attributes.get("resource") or "",
                    subresource=resource_attributes.get("subresource") or "",
                    name=resource_attributes.get("name") or "",
                )
            elif non_resource is not None:
                attributes = Attributes(
                    user=name,
                    groups=groups,
                    verb=non_resource.get("verb") or "",
                    resource_request=False,
                    path=non_resource.get("path") or "",
                )
            else:
                raise _StatusError(
                    422,
                    f"{kind}.authorization.k8s.io \"\" is invalid: spec.resourceAttributes:"
                    f" Invalid value: \"null\": exactly one of nonResourceAttributes or"
                    f" resourceAttributes must be specified",
                    "Invalid",
                )
            decision = self.rbac.authorize(attributes)
            result: dict[str, Any] = {"allowed": decision.allowed}
            if decision.reason:
                result["reason"] = decision.reason
            out["status"] = result
        return self._respond(call, 201, out)


class _Forbidden(_StatusError):
    """
    A denied request, answered with the RBAC Forbidden ``Status``.
    """

    def __init__(self, body: dict[str, Any]) -> None:
        Exception.__init__(self, body["message"])
        self.body = body
        self.code = 403


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """
    ``base`` with ``extra`` merged in, recursively for nested mappings.
    """
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


class _KubeAPIResource(Resource):
    """
    The leaf `twisted.web` resource that hands every request to a `KubeAPIStandIn`.
    """

    isLeaf = True

    def __init__(self, standin: KubeAPIStandIn) -> None:
        super().__init__()
        self._standin = standin

    def render(self, request: Request) -> bytes | int:
        """
        Serve one request (any method, any path), later for a path in
        ``response_delays``.
        """
        standin = self._standin
        delay = standin.response_delays.get(request.path.decode("latin-1"))
        if not delay:
            return standin._render(request)

        def answer() -> None:
            if request._disconnected:
                return
            body = standin._render(request)
            if body is not NOT_DONE_YET:
                request.write(body)  # type: ignore[arg-type]
                request.finish()

        standin._delayed_calls.append(standin.clock.callLater(delay, answer))
        return NOT_DONE_YET


# -- listening on loopback -------------------------------------------------------------


@define
class Listening:
    """
    A `KubeAPIStandIn` served on a port; `stop` closes it and every connection.
    """

    served: Served
    standin: KubeAPIStandIn

    @property
    def port(self) -> IListeningPort:
        """
        The listening port.
        """
        return self.served.port

    @property
    def port_number(self) -> int:
        """
        The TCP port bound (useful after asking for port 0).
        """
        return self.served.port_number

    @property
    def url(self) -> str:
        """
        ``https://127.0.0.1:PORT`` (or ``http://``), brackets around IPv6 hosts.
        """
        return self.served.url

    def stop(self, graceful: bool = False, grace: float = 5.0) -> Deferred[None]:
        """
        End the watches, stop listening, abort open connections (and the loopback
        connections of port-forwards) and wait for them: a crash, as clients see it.

        ``graceful`` stops as a kube-apiserver shutting down does instead: every watch
        and ``logs -f`` stream ends with its final chunk, and each connection closes
        once what it was sent has gone out (aborted after ``grace`` seconds).
        """
        if not graceful:
            self.standin.close_watches()
            return self.served.stop().addCallback(lambda _: self.standin.close_streams())
        return Deferred.fromCoroutine(self._stop_gracefully(grace))

    async def _stop_gracefully(self, grace: float) -> None:
        stopped = maybeDeferred(self.served.port.stopListening)
        self.standin.close_watches()
        factory = self.served.factory
        for protocol in list(factory.protocols):
            protocol.transport.loseConnection()
        idle = factory.when_idle()
        idle.addTimeout(grace, self.standin.clock)
        try:
            await idle
        except TimeoutError:
            for protocol in list(factory.protocols):
                protocol.transport.abortConnection()
            await factory.when_idle()
        await stopped
        self.standin.close_streams()


def listen(
    reactor: Any,
    standin: KubeAPIStandIn,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTLS | None = None,
) -> Listening:
    """
    Serve ``standin`` on ``host:port``: HTTPS from ``tls`` when given (with
    ``client_ca_file`` and ``require_client_certificate=False`` for optional client
    certificates, as kube-apiserver has), plain HTTP otherwise.  A failed bind raises
    ``CannotListenError`` naming the address.
    """
    return Listening(serve(reactor, Site(standin.resource()), host=host, port=port, tls=tls), standin)


# -- the command ---------------------------------------------------------------------


def parse_token_spec(spec: str) -> tuple[str, UserInfo]:
    """
    Parse ``TOKEN_FILE=USER[:GROUP,GROUP]`` into the file name and the identity.

    A service account user name (``system:serviceaccount:NS:NAME``) is taken whole
    and gets the groups a service account token carries; any other user name ends at
    its first ``:`` not escaped as ``\\:`` (``banyan\\:me@example.com:admins``).
    """
    path, sep, rest = spec.partition("=")
    if not sep or not path or not rest:
        raise ValueError(f"--token wants TOKEN_FILE=USER[:GROUP,GROUP], got {spec!r}")
    groups: list[str] = []
    if rest.startswith("system:serviceaccount:"):
        pieces = rest.split(":", 4)
        if len(pieces) < 4 or not pieces[2] or not pieces[3]:
            raise ValueError(f"bad service account user name in {spec!r}")
        base = UserInfo.service_account(pieces[2], pieces[3])
        name, groups = base.name, list(base.groups)
        if len(pieces) == 5:
            groups[-1:-1] = [g for g in pieces[4].split(",") if g]
    else:
        match = re.match(r"((?:[^:\\]|\\.)*)(?::(.*))?$", rest)
        assert match is not None
        name = re.sub(r"\\(.)", r"\1", match.group(1))
        groups = [g for g in (match.group(2) or "").split(",") if g]
    return path, UserInfo(name, tuple(groups))


def _split_object(spec: str) -> tuple[str, str]:
    namespace, sep, name = spec.rpartition("/")
    return (namespace if sep else "default"), name


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m banyan_kproxy.testing.kubeapi",
        description="Serve the Kubernetes API stand-in (authentication, impersonation,"
        " RBAC, pods/services/namespaces) until SIGTERM or SIGINT.",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT ([::1]:0 for IPv6)")
    parser.add_argument("--tls-cert", help="server certificate (PEM, leaf first)")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--client-ca", help="CA (PEM) whose client certificates authenticate")
    parser.add_argument(
        "--token", action="append", default=[], metavar="TOKEN_FILE=USER[:GROUP,GROUP]",
        help="a bearer token read from TOKEN_FILE and the identity it authenticates as",
    )
    parser.add_argument("--rbac", action="append", default=[], metavar="FILE",
                        help="RBAC YAML to load (repeatable)")
    parser.add_argument("--pod", action="append", default=[], metavar="[NS/]NAME",
                        help="a running pod to start with (repeatable)")
    parser.add_argument(
        "--pod-port", action="append", default=[], metavar="[NS/]POD:PORT=LOCAL_PORT",
        help="make a port-forward to the pod's PORT reach 127.0.0.1:LOCAL_PORT (repeatable)",
    )
    parser.add_argument("--service", action="append", default=[], metavar="[NS/]NAME",
                        help="a ClusterIP service to start with (repeatable)")
    parser.add_argument("--anonymous", action="store_true",
                        help="serve requests without credentials as system:anonymous")
    parser.add_argument("--git-version", default="v1.31.0", help="the /version gitVersion")
    parser.add_argument("--port-file", help="write the bound port number here")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        parser.error("--client-ca needs --tls-cert and --tls-key")
    return args


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"kubeapi: cannot read {path}: {e.strerror}")


def _build(args: argparse.Namespace, reactor: Any) -> tuple[KubeAPIStandIn, ServerTLS | None]:
    tokens: dict[str, UserInfo] = {}
    for spec in args.token:
        try:
            path, user = parse_token_spec(spec)
        except ValueError as e:
            raise SystemExit(f"kubeapi: {e}")
        token = _read(path).decode("utf-8").strip()
        if not token:
            raise SystemExit(f"kubeapi: {path} holds no token")
        tokens[token] = user
    try:
        standin = KubeAPIStandIn(
            tokens=tokens,
            rbac_yaml=[_read(p) for p in args.rbac],
            clock=reactor,
            client_certificates=bool(args.client_ca),
            anonymous=args.anonymous,
            git_version=args.git_version,
        )
    except ValueError as e:
        raise SystemExit(f"kubeapi: bad RBAC: {e}")
    try:
        for spec in args.pod:
            namespace, name = _split_object(spec)
            standin.add_pod(name, namespace, logs=f"{name} started\n")
        for spec in args.pod_port:
            pod_spec, _, mapping = spec.rpartition(":")
            port, sep, local_port = mapping.partition("=")
            if not pod_spec or not sep or not port.isdigit() or not local_port.isdigit():
                raise ValueError(f"--pod-port wants [NS/]POD:PORT=LOCAL_PORT, got {spec!r}")
            namespace, name = _split_object(pod_spec)
            try:
                standin.set_pod_port(name, int(port), int(local_port), namespace)
            except KeyError:
                raise ValueError(f"--pod-port names {namespace}/{name}, which no --pod made")
        for spec in args.service:
            namespace, name = _split_object(spec)
            standin.add_service(name, namespace)
    except ValueError as e:
        raise SystemExit(f"kubeapi: {e}")
    tls = None
    if args.tls_cert:
        try:
            tls = ServerTLS.from_files(
                args.tls_cert, args.tls_key, args.client_ca, require_client_certificate=False
            )
        except TLSConfigError as e:
            raise SystemExit(f"kubeapi: {e}")
    return standin, tls


def _run(reactor: Any, args: argparse.Namespace) -> Deferred[None]:
    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogBeginner, textFileLogObserver

    if args.verbose:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    standin, tls = _build(args, reactor)
    host, _, port_text = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        listening = listen(reactor, standin, host=host, port=int(port_text), tls=tls)
    except (CannotListenError, ValueError) as e:
        raise SystemExit(f"kubeapi: cannot listen on {args.listen}: {e}")


    def announce() -> None:
        # Only once the reactor runs (and so handles SIGTERM / SIGINT): whoever waits
        # for this line may signal the process straight after it.
        if args.port_file:
            with open(args.port_file, "w") as f:
                f.write(f"{listening.port_number}\n")
        print(f"listening on {listening.url}", flush=True)

    reactor.callWhenRunning(announce)
    return Deferred()


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the stand-in as a process until SIGTERM or SIGINT (see ``--help``).
    """
    from twisted.internet.task import react

    args = _parse_args(argv)
    react(_run, (args,))


if __name__ == "__main__":
    main()
