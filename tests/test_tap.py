"""
Tests for L{banyan_kproxy.tap}: what ``twistd banyan-kproxy`` builds.
"""

from __future__ import annotations

import io
import os
import sys

from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy import tap
from banyan_kproxy.services import StartupError
from banyan_kproxy.testing.certs import CertificateAuthority


class MakeServiceTests(SynchronousTestCase):
    """
    Tests for L{tap.makeService}.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        issued = CertificateAuthority.generate().issue("proxy", dns_names=["proxy"])
        self.cert, self.key = issued.write(self.dir, "tls")
        self.token = os.path.join(self.dir, "token")
        with open(self.token, "w") as f:
            f.write("t\n")

    def ini(self, extra: str = "") -> str:
        path = os.path.join(self.dir, "kproxy.ini")
        with open(path, "w") as f:
            f.write(
                f"[proxy]\nlisten = 127.0.0.1:8443\ntls_cert_file = {self.cert}\n"
                f"tls_key_file = {self.key}\n{extra}\n"
                "[oidc]\nissuer_url = https://issuer.test/v2\nclient_id = kubernetes\n\n"
                f"[upstream]\nserver = https://10.0.0.1:6443\ntoken_file = {self.token}\n"
            )
        return path

    def make(self, path: str, reactor: MemoryReactorClock) -> object:
        options = tap.Options()
        options.parseOptions(["--config", path])
        return tap.makeService(options, reactor=reactor)

    def test_named_children(self) -> None:
        """
        The proxy role is a MultiService of named parts, binding nothing until started.
        """
        reactor = MemoryReactorClock()
        service = self.make(self.ini("health_listen = 127.0.0.1:8080"), reactor)
        self.assertEqual(
            sorted(s.name for s in service),
            ["certificates", "health", "oidc", "proxy", "reload", "upstream"],
        )
        self.assertEqual(reactor.tcpServers, [])

    def test_start_binds(self) -> None:
        """
        Starting the application binds the TLS listener and the health listener on
        the configured addresses, and the certificate reloader polls the clock.
        """
        reactor = MemoryReactorClock()
        service = self.make(self.ini("health_listen = 127.0.0.1:8080"), reactor)
        # Only the parts that bind and poll: the OIDC client would resolve the
        # issuer's name through the global reactor's thread pool.
        parts = [service.getServiceNamed(n) for n in ("proxy", "health", "certificates")]
        for part in parts:
            part.privilegedStartService()
            part.startService()
        ports = sorted((port, interface) for port, _, _, interface in reactor.tcpServers)
        self.assertEqual(ports, [(8080, "127.0.0.1"), (8443, "127.0.0.1")])
        self.assertEqual(len([c for c in reactor.getDelayedCalls() if c.active()]), 1)
        for part in parts:
            self.successResultOf(maybeDeferred(part.stopService))
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.active()], [])

    def test_no_health(self) -> None:
        """
        Without ``health_listen`` there is no health listener.
        """
        service = self.make(self.ini(), MemoryReactorClock())
        self.assertNotIn("health", [s.name for s in service])

    def test_config_error_exits(self) -> None:
        """
        A bad configuration ends the process with status 2 (not 0, as a UsageError
        would on Twisted 22.4).
        """
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        path = self.ini("colour = blue")
        error = self.assertRaises(StartupError, self.make, path, MemoryReactorClock())
        self.assertEqual(error.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            "banyan-kproxy: configuration error:\n"
            f"  {path}: [proxy] colour: unknown key (known keys: drain_timeout, health_listen, "
            "listen, reuse_port, tls_cert_file, tls_key_file)\n",
        )

    def test_missing_config_file(self) -> None:
        """
        A configuration file that does not exist ends the process with status 2.
        """
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        path = os.path.join(self.dir, "nope.ini")
        error = self.assertRaises(StartupError, self.make, path, MemoryReactorClock())
        self.assertEqual(error.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            f"banyan-kproxy: configuration error:\n  {path}: the configuration file does not exist\n",
        )


class GarbageCollectorTests(SynchronousTestCase):
    """
    Tests for L{tap.tune_garbage_collector}, which twistd's ``makeService`` runs.
    """

    def setUp(self) -> None:
        import gc

        threshold = gc.get_threshold()

        def restore() -> None:
            gc.unfreeze()
            gc.set_threshold(*threshold)

        self.addCleanup(restore)

    def test_tuned(self) -> None:
        """
        What exists at start-up is frozen out of the collector's sight and young
        collections run every `GC_YOUNG_THRESHOLD` allocations; the older
        generations keep their thresholds.
        """
        import gc

        _, middle, old = gc.get_threshold()
        tap.tune_garbage_collector()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), (tap.GC_YOUNG_THRESHOLD, middle, old))
