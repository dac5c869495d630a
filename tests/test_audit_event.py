"""
Tests for the events the proxy's audit calls produce (`banyan_kproxy.audit.auditor`,
`banyan_kproxy.audit.event`).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.audit import NULL_RECORD, Auditor, IAuditor, NullAuditor
from banyan_kproxy.audit.event import EventTooLarge, encode_event, event_list, micro_time
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.policy import DEFAULT_POLICY, parse_policy
from banyan_kproxy.health import Metrics
from banyan_kproxy.identity import Identity
from zope.interface.verify import verifyObject

T0 = 1714564800.25  # 2024-05-01T12:00:00.25Z
ALICE = Identity(
    "banyan:alice@example.com",
    ("banyan:any-employee-personal-device", "system:authenticated"),
    (("remote-client-ip", ("192.0.2.7",)),),
    "u-123",
)


def policy(level: str, omit: str = "[RequestReceived]", extra: str = "") -> Any:
    return parse_policy(
        f"apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: {omit}\n{extra}rules:\n- level: {level}\n",
        "test",
    )


class Harness:
    """
    An auditor whose events land in a list, encoded as the spool would encode them.
    """

    def __init__(self, audit_policy: Any = DEFAULT_POLICY, body_limit: int = 1024) -> None:
        self.registry = Metrics()
        self.metrics = AuditMetrics.create(self.registry)
        self.raw: list[dict[str, Any]] = []
        self.auditor = Auditor(audit_policy, self.raw.append, self.metrics, body_limit=body_limit)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(encode_event(e, 100 * 1024)) for e in self.raw]

    def begin(self, method: str = "GET", uri: str = "/api/v1/namespaces/default/pods", **kw: Any) -> Any:
        args = {
            "audit_id": "a1",
            "method": method,
            "uri": uri,
            "source_ips": ["192.0.2.7"],
            "user_agent": "kubectl/v1.31.0 (linux/amd64) kubernetes/abc",
            "received_at": T0,
            "user": ALICE,
        }
        args.update(kw)
        return self.auditor.begin(**args)


class EventShapeTests(SynchronousTestCase):
    """
    Events carry exactly the audit.k8s.io/v1 fields kube-apiserver writes.
    """

    def test_metadata_event(self) -> None:
        """
        A list at Metadata gives one ResponseComplete event with user, verb,
        objectRef, source IPs, user agent, status and microsecond timestamps.
        """
        h = Harness()
        record = h.begin(uri="/api/v1/namespaces/default/pods?limit=500")
        self.assertEqual((record.level, record.wants_request_body, record.wants_response_body),
                         ("Metadata", False, False))
        record.response_started(200, T0 + 0.01)  # not long-running: nothing
        record.response_complete(200, T0 + 0.5)
        record.response_complete(200, T0 + 0.6)  # once only
        self.assertEqual(
            h.events,
            [
                {
                    "kind": "Event",
                    "apiVersion": "audit.k8s.io/v1",
                    "level": "Metadata",
                    "auditID": "a1",
                    "stage": "ResponseComplete",
                    "requestURI": "/api/v1/namespaces/default/pods?limit=500",
                    "verb": "list",
                    "user": {
                        "username": "banyan:alice@example.com",
                        "uid": "u-123",
                        "groups": ["banyan:any-employee-personal-device", "system:authenticated"],
                        "extra": {"remote-client-ip": ["192.0.2.7"]},
                    },
                    "sourceIPs": ["192.0.2.7"],
                    "userAgent": "kubectl/v1.31.0 (linux/amd64) kubernetes/abc",
                    "objectRef": {"resource": "pods", "namespace": "default", "apiVersion": "v1"},
                    "responseStatus": {"metadata": {}, "code": 200},
                    "requestReceivedTimestamp": "2024-05-01T12:00:00.250000Z",
                    "stageTimestamp": "2024-05-01T12:00:00.750000Z",
                }
            ],
        )
        self.assertEqual(list(h.events[0]), list(h.raw[0]))  # the Go field order
        self.assertEqual(h.metrics.generated._only.get(), 1)

    def test_unauthenticated(self) -> None:
        """
        A request the proxy refused with 401 is an event with an empty user and the
        proxy's message.
        """
        h = Harness()
        record = h.begin(method="DELETE", uri="/api/v1/namespaces/default/pods/web", user=None)
        record.response_complete(401, T0 + 0.001, message="Unauthorized")
        (event,) = h.events
        self.assertEqual(event["user"], {})
        self.assertEqual(event["verb"], "delete")
        self.assertEqual(
            event["responseStatus"],
            {"metadata": {}, "status": "Failure", "message": "Unauthorized", "code": 401},
        )

    def test_forbidden_status_body(self) -> None:
        """
        A Status answer fills responseStatus with its status, message, reason and
        details even at Metadata, and is not kept as responseObject.
        """
        h = Harness()
        body = json.dumps({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": 'services is forbidden: User "banyan:alice@example.com" cannot list',
            "reason": "Forbidden", "details": {"kind": "services"}, "code": 403,
        }).encode()
        record = h.begin(uri="/api/v1/namespaces/default/services")
        record.response_complete(403, T0 + 0.1, response_body=body)
        (event,) = h.events
        self.assertEqual(event["responseStatus"], {
            "metadata": {}, "status": "Failure",
            "message": 'services is forbidden: User "banyan:alice@example.com" cannot list',
            "reason": "Forbidden", "details": {"kind": "services"}, "code": 403,
        })
        self.assertNotIn("responseObject", event)

    def test_long_running(self) -> None:
        """
        A watch gets ResponseStarted when its headers go out and ResponseComplete
        when it ends, with one auditID.
        """
        h = Harness()
        record = h.begin(uri="/api/v1/namespaces/default/pods?watch=1")
        self.assertTrue(record.long_running)
        record.response_started(200, T0 + 0.01)
        record.response_started(200, T0 + 0.02)
        record.response_complete(200, T0 + 60)
        self.assertEqual([(e["stage"], e["verb"], e["auditID"]) for e in h.events],
                         [("ResponseStarted", "watch", "a1"), ("ResponseComplete", "watch", "a1")])
        self.assertEqual(h.events[0]["stageTimestamp"], "2024-05-01T12:00:00.260000Z")

    def test_request_received_and_omitted_stages(self) -> None:
        """
        Stages the policy does not omit are emitted, RequestReceived at begin.
        """
        h = Harness(policy("Metadata", omit="[ResponseComplete]"))
        record = h.begin(method="POST", uri="/api/v1/namespaces/default/pods/p/exec?command=sh")
        record.response_started(101, T0 + 0.1)
        record.response_complete(101, T0 + 9)
        self.assertEqual([e["stage"] for e in h.events], ["RequestReceived", "ResponseStarted"])
        self.assertNotIn("responseStatus", h.events[0])
        self.assertEqual(h.events[0]["stageTimestamp"], h.events[0]["requestReceivedTimestamp"])

    def test_level_none(self) -> None:
        """
        A request the policy does not audit gets the record that records nothing.
        """
        h = Harness(parse_policy(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n"
            "- level: None\n  nonResourceURLs: [/healthz]\n- level: Metadata\n", "p"))
        record = h.begin(uri="/healthz")
        self.assertIs(record, NULL_RECORD)
        record.request_body(b"{}")
        record.response_started(200, T0)
        record.response_complete(200, T0)
        self.assertEqual(h.raw, [])

    def test_impersonated_user_and_user_agent(self) -> None:
        """
        impersonatedUser is recorded and a User-Agent over 1024 characters is cut
        as kube-apiserver cuts it.
        """
        h = Harness()
        record = h.begin(
            user_agent="x" * 2000,
            impersonated_user=Identity("system:serviceaccount:ci:deployer", ("system:serviceaccounts",)),
        )
        record.response_complete(200, T0)
        (event,) = h.events
        self.assertEqual(event["impersonatedUser"],
                         {"username": "system:serviceaccount:ci:deployer", "groups": ["system:serviceaccounts"]})
        self.assertEqual(event["userAgent"], "x" * 1024 + "...TRUNCATED")

    def test_never_raises(self) -> None:
        """
        A broken call into the auditor gives the null record and a counted drop,
        never an exception in the proxy.
        """
        h = Harness()
        record = h.begin(user=object())
        self.assertIs(record, NULL_RECORD)
        self.assertEqual(h.metrics.dropped.labels(reason="internal_error").get(), 1)
        self.flushLoggedErrors(AttributeError)

    def test_interfaces(self) -> None:
        """
        Both auditors provide IAuditor.
        """
        self.assertTrue(verifyObject(IAuditor, Harness().auditor))
        self.assertTrue(verifyObject(IAuditor, NullAuditor()))
        self.assertIs(NullAuditor().begin(audit_id="x", method="GET", uri="/"), NULL_RECORD)


class BodyTests(SynchronousTestCase):
    """
    Bodies are kept only at the levels that ask for them, and bounded.
    """

    def test_request_level(self) -> None:
        """
        At Request the JSON request body is the requestObject; the response is not kept.
        """
        h = Harness(policy("Request"))
        record = h.begin(method="POST")
        self.assertEqual((record.wants_request_body, record.wants_response_body), (True, False))
        record.request_body(b'{"kind":"Pod","metadata":{"name":"p"}}')
        record.response_complete(201, T0, response_body=b'{"kind":"Pod"}')
        (event,) = h.events
        self.assertEqual(event["requestObject"], {"kind": "Pod", "metadata": {"name": "p"}})
        self.assertNotIn("responseObject", event)

    def test_request_response_level(self) -> None:
        """
        At RequestResponse both objects are kept, except for a watch's stream.
        """
        h = Harness(policy("RequestResponse"))
        record = h.begin(method="PATCH", uri="/api/v1/namespaces/default/pods/p")
        record.request_body(b'{"metadata":{"labels":{"a":"b"}}}')
        record.response_complete(200, T0, response_body=b'{"kind":"Pod","metadata":{"name":"p"}}')
        self.assertEqual(h.events[0]["responseObject"], {"kind": "Pod", "metadata": {"name": "p"}})
        watch = h.begin(uri="/api/v1/pods?watch=1")
        self.assertFalse(watch.wants_response_body)

    def test_metadata_keeps_no_body(self) -> None:
        """
        At Metadata a body passed anyway is not recorded.
        """
        h = Harness()
        record = h.begin(method="POST")
        record.request_body(b'{"secret":"s3cr3t"}')
        record.response_complete(201, T0, response_body=b'{"secret":"s3cr3t"}')
        self.assertNotIn(b"s3cr3t", encode_event(h.raw[0], None))

    def test_bounded(self) -> None:
        """
        A body over the limit is left out and the event annotated as truncated.
        """
        h = Harness(policy("RequestResponse"), body_limit=100)
        record = h.begin(method="POST")
        record.request_body(b'{"data":"' + b"x" * 200 + b'"}')
        record.response_complete(201, T0, response_body=b"[" + b"1," * 100 + b"1]")
        (event,) = h.events
        self.assertNotIn("requestObject", event)
        self.assertNotIn("responseObject", event)
        self.assertEqual(event["annotations"], {"audit.k8s.io/truncated": "true"})

    def test_not_json(self) -> None:
        """
        A body that is not JSON (protobuf, YAML) is left out with a note.
        """
        h = Harness(policy("Request"))
        record = h.begin(method="POST")
        record.request_body(b"\x6b\x38\x73\x00protobuf")
        record.response_complete(201, T0)
        (event,) = h.events
        self.assertNotIn("requestObject", event)
        self.assertEqual(event["annotations"], {"audit.banyan-kproxy/omitted-bodies": "requestObject: not JSON"})

    def test_omit_managed_fields(self) -> None:
        """
        omitManagedFields removes metadata.managedFields from recorded objects and list items.
        """
        h = Harness(policy("RequestResponse", extra="omitManagedFields: true\n"))
        record = h.begin(method="GET")
        record.response_complete(200, T0, response_body=json.dumps({
            "kind": "PodList",
            "items": [{"metadata": {"name": "p", "managedFields": [{"manager": "kubectl"}]}}],
        }).encode())
        self.assertEqual(h.events[0]["responseObject"], {"kind": "PodList", "items": [{"metadata": {"name": "p"}}]})


class EncodingTests(SynchronousTestCase):
    """
    Encoding, truncation and EventList framing.
    """

    def test_truncation(self) -> None:
        """
        An event over the limit loses its objects and gains the truncated annotation;
        one still over the limit is refused.
        """
        event = {"kind": "Event", "auditID": "a", "requestObject": b'{"x":"' + b"y" * 500 + b'"}',
                 "annotations": {"k": "v"}}
        data = json.loads(encode_event(event, 200))
        self.assertEqual(data, {"kind": "Event", "auditID": "a",
                                "annotations": {"k": "v", "audit.k8s.io/truncated": "true"}})
        self.assertIn(b"yyy", encode_event(event, None))
        self.assertRaises(EventTooLarge, encode_event, {"auditID": "a", "requestURI": "/" + "x" * 300}, 200)

    def test_ascii_one_line(self) -> None:
        """
        Encoded events are ASCII without newlines, whatever the input holds.
        """
        data = encode_event({"requestURI": "/a\nb", "user": {"username": "zoë"}}, None)
        self.assertNotIn(b"\n", data)
        data.decode("ascii")
        self.assertEqual(json.loads(data)["user"]["username"], "zoë")

    def test_event_list(self) -> None:
        """
        Encoded events are wrapped as an audit.k8s.io/v1 EventList without re-encoding.
        """
        self.assertEqual(
            json.loads(event_list([b'{"a":1}', b'{"b":2}'])),
            {"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "metadata": {}, "items": [{"a": 1}, {"b": 2}]},
        )

    def test_micro_time(self) -> None:
        """
        Timestamps are RFC 3339 UTC with six fractional digits.
        """
        self.assertEqual(micro_time(0), "1970-01-01T00:00:00.000000Z")
        self.assertEqual(micro_time(1714564800.9999999), "2024-05-01T12:00:01.000000Z")
        self.assertEqual(micro_time(1714564800.000123), "2024-05-01T12:00:00.000123Z")
