"""
``audit.k8s.io/v1`` ``Event`` values: built as plain dicts on the request path,
encoded to compact JSON off it.

The field names, their order and what is left out when empty follow the Go types
(``k8s.io/apiserver/pkg/apis/audit/v1``), so a receiver that reads kube-apiserver's
own audit events reads these.  Timestamps are ``metav1.MicroTime``
(``2024-05-01T12:00:00.123456Z``).  ``encode_event`` also applies kube-apiserver's
truncation (``plugin/pkg/audit/truncate``): an event larger than the limit loses its
request and response objects and gains the annotation
``audit.k8s.io/truncated: "true"``; one still too large is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "API_VERSION",
    "TRUNCATED_ANNOTATION",
    "MAX_USER_AGENT",
    "micro_time",
    "user_info",
    "object_ref",
    "response_status",
    "encode_event",
    "event_list",
    "EventTooLarge",
]

API_VERSION = "audit.k8s.io/v1"
TRUNCATED_ANNOTATION = "audit.k8s.io/truncated"
#: Request and response bodies the proxy could not record (not JSON, or too large).
OMITTED_ANNOTATION = "audit.banyan-kproxy/omitted-bodies"
#: kube-apiserver keeps this much of a User-Agent and marks the cut.
MAX_USER_AGENT = 1024
_USER_AGENT_CUT = "...TRUNCATED"

_LIST_PREFIX = b'{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{},"items":['
_LIST_SUFFIX = b"]}"
#: Bytes an ``EventList`` adds around its items (and between two of them).
LIST_OVERHEAD = len(_LIST_PREFIX) + len(_LIST_SUFFIX)


class EventTooLarge(Exception):
    """
    An event over the size limit even without its request and response objects.
    """


_last_second: list[Any] = [None, ""]


def micro_time(seconds: float) -> str:
    """
    POSIX seconds as ``metav1.MicroTime`` JSON: RFC 3339, UTC, microseconds.
    """
    whole = int(seconds // 1)
    micros = int(round((seconds - whole) * 1_000_000))
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if _last_second[0] != whole:
        # Events come in bursts within one second: format the date part once.
        _last_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _last_second[0] = whole
    return f"{_last_second[1]}.{micros:06d}Z"


def user_info(identity: Any) -> dict[str, Any]:
    """
    ``authentication/v1`` ``UserInfo`` for an `Identity` (``{}`` for None).
    """
    if identity is None:
        return {}
    out: dict[str, Any] = {"username": identity.user}
    if identity.uid:
        out["uid"] = identity.uid
    if identity.groups:
        out["groups"] = list(identity.groups)
    if identity.extra:
        extra: dict[str, list[str]] = {}
        for key, values in identity.extra:
            extra.setdefault(key, []).extend(values)
        out["extra"] = extra
    return out


def object_ref(info: Any) -> dict[str, str] | None:
    """
    ``objectRef`` for a resource request (None for a non-resource request).
    """
    if not info.resource_request:
        return None
    out = {}
    for key, value in (
        ("resource", info.resource),
        ("namespace", info.namespace),
        ("name", info.name),
        ("apiGroup", info.api_group),
        ("apiVersion", info.api_version),
        ("subresource", info.subresource),
    ):
        if value:
            out[key] = value
    return out


def user_agent(value: str | None) -> str | None:
    """
    The User-Agent as kube-apiserver records it: at most 1024 characters, marked when cut.
    """
    if value is not None and len(value) > MAX_USER_AGENT:
        return value[:MAX_USER_AGENT] + _USER_AGENT_CUT
    return value


def response_status(code: int, message: str | None = None, body: Any = None) -> dict[str, Any]:
    """
    ``responseStatus``: the code, and for a ``Status`` answer its bounded fields.
    """
    status: dict[str, Any] = {"metadata": {}}
    if isinstance(body, dict) and body.get("kind") == "Status":
        for key in ("status", "message", "reason", "details"):
            if key in body:
                status[key] = body[key]
    elif message:
        status["status"] = "Failure" if code >= 400 else "Success"
        status["message"] = message
    status["code"] = code
    return status


def _strip_managed_fields(obj: Any) -> Any:
    if isinstance(obj, dict):
        meta = obj.get("metadata")
        if isinstance(meta, dict) and "managedFields" in meta:
            obj = dict(obj, metadata={k: v for k, v in meta.items() if k != "managedFields"})
        items = obj.get("items")
        if isinstance(items, list):
            obj = dict(obj, items=[_strip_managed_fields(i) for i in items])
    return obj


def _decode_bodies(event: dict[str, Any]) -> dict[str, Any]:
    """
    Turn raw JSON body bytes into objects; leave out (and note) what is not JSON.
    """
    omit_managed = event.pop("_omitManagedFields", False)
    omitted = []
    for key in ("requestObject", "responseObject"):
        raw = event.get(key)
        if not isinstance(raw, bytes | bytearray):
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            del event[key]
            omitted.append(f"{key}: not JSON")
            continue
        event[key] = _strip_managed_fields(obj) if omit_managed else obj
    if omitted:
        event.setdefault("annotations", {})[OMITTED_ANNOTATION] = "; ".join(omitted)
    return event


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode_event(event: dict[str, Any], max_size: int | None) -> bytes:
    """
    Compact JSON (ASCII, so never a raw newline) for one event.

    With ``max_size`` (truncation enabled), an event larger than that loses its
    request and response objects and is annotated ``audit.k8s.io/truncated``;
    `EventTooLarge` if it is still too large.
    """
    event = _decode_bodies(dict(event))
    data = _dumps(event)
    if max_size is None or len(data) <= max_size:
        return data
    event.pop("requestObject", None)
    event.pop("responseObject", None)
    annotations = dict(event.get("annotations") or {})
    annotations[TRUNCATED_ANNOTATION] = "true"
    event["annotations"] = annotations
    data = _dumps(event)
    if len(data) > max_size:
        raise EventTooLarge(f"event {event.get('auditID')} is {len(data)} bytes after truncation")
    return data


def event_list(events: Sequence[bytes]) -> bytes:
    """
    An ``audit.k8s.io/v1`` ``EventList`` around already encoded events.
    """
    return _LIST_PREFIX + b",".join(events) + _LIST_SUFFIX
