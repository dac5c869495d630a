"""
Tests for L{banyan_kproxy.reload}: SIGHUP (``systemctl reload``) re-reads the
certificate and reopens the audit log, in memory and in the real daemon.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from typing import Any

import treq
from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent

from banyan_kproxy.reload import SighupService, add_sighup_reload
from banyan_kproxy.testing.stack import LoopbackStack
from banyan_kproxy.tls import CertificateReloader, https_policy


class _CallsAtOnce:
    """
    Just enough reactor: ``callFromThread`` runs the call straight away.
    """

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class SighupServiceTests(SynchronousTestCase):
    """
    The SIGHUP handler of a running `SighupService`.
    """

    def setUp(self) -> None:
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.earlier: list[int] = []
        signal.signal(signal.SIGHUP, lambda signum, frame: self.earlier.append(signum))

    def test_sighup_runs_actions_and_chains(self) -> None:
        """
        SIGHUP runs every action, one that raises does not stop the next, and the
        handler installed before still runs.
        """
        calls: list[str] = []

        def broken() -> None:
            calls.append("broken")
            raise OSError("cannot read")

        service = SighupService("reload", [broken, lambda: calls.append("tls")], _CallsAtOnce())
        service.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(calls, ["broken", "tls"])
        self.assertEqual(self.earlier, [signal.SIGHUP])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        service.stopService()

    def test_stop_restores(self) -> None:
        """
        Stopping puts the earlier handler back; a later SIGHUP runs no action.
        """
        before = signal.getsignal(signal.SIGHUP)
        calls: list[str] = []
        service = SighupService("reload", [lambda: calls.append("tls")], _CallsAtOnce())
        service.startService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        service.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual((calls, self.earlier), ([], [signal.SIGHUP]))


class _Certificate:
    """
    Stands in for a `ServerTLS`: counts reloads.
    """

    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> bool:
        self.reloads += 1
        return True


class AddSighupReloadTests(SynchronousTestCase):
    """
    `add_sighup_reload`, which ``tap.makeService`` calls for every configuration.
    """

    def setUp(self) -> None:
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)

    def test_every_certificate(self) -> None:
        """
        The ``reload`` child re-reads the certificate of every certificate reloader
        in the tree (the proxy's and the gateway's, nested or not) on SIGHUP.
        """
        proxy, gateway = _Certificate(), _Certificate()
        parent = MultiService()
        CertificateReloader(proxy, MemoryReactorClock()).setServiceParent(parent)
        nested = MultiService()
        nested.setServiceParent(parent)
        CertificateReloader(gateway, MemoryReactorClock()).setServiceParent(nested)
        reload = add_sighup_reload(parent, _CallsAtOnce())
        self.assertIs(parent.getServiceNamed("reload"), reload)
        reload.startService()
        self.addCleanup(reload.stopService)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual((proxy.reloads, gateway.reloads), (1, 1))

    def test_no_certificates(self) -> None:
        """
        Without any TLS listener (the connect role) SIGHUP is still handled: it
        does not end the process.
        """
        parent = MultiService()
        reload = add_sighup_reload(parent, _CallsAtOnce())
        self.assertEqual(reload.actions, [])
        reload.startService()
        self.addCleanup(reload.stopService)
        self.assertTrue(callable(signal.getsignal(signal.SIGHUP)))


def _served_common_name(port: int, ca_file: str) -> str:
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with context.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    name = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(name[0].value)


class DaemonSighupTests(TestCase):
    """
    ``kill -HUP`` (what ``systemctl reload`` sends) to the real daemon.
    """

    timeout = 90

    def test_sighup_reloads_certificate_and_reopens_audit_log(self) -> None:
        """
        The daemon survives SIGHUP, serves the new certificate at once (no waiting for
        the 5-second poll: unchanged files are re-read too), and writes audit events to
        a new file after the old one was moved away (logrotate).
        """

        async def run() -> None:
            directory = os.path.abspath(self.mktemp())
            audit_log = os.path.join(directory, "audit.log")
            stack = LoopbackStack(
                reactor,
                directory,
                extra_ini=(
                    f"\n[audit]\nlog_file = {audit_log}\nspool_dir = {directory}/spool\n"
                    "batch_max_wait = 50ms\n"
                ),
            )
            self.addCleanup(lambda: Deferred.fromCoroutine(stack.stop()))
            await stack.start()
            pid = stack.daemon_pid
            assert pid is not None

            async def wait_for(text: str, count: int) -> None:
                for _ in range(200):
                    if stack.daemon_output.count(text) >= count:
                        return
                    await deferLater(reactor, 0.05, lambda: None)
                self.fail(f"{text!r} did not appear {count} times:\n{stack.daemon_output}")

            async def audited(path: str) -> list[dict[str, Any]]:
                for _ in range(200):
                    if os.path.exists(path) and os.path.getsize(path):
                        with open(path, encoding="utf-8") as f:
                            return [json.loads(line) for line in f]
                    await deferLater(reactor, 0.05, lambda: None)
                self.fail(f"nothing was written to {path}")

            loaded = stack.daemon_output.count("TLS certificate CN=127.0.0.1")
            os.kill(pid, signal.SIGHUP)
            await wait_for("SIGHUP: reloading (reload)", 1)
            await wait_for("Reloaded TLS certificate CN=127.0.0.1", loaded)

            stack.ca.issue("rotated.example", ip_addresses=["127.0.0.1"]).write(directory, "proxy")
            os.kill(pid, signal.SIGHUP)
            await wait_for("SIGHUP: reloading (reload)", 2)
            await wait_for("Reloaded TLS certificate CN=rotated.example", 1)
            self.assertEqual(
                await deferToThread(_served_common_name, stack.proxy_port, stack.ca_file),
                "rotated.example",
            )

            # A request without a token is refused and audited into audit.log.
            agent = Agent(reactor, contextFactory=https_policy(stack.ca_file))

            async def request() -> None:
                response = await treq.get(stack.proxy_url + "/api", agent=agent, timeout=5)
                self.assertEqual(response.code, 401)
                await treq.content(response)

            await request()
            self.assertEqual((await audited(audit_log))[0]["responseStatus"]["code"], 401)
            os.rename(audit_log, audit_log + ".1")
            os.kill(pid, signal.SIGHUP)
            await wait_for("SIGHUP: reloading (reload)", 3)
            await request()
            self.assertEqual([e["requestURI"] for e in await audited(audit_log)], ["/api"])
            os.kill(pid, 0)  # still running

        return Deferred.fromCoroutine(run())
