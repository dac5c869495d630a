"""
Tests for the audit service as the daemon builds it (`banyan_kproxy.audit.service`):
configuration checks, start, the final flush on stop, SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from io import StringIO
from typing import Any

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.audit import NullAuditor
from banyan_kproxy.audit.errors import AuditConfigError
from banyan_kproxy.audit.service import audit_services
from banyan_kproxy.audit.testing import BanyanAPIStandIn, WebhookReceiver, sync_executor
from banyan_kproxy.config import AuditConfig, BanyanConfig, Config
from banyan_kproxy.health import Metrics
from banyan_kproxy.identity import Identity

USER = Identity("banyan:alice@example.com", ("banyan:any-employee-personal-device",))


class Reactor(MemoryReactorClock):
    """
    A memory reactor whose callFromThread runs the call at once.
    """

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N802 - Twisted's name
        f(*args, **kwargs)


class Setup:
    """
    A directory with a webhook kubeconfig and a config built around it.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.dir = os.path.abspath(case.mktemp())
        os.makedirs(self.dir)
        self.webhook = self.write(
            "webhook.yaml",
            "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster: {server: 'http://receiver/audit'}\n"
            "contexts:\n- name: a\n  context: {cluster: a}\ncurrent-context: a\n",
        )
        self.reactor = Reactor()
        self.receiver = WebhookReceiver(self.reactor)
        self.stub = StubTreq(self.receiver)
        self.metrics = Metrics()

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def config(self, banyan: BanyanConfig | None = None, **audit: Any) -> Config:
        values: dict[str, Any] = {
            "webhook_config_file": self.webhook,
            "spool_dir": os.path.join(self.dir, "spool"),
            "batch_max_wait": 10.0,
            "batch_max_size": 3,
        }
        values.update(audit)
        return Config(os.path.join(self.dir, "kproxy.ini"), audit=AuditConfig(**values), banyan=banyan)

    def build(self, config: Config, **kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("http_clients", {"webhook": self.stub})
        kwargs.setdefault("install_sighup", False)
        auditor, services = audit_services(config, self.reactor, self.metrics, executor=sync_executor, **kwargs)
        (service,) = services
        return auditor, service

    def request(self, auditor: Any, n: int, uri: str = "/api/v1/namespaces/default/pods") -> None:
        record = auditor.begin(
            audit_id=f"id-{n}", method="GET", uri=uri, source_ips=["192.0.2.1"],
            user_agent="kubectl", received_at=self.reactor.seconds(), user=USER,
        )
        record.response_complete(200, self.reactor.seconds())


class ConfigurationTests(SynchronousTestCase):
    """
    What cannot work is refused before anything starts, in one line.
    """

    def test_no_audit_section(self) -> None:
        """
        Without [audit] the proxy gets the auditor that records nothing, and no service.
        """
        auditor, services = audit_services(Config("x.ini"), MemoryReactorClock(), Metrics())
        self.assertIsInstance(auditor, NullAuditor)
        self.assertEqual(services, [])

    def test_refused(self) -> None:
        """
        A bad policy names the file and rule; a missing sink, a bad webhook file and
        a tiny spool are refused too; all as AuditConfigError (a ValueError).
        """
        s = Setup(self)
        policy = s.write("policy.yaml", "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Full\n")
        broken_webhook = s.write("broken.yaml", "clusters: 3\n")
        cases = [
            (s.config(policy_file=policy),
             f"audit policy_file {policy}: rules[0].level: unsupported value 'Full': supported values: "
             "None, Metadata, Request, RequestResponse"),
            (s.config(webhook_config_file=None),
             f"{s.dir}/kproxy.ini: [audit]: no sink: set webhook_config_file or log_file, or add a "
             "[banyan] section (events would only pile up in the spool)"),
            (s.config(webhook_config_file=broken_webhook),
             f"{broken_webhook}: no current-context, and not exactly one cluster to use"),
            (s.config(spool_max_bytes=1000),
             f"{s.dir}/kproxy.ini: [audit] spool_max_bytes: 1000 is too small (at least 65536 bytes)"),
        ]
        for config, message in cases:
            error = self.assertRaises(AuditConfigError, audit_services, config, s.reactor, Metrics())
            self.assertIsInstance(error, ValueError)
            self.assertEqual(str(error), message)

    def test_all_sinks(self) -> None:
        """
        Webhook, log file and Banyan sinks can run together, each with its own pump.
        """
        s = Setup(self)
        refresh = s.write("refresh", "r\n")
        config = s.config(
            log_file=os.path.join(s.dir, "audit.log"),
            banyan=BanyanConfig("mykube", refresh, "https://net.example.com"),
        )
        auditor, service = s.build(
            config, http_clients={"webhook": s.stub, "banyan": StubTreq(BanyanAPIStandIn("r"))}
        )
        self.assertEqual([pump.name for pump in service.pumps], ["webhook", "log", "banyan"])
        self.assertEqual(service.name, "audit")


class LifecycleTests(SynchronousTestCase):
    """
    Start, deliver, stop.
    """

    def test_deliver_and_final_flush(self) -> None:
        """
        Events reach the receiver in batches of batch_max_size; on stop the partial
        batch goes out at once and the acknowledgement is on disk.
        """
        s = Setup(self)
        auditor, service = s.build(s.config())
        service.privilegedStartService()
        service.startService()
        for n in range(4):
            s.request(auditor, n)
        s.reactor.advance(0)
        s.stub.flush()
        self.assertEqual([[e["auditID"] for e in b] for b in s.receiver.batches], [["id-0", "id-1", "id-2"]])
        d = service.stopService()
        s.stub.flush()
        self.successResultOf(d)
        self.assertEqual([len(b) for b in s.receiver.batches], [3, 1])
        spool = os.path.join(s.dir, "spool")
        with open(os.path.join(spool, "webhook.ack")) as f:
            self.assertEqual(int(f.read()), service.spool.committed_end)
        rendered = s.metrics.render().decode()
        self.assertIn("kproxy_audit_events_generated_total 4\n", rendered)
        self.assertIn("kproxy_audit_events_spooled_total 4\n", rendered)
        self.assertIn('kproxy_audit_events_sent_total{sink="webhook"} 4\n', rendered)
        self.assertIn('kproxy_audit_events_buffered{queue="webhook"} 0\n', rendered)

    def test_undelivered_kept_for_next_start(self) -> None:
        """
        Events a receiver did not take before stop are delivered by the next start.
        """
        s = Setup(self)
        s.receiver.status = 503
        auditor, service = s.build(s.config())
        service.startService()
        for n in range(2):
            s.request(auditor, n)
        s.reactor.advance(0)
        d = service.stopService()
        s.stub.flush()
        s.reactor.advance(10)
        self.successResultOf(d)
        self.assertEqual(s.receiver.batches, [])
        self.flushLoggedErrors()
        s.receiver.status = 200
        s.metrics = Metrics()
        auditor2, service2 = s.build(s.config(), http_clients={"webhook": s.stub})
        service2.startService()
        s.reactor.advance(10)
        s.stub.flush()
        self.assertEqual([e["auditID"] for e in s.receiver.events], ["id-0", "id-1"])
        self.successResultOf(service2.stopService())

    def test_locked_spool_stops_startup(self) -> None:
        """
        A spool directory another process holds stops the daemon with one line and exit 2.
        """
        s = Setup(self)
        _, first = s.build(s.config())
        first.privilegedStartService()
        s.metrics = Metrics()
        _, second = s.build(s.config())
        stderr = StringIO()
        self.patch(sys, "__stderr__", stderr)
        error = self.assertRaises(SystemExit, second.privilegedStartService)
        self.assertEqual(error.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            f"banyan-kproxy: audit: spool_dir {s.dir}/spool is in use by another process (pid {os.getpid()}); "
            "give every daemon process its own spool_dir\n",
        )
        first.spool.store.close()

    def test_sighup_reopens_log(self) -> None:
        """
        SIGHUP reopens the log file (new lines go to a new file after logrotate's
        rename), calls the handler that was there before, and is restored on stop.
        """
        s = Setup(self)
        log_file = os.path.join(s.dir, "audit.log")
        called = []
        previous = signal.signal(signal.SIGHUP, lambda *a: called.append(a[0]))
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        before = signal.getsignal(signal.SIGHUP)
        auditor, service = s.build(s.config(webhook_config_file=None, log_file=log_file), install_sighup=True)
        service.startService()
        s.request(auditor, 1)
        s.reactor.advance(0)
        os.rename(log_file, log_file + ".1")
        os.kill(os.getpid(), signal.SIGHUP)
        s.request(auditor, 2)
        s.reactor.advance(0)
        with open(log_file + ".1") as f:
            self.assertEqual([json.loads(line)["auditID"] for line in f], ["id-1"])
        with open(log_file) as f:
            self.assertEqual([json.loads(line)["auditID"] for line in f], ["id-2"])
        self.assertEqual(called, [signal.SIGHUP])
        self.successResultOf(service.stopService())
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
