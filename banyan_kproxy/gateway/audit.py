"""
Tunnels as Kubernetes audit events, through the daemon's audit pipeline.

A ``CONNECT`` is recorded the way kube-apiserver records a non-resource,
long-running request (an ``exec`` is the closest kin): ``requestURI`` is the
request target (``mykube.corp.example.com:8443``, what Go's ``http.Request``
carries for a CONNECT), ``verb`` is ``connect``, ``user`` is the client
certificate's identity (its name, and its SHA-256 as the
``authentication.kubernetes.io/credential-id`` extra, as kube-apiserver gives x509
users), ``sourceIPs`` the device's address.  ``ResponseStarted`` (code 200) is
emitted when the tunnel opens, ``ResponseComplete`` when it ends, annotated with
the bytes each way, the duration and the outcome; a refused CONNECT gives one
``ResponseComplete`` with its status and reason.  The audit policy chooses as for
any request: ``verbs: [connect]``, ``users`` (the certificate name) and
``nonResourceURLs: ["*"]`` match (kube-apiserver's policy validation keeps other
``nonResourceURLs`` to paths beginning with ``/``, which a CONNECT target never is);
a ``RequestReceived`` stage is emitted unless omitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attr import define, field

from banyan_kproxy.audit.event import API_VERSION, micro_time, response_status
from banyan_kproxy.audit.policy import Policy
from banyan_kproxy.connectserver import TunnelRecord
from banyan_kproxy.requestinfo import parse_request

__all__ = ["TunnelAuditor", "ANNOTATION_PREFIX", "CREDENTIAL_ID"]

#: Prefix of the annotations on tunnel events.
ANNOTATION_PREFIX = "gateway.banyan-kproxy"
#: The ``user.extra`` key kube-apiserver uses for a credential's fingerprint.
CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"
#: ``responseStatus.code`` of a CONNECT whose client left before it was answered
#: (nginx's "client closed request"; no response was sent).
CLIENT_CLOSED = 499

_ANONYMOUS = {"username": "system:anonymous", "groups": ["system:unauthenticated"]}


@define
class TunnelAuditor:
    """
    Turns `TunnelRecord`s into ``audit.k8s.io/v1`` events for ``accept`` (the spool).

    ``policy`` is the daemon's audit policy; ``generated`` (optional) counts the
    events built.  Give `opened` and `closed` as the CONNECT factory's
    ``on_tunnel_opened`` / ``on_tunnel_closed``.
    """

    policy: Policy
    accept: Callable[[dict[str, Any]], None]
    generated: Any = None
    annotation_prefix: str = ANNOTATION_PREFIX
    _open: dict[str, Any] = field(init=False, factory=dict)

    @classmethod
    def from_auditor(cls, auditor: Any) -> TunnelAuditor | None:
        """
        The tunnel auditor feeding the same pipeline as an `Auditor`; None for the
        `NullAuditor` (no ``[audit]`` section).
        """
        if not getattr(auditor, "enabled", False):
            return None
        return cls(auditor.policy, auditor.accept, auditor.metrics.generated)

    def _decide(self, record: TunnelRecord) -> Any:
        user = record.client.name if record.client is not None else None
        info = parse_request("CONNECT", record.target or "")
        return self.policy.evaluate(user, (), info)

    def opened(self, record: TunnelRecord) -> None:
        """
        A tunnel opened: ``RequestReceived`` (unless omitted) and ``ResponseStarted``.
        """
        decision = self._decide(record)
        self._open[record.tunnel_id] = decision
        if decision.level == "None":
            return
        if "RequestReceived" not in decision.omit_stages:
            self._emit(decision.level, "RequestReceived", record, record.started)
        if "ResponseStarted" not in decision.omit_stages:
            at = record.established if record.established is not None else record.started
            self._emit(decision.level, "ResponseStarted", record, at, response_status(200))

    def closed(self, record: TunnelRecord) -> None:
        """
        A CONNECT is over: ``ResponseComplete`` with the code, the bytes and the
        duration (and first ``RequestReceived`` for a refusal, unless omitted).
        """
        decision = self._open.pop(record.tunnel_id, None)
        was_open = decision is not None
        if decision is None:
            decision = self._decide(record)
        if decision.level == "None":
            return
        if not was_open and "RequestReceived" not in decision.omit_stages:
            self._emit(decision.level, "RequestReceived", record, record.started)
        if "ResponseComplete" in decision.omit_stages:
            return
        if record.code == 200:
            status = response_status(200)
        else:
            status = response_status(record.code or CLIENT_CLOSED, record.reason or record.outcome)
        prefix = self.annotation_prefix
        annotations = {
            f"{prefix}/outcome": record.outcome,
            f"{prefix}/bytes-up": str(record.bytes_up),
            f"{prefix}/bytes-down": str(record.bytes_down),
            f"{prefix}/duration": f"{record.duration:.3f}s",
        }
        at = record.ended if record.ended is not None else record.started
        self._emit(decision.level, "ResponseComplete", record, at, status, annotations)

    def _emit(
        self,
        level: str,
        stage: str,
        record: TunnelRecord,
        at: float,
        status: dict[str, Any] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "kind": "Event",
            "apiVersion": API_VERSION,
            "level": level,
            "auditID": _audit_id(record.tunnel_id),
            "stage": stage,
            "requestURI": record.target or "",
            "verb": "connect",
            "user": _user(record),
        }
        host = getattr(record.peer, "host", None)
        if host:
            event["sourceIPs"] = [host]
        if record.user_agent:
            event["userAgent"] = record.user_agent
        if status is not None:
            event["responseStatus"] = status
        event["requestReceivedTimestamp"] = micro_time(record.started)
        event["stageTimestamp"] = micro_time(at)
        if annotations:
            event["annotations"] = annotations
        if self.generated is not None:
            self.generated.inc()
        self.accept(event)


def _audit_id(tunnel_id: str) -> str:
    """
    A 32-hex-digit id as a UUID (what kube-apiserver's audit IDs look like).
    """
    if len(tunnel_id) == 32:
        t = tunnel_id
        return f"{t[:8]}-{t[8:12]}-{t[12:16]}-{t[16:20]}-{t[20:]}"
    return tunnel_id


def _user(record: TunnelRecord) -> dict[str, Any]:
    client = record.client
    if client is None or not client.name:
        return dict(_ANONYMOUS)
    user: dict[str, Any] = {"username": client.name}
    extra: dict[str, list[str]] = {}
    if client.fingerprint:
        extra[CREDENTIAL_ID] = [f"X509SHA256={client.fingerprint}"]
    if client.sans:
        extra[f"{ANNOTATION_PREFIX}/subject-alt-names"] = list(client.sans)
    if extra:
        user["extra"] = extra
    return user
