"""
Tests for the audit sinks (`banyan_kproxy.audit.sinks`): the webhook and its
kubeconfig, the Banyan REST API, and the JSON-lines log file.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from banyan_kproxy.audit.backend import SinkRejected
from banyan_kproxy.audit.errors import AuditConfigError
from banyan_kproxy.audit.sinks import (
    BanyanSink,
    IAuditSink,
    LogFileSink,
    WebhookSink,
    load_webhook_target,
)
from banyan_kproxy.audit.testing import BanyanAPIStandIn, WebhookReceiver, sync_executor
from banyan_kproxy.config import BanyanConfig
from banyan_kproxy.testing.certs import CertificateAuthority

EVENTS = [b'{"kind":"Event","auditID":"a","stage":"ResponseComplete"}',
          b'{"kind":"Event","auditID":"b","stage":"ResponseComplete"}']


def write(directory: str, name: str, content: str | bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def kubeconfig(server: str, cluster: str = "", user: str = "", current: bool = True) -> str:
    text = (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: audit\n  cluster:\n    server: {server}\n{cluster}"
        f"users:\n- name: proxy\n  user:\n{user or '    {}'}\n"
        "contexts:\n- name: default\n  context: {cluster: audit, user: proxy}\n"
    )
    return text + ("current-context: default\n" if current else "")


class WebhookConfigTests(SynchronousTestCase):
    """
    The webhook target is read from a kubeconfig-format file.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca = CertificateAuthority.generate("webhook CA")
        self.ca_file = write(self.dir, "ca.crt", self.ca.cert_pem)

    def test_token(self) -> None:
        """
        server, certificate-authority (relative to the file) and token are used.
        """
        path = write(self.dir, "webhook.yaml", kubeconfig(
            "https://audit.example.com:8443/events",
            cluster="    certificate-authority: ca.crt\n",
            user="    token: s3cret\n",
        ))
        target = load_webhook_target(path)
        self.assertEqual((target.server, target.token), ("https://audit.example.com:8443/events", "s3cret"))
        self.assertIsNotNone(target.tls)

    def test_data_fields_and_client_certificate(self) -> None:
        """
        certificate-authority-data and client-certificate-data/client-key-data work,
        and leave no files behind.
        """
        issued = self.ca.issue("proxy")
        cert, key = issued.write(self.dir, "client")
        with open(cert, "rb") as f:
            cert_pem = f.read()
        with open(key, "rb") as f:
            key_pem = f.read()

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        def scratch() -> set[str]:
            return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("banyan-kproxy-webhook-")}

        before = scratch()
        path = write(self.dir, "webhook.yaml", kubeconfig(
            "https://127.0.0.1:9443",
            cluster=f"    certificate-authority-data: {b64(self.ca.cert_pem)}\n",
            user=f"    client-certificate-data: {b64(cert_pem)}\n    client-key-data: {b64(key_pem)}\n",
        ))
        target = load_webhook_target(path)
        self.assertIsNotNone(target.tls)
        self.assertIsNone(target.token)
        self.assertEqual(scratch(), before)

    def test_single_context_without_current(self) -> None:
        """
        Without current-context the only context is used.
        """
        path = write(self.dir, "webhook.yaml", kubeconfig("http://127.0.0.1:1/", current=False))
        self.assertEqual(load_webhook_target(path).server, "http://127.0.0.1:1/")

    def test_refused(self) -> None:
        """
        What cannot be used is refused with one line naming the file.
        """
        cases = {
            kubeconfig("ftp://x"): "cluster server 'ftp://x' is not an http(s):// URL",
            kubeconfig("https://x", cluster="    insecure-skip-tls-verify: true\n"):
                "cluster insecure-skip-tls-verify is not supported",
            kubeconfig("https://x", user="    exec: {command: x}\n"):
                "user exec is not supported for the audit webhook",
            kubeconfig("https://x", cluster="    certificate-authority: missing.crt\n"):
                f"ca_file {self.dir}/missing.crt: cannot read",
            kubeconfig("https://x", cluster="    certificate-authority-data: '%%%'\n"):
                "certificate-authority-data is not base64",
            "clusters: [": "not valid YAML",
            "apiVersion: v1\nclusters:\n- {name: a, cluster: {server: 'https://a'}}\n"
            "- {name: b, cluster: {server: 'https://b'}}\n":
                "no current-context, and not exactly one cluster to use",
            kubeconfig("https://x").replace("current-context: default", "current-context: other"):
                "no context named 'other'",
        }
        for text, message in cases.items():
            path = write(self.dir, "webhook.yaml", text)
            error = self.assertRaises(AuditConfigError, load_webhook_target, path)
            self.assertTrue(str(error).startswith(f"{path}: "), str(error))
            self.assertIn(message, str(error))
            self.assertNotIn("\n", str(error))


class WebhookSinkTests(SynchronousTestCase):
    """
    Batches are POSTed as EventList JSON.
    """

    def sink(self, receiver: WebhookReceiver, **target: Any) -> tuple[WebhookSink, StubTreq]:
        from banyan_kproxy.audit.sinks import WebhookTarget

        stub = StubTreq(receiver)
        return WebhookSink(WebhookTarget("https://audit.example.com/events", "cfg", **target), stub, Clock()), stub

    def test_post(self) -> None:
        """
        The receiver gets one EventList with the events, JSON content type and the token.
        """
        receiver = WebhookReceiver()
        sink, stub = self.sink(receiver, token="s3cret")
        self.assertTrue(verifyObject(IAuditSink, sink))
        d = sink.send(EVENTS)
        stub.flush()
        self.successResultOf(d)
        self.assertEqual([[e["auditID"] for e in b] for b in receiver.batches], [["a", "b"]])
        _, headers = receiver.requests[0]
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"authorization"], [b"Bearer s3cret"])

    def test_token_file(self) -> None:
        """
        A tokenFile is read for the Authorization header.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        receiver = WebhookReceiver()
        sink, stub = self.sink(receiver, token_file=write(directory, "token", "from-file\n"))
        d = sink.send(EVENTS)
        stub.flush()
        self.successResultOf(d)
        self.assertEqual(receiver.requests[0][1][b"authorization"], [b"Bearer from-file"])

    def test_basic_auth(self) -> None:
        """
        username and password go as HTTP basic authentication.
        """
        receiver = WebhookReceiver()
        sink, stub = self.sink(receiver, username="u", password="p")
        d = sink.send(EVENTS)
        stub.flush()
        self.successResultOf(d)
        self.assertEqual(receiver.requests[0][1][b"authorization"], [b"Basic " + base64.b64encode(b"u:p")])

    def test_refused(self) -> None:
        """
        A non-2xx answer fails the send with the status; 413 marks the batch too large.
        """
        receiver = WebhookReceiver(status=503)
        sink, stub = self.sink(receiver)
        d = sink.send(EVENTS)
        stub.flush()
        error = self.failureResultOf(d, SinkRejected).value
        self.assertEqual((error.code, error.too_large), (503, False))
        self.assertEqual(str(error), 'https://audit.example.com/events answered 503: {"error":"down"}')
        receiver.status = 413
        d = sink.send(EVENTS)
        stub.flush()
        self.assertTrue(self.failureResultOf(d, SinkRejected).value.too_large)


class BanyanSinkTests(SynchronousTestCase):
    """
    The Banyan REST API: refresh token exchange, tagged batches, one re-exchange on 401.
    """

    REFRESH = "refresh-TOKEN-never-logged"

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.token_file = write(directory, "refresh", self.REFRESH + "\n")
        self.api = BanyanAPIStandIn(self.REFRESH)
        self.stub = StubTreq(self.api)
        config = BanyanConfig("mykube", self.token_file, "https://net.banyanops.com")
        self.sink = BanyanSink(config, self.stub, Clock())
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def send(self) -> Any:
        d = self.sink.send(EVENTS)
        self.stub.flush()
        return d

    def assertNotLogged(self, secret: str) -> None:
        from twisted.logger import formatEvent

        for event in self.logged:
            self.assertNotIn(secret, formatEvent(event))
            self.assertNotIn(secret, repr(event))

    def test_exchange_and_post(self) -> None:
        """
        The refresh token is exchanged once; batches carry the service name and the
        access token.
        """
        self.assertTrue(verifyObject(IAuditSink, self.sink))
        self.successResultOf(self.send())
        self.successResultOf(self.send())
        self.assertEqual(self.api.issued, 1)
        self.assertEqual(len(self.api.posts), 2)
        post = self.api.posts[0]
        self.assertEqual(post["service_name"], "mykube")
        self.assertEqual(post["event_list"]["kind"], "EventList")
        self.assertEqual([e["auditID"] for e in post["event_list"]["items"]], ["a", "b"])
        self.assertNotLogged(self.REFRESH)

    def test_401_exchanges_again_once(self) -> None:
        """
        An expired access token is replaced once and the batch sent again.
        """
        self.successResultOf(self.send())
        self.api.expire()
        self.successResultOf(self.send())
        self.assertEqual((self.api.issued, self.api.unauthorized, len(self.api.posts)), (2, 1, 2))

    def test_401_twice_fails(self) -> None:
        """
        When the new access token is refused too, the send fails (and is retried later).
        """
        self.successResultOf(self.send())
        self.api.expire()
        original = self.api.render_POST

        def expire_every_time(request: Any) -> bytes:
            result = original(request)
            if request.path == b"/api/v1/refresh_token":
                self.api.expire()
            return result

        self.api.render_POST = expire_every_time  # type: ignore[method-assign]
        error = self.failureResultOf(self.send(), SinkRejected).value
        self.assertEqual(error.code, 401)
        self.assertEqual(self.api.issued, 2)

    def test_bad_refresh_token(self) -> None:
        """
        A refused refresh token fails the send without the token in the message or log.
        """
        self.api.refresh_token = "something-else"
        error = self.failureResultOf(self.send(), SinkRejected).value
        self.assertEqual(
            str(error), "exchanging the refresh token at https://net.banyanops.com/api/v1/refresh_token answered 401"
        )
        self.assertNotIn(self.REFRESH, str(error))
        self.assertNotLogged(self.REFRESH)

    def test_concurrent_sends_share_one_exchange(self) -> None:
        """
        Batches sent together wait for one refresh token exchange.
        """
        first, second = self.sink.send(EVENTS), self.sink.send(EVENTS)
        self.stub.flush()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual((self.api.issued, len(self.api.posts)), (1, 2))


class LogFileSinkTests(SynchronousTestCase):
    """
    The log file gets one JSON event per line and is reopened on request.
    """

    def test_lines_and_reopen(self) -> None:
        """
        Events are appended as lines (mode 0600); after a rename and reopen, new
        lines go to a new file at the configured path.
        """
        directory = os.path.abspath(self.mktemp())
        path = os.path.join(directory, "audit", "audit.log")
        sink = LogFileSink(path, sync_executor)
        self.assertTrue(verifyObject(IAuditSink, sink))
        self.successResultOf(sink.send(EVENTS))
        os.rename(path, path + ".1")
        self.successResultOf(sink.send(EVENTS[:1]))  # still the open (renamed) file
        self.successResultOf(sink.reopen())
        self.successResultOf(sink.send(EVENTS[1:]))
        self.successResultOf(sink.close())
        with open(path + ".1", "rb") as f:
            self.assertEqual(f.read(), EVENTS[0] + b"\n" + EVENTS[1] + b"\n" + EVENTS[0] + b"\n")
        with open(path, "rb") as f:
            self.assertEqual([json.loads(line)["auditID"] for line in f], ["b"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_write_error(self) -> None:
        """
        A file that cannot be written fails the send (to be retried).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        sink = LogFileSink(directory, sync_executor)  # a directory is not a file
        self.failureResultOf(sink.send(EVENTS), IsADirectoryError)
