"""
The proxy-facing side of auditing: `Auditor.begin` per request, then the returned
`AuditRecord`'s ``response_started`` / ``response_complete``.

All of it is in-memory work on the reactor thread: classify the request
(`banyan_kproxy.requestinfo`), evaluate the policy, build small dicts, append them to
the spool's commit list.  Encoding, truncation and disk writes happen later, in a
thread.  Nothing here blocks or raises into the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attr
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from banyan_kproxy.audit.event import (
    API_VERSION,
    TRUNCATED_ANNOTATION,
    micro_time,
    object_ref,
    response_status,
    user_agent as clip_user_agent,
    user_info,
)
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.policy import Policy
from banyan_kproxy.requestinfo import is_long_running, parse_request

__all__ = ["IAuditor", "Auditor", "NullAuditor", "AuditRecord", "NULL_RECORD"]

_log = Logger()

#: A Status answer this small is read for ``responseStatus`` even at ``Metadata``.
_STATUS_SNIFF_LIMIT = 16 * 1024


class IAuditor(Interface):
    """
    Makes the audit record of each request.
    """

    enabled = Attribute("False for the auditor used when there is no [audit] section.")

    def begin(
        *, audit_id, method, uri, source_ips, user_agent, received_at, user, impersonated_user=None
    ):
        """
        Classify the request, evaluate the policy and return its `AuditRecord`.
        Never blocks, never raises.
        """


class _NullRecord:
    """
    The record of a request that is not audited: every method does nothing.
    """

    level = "None"
    wants_request_body = False
    wants_response_body = False
    long_running = False
    audit_id = ""
    body_limit = 0

    def request_body(self, body: bytes) -> None:
        """
        Ignored.
        """

    def response_started(self, code: int, at: float) -> None:
        """
        Ignored.
        """

    def response_complete(
        self, code: int, at: float, response_body: bytes | None = None, message: str | None = None
    ) -> None:
        """
        Ignored.
        """


NULL_RECORD = _NullRecord()


@implementer(IAuditor)
class NullAuditor:
    """
    The auditor without an ``[audit]`` section: nothing is recorded.
    """

    enabled = False

    def begin(self, **_: Any) -> _NullRecord:
        """
        The record that records nothing.
        """
        return NULL_RECORD

    def reopen(self) -> None:
        """
        Nothing to reopen.
        """


@attr.s(auto_attribs=True, eq=False, slots=True)
class AuditRecord:
    """
    One request's audit trail; emits an ``Event`` per stage the policy keeps.

    ``wants_request_body`` / ``wants_response_body`` tell the proxy whether to pass
    bodies at all; bodies over ``body_limit`` bytes are left out (and the event
    annotated ``audit.k8s.io/truncated``).  ``long_running`` requests (watch,
    exec/attach/port-forward, logs, proxy) get a ``ResponseStarted`` event when
    their response headers go out.
    """

    level: str
    audit_id: str
    long_running: bool
    body_limit: int
    _accept: Callable[[dict[str, Any]], None]
    _metrics: AuditMetrics
    _omit: frozenset[str]
    _omit_managed_fields: bool
    _uri: str
    _verb: str
    _user: dict[str, Any]
    _impersonated: dict[str, Any] | None
    _source_ips: list[str]
    _user_agent: str | None
    _object_ref: dict[str, str] | None
    _received: str
    _request_body: bytes | None = None
    _annotations: dict[str, str] | None = None
    _started: bool = False
    _completed: bool = False

    @property
    def wants_request_body(self) -> bool:
        """
        True at ``Request`` and ``RequestResponse``.
        """
        return self.level in ("Request", "RequestResponse")

    @property
    def wants_response_body(self) -> bool:
        """
        True at ``RequestResponse``, except for long-running requests (their
        responses are streams, which kube-apiserver does not record either).
        """
        return self.level == "RequestResponse" and not self.long_running

    def request_body(self, body: bytes) -> None:
        """
        Keep the request body for ``requestObject`` (when the level asks for it).
        """
        try:
            if not self.wants_request_body or body is None:
                return
            if len(body) > self.body_limit:
                self._annotate(TRUNCATED_ANNOTATION, "true")
                return
            self._request_body = bytes(body)
        except Exception:  # noqa: BLE001 - auditing never breaks a request
            _log.failure("Keeping the request body of audit event {id} failed", id=self.audit_id)

    def response_started(self, code: int, at: float) -> None:
        """
        Response headers went out: emit ``ResponseStarted`` for a long-running request.
        """
        try:
            if not self.long_running or self._started or self._completed:
                return
            self._started = True
            if "ResponseStarted" not in self._omit:
                self._emit("ResponseStarted", at, response_status(code))
        except Exception:  # noqa: BLE001 - auditing never breaks a request
            self._metrics.drop("internal_error")
            _log.failure("Emitting audit event {id} ResponseStarted failed", id=self.audit_id)

    def response_complete(
        self, code: int, at: float, response_body: bytes | None = None, message: str | None = None
    ) -> None:
        """
        The response ended: emit ``ResponseComplete`` (once).

        ``response_body``: the body, when the level wants it, or (at any level) a
        small ``Status`` answer, whose status, message, reason and details go into
        ``responseStatus`` as kube-apiserver records them.  ``message``: the reason
        for an answer the proxy gave itself (401, 403, 502, ...).
        """
        try:
            if self._completed:
                return
            self._completed = True
            if "ResponseComplete" in self._omit:
                return
            status_body = None
            kept = None
            if response_body is not None:
                if self.wants_response_body:
                    if len(response_body) > self.body_limit:
                        self._annotate(TRUNCATED_ANNOTATION, "true")
                    else:
                        kept = bytes(response_body)
                if len(response_body) <= _STATUS_SNIFF_LIMIT and b'"Status"' in response_body:
                    status_body = _status_object(response_body)
            self._emit("ResponseComplete", at, response_status(code, message, status_body), kept)
        except Exception:  # noqa: BLE001 - auditing never breaks a request
            self._metrics.drop("internal_error")
            _log.failure("Emitting audit event {id} ResponseComplete failed", id=self.audit_id)

    def _annotate(self, key: str, value: str) -> None:
        if self._annotations is None:
            self._annotations = {}
        self._annotations[key] = value

    def _emit(
        self,
        stage: str,
        at: float,
        status: dict[str, Any] | None = None,
        response_body: bytes | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "kind": "Event",
            "apiVersion": API_VERSION,
            "level": self.level,
            "auditID": self.audit_id,
            "stage": stage,
            "requestURI": self._uri,
            "verb": self._verb,
            "user": self._user,
        }
        if self._impersonated is not None:
            event["impersonatedUser"] = self._impersonated
        if self._source_ips:
            event["sourceIPs"] = self._source_ips
        if self._user_agent:
            event["userAgent"] = self._user_agent
        if self._object_ref is not None:
            event["objectRef"] = self._object_ref
        if status is not None:
            event["responseStatus"] = status
        if self._request_body is not None and stage != "RequestReceived":
            event["requestObject"] = self._request_body
        if response_body is not None:
            event["responseObject"] = response_body
        event["requestReceivedTimestamp"] = self._received
        event["stageTimestamp"] = micro_time(at)
        if self._annotations:
            event["annotations"] = dict(self._annotations)
        if self._omit_managed_fields:
            event["_omitManagedFields"] = True
        self._metrics.generated.inc()
        self._accept(event)


def _status_object(body: bytes) -> dict[str, Any] | None:
    import json

    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("kind") == "Status" else None


@implementer(IAuditor)
@attr.s(auto_attribs=True, eq=False)
class Auditor:
    """
    Builds each request's `AuditRecord` from the policy and hands its events to
    ``accept`` (the spool).
    """

    policy: Policy
    accept: Callable[[dict[str, Any]], None]
    metrics: AuditMetrics
    body_limit: int = 100 * 1024
    reopen_sinks: Callable[[], Any] = lambda: None
    enabled = True

    def begin(
        self,
        *,
        audit_id: str,
        method: str,
        uri: str,
        source_ips: Sequence[str],
        user_agent: str | None,
        received_at: float,
        user: Any,
        impersonated_user: Any = None,
    ) -> AuditRecord | _NullRecord:
        """
        Classify the request, evaluate the policy, emit ``RequestReceived`` unless
        the policy omits it, and return the record for the rest.

        ``user`` is the verified identity (None when authentication failed);
        ``impersonated_user`` the identity a client asked to act as, if allowed.
        """
        try:
            info = parse_request(method, uri)
            decision = self.policy.evaluate(
                user.user if user is not None else None,
                user.groups if user is not None else (),
                info,
            )
            if decision.level == "None":
                return NULL_RECORD
            record = AuditRecord(
                level=decision.level,
                audit_id=audit_id,
                long_running=is_long_running(info),
                body_limit=self.body_limit,
                accept=self.accept,
                metrics=self.metrics,
                omit=decision.omit_stages,
                omit_managed_fields=decision.omit_managed_fields,
                uri=uri,
                verb=info.verb,
                user=user_info(user),
                impersonated=user_info(impersonated_user) if impersonated_user is not None else None,
                source_ips=list(source_ips),
                user_agent=clip_user_agent(user_agent),
                object_ref=object_ref(info),
                received=micro_time(received_at),
            )
            if "RequestReceived" not in decision.omit_stages:
                record._emit("RequestReceived", received_at)
            return record
        except Exception:  # noqa: BLE001 - auditing never breaks a request
            self.metrics.drop("internal_error")
            _log.failure("Starting the audit record {id} for {uri} failed", id=audit_id, uri=uri)
            return NULL_RECORD

    def reopen(self) -> None:
        """
        Reopen the sinks' files (the log file after logrotate).
        """
        self.reopen_sinks()

