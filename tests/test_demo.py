"""
Tests for ``banyan-kproxy demo`` (``make demo``): which cluster it fronts, and a
whole run as a user starts and stops it.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.server import Site

from banyan_kproxy.config import Address
from banyan_kproxy.demo import _answers, current_context_cluster
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.kubeapi import KubeAPIStandIn, UserInfo
from banyan_kproxy.tls import ServerTLS, listen_tls

from .test_daemon import source_env


def kubeconfig(path: str, server: str, user: dict, ca_pem: bytes | None = None) -> None:
    cluster: dict = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    with open(path, "w") as f:
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "ctx",
        }, f)


class CurrentContextTests(SynchronousTestCase):
    """
    Which kubeconfig contexts the demo can put the proxy in front of.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "config")

    def test_no_kubeconfig(self) -> None:
        """
        Without a kubeconfig there is no cluster, and the reason says so.
        """
        self.assertEqual(
            current_context_cluster(self.dir, {"KUBECONFIG": self.config}), (None, "no kubeconfig")
        )

    def test_token_context(self) -> None:
        """
        A context with a token and CA data is handed over as files the daemon reads.
        """
        kubeconfig(self.config, "https://10.1.2.3:6443", {"token": "s3cret"}, b"CA PEM")
        cluster, where = current_context_cluster(self.dir, {"KUBECONFIG": self.config})
        self.assertEqual(where, "context ctx (https://10.1.2.3:6443)")
        self.assertEqual(cluster.server, "https://10.1.2.3:6443")
        with open(cluster.token_file) as f:
            self.assertEqual(f.read(), "s3cret")
        self.assertEqual(os.stat(cluster.token_file).st_mode & 0o777, 0o600)
        with open(cluster.ca_file, "rb") as f:
            self.assertEqual(f.read(), b"CA PEM")

    def test_exec_plugin_context(self) -> None:
        """
        A context whose credential comes from an exec plugin cannot be handed over.
        """
        kubeconfig(self.config, "https://10.1.2.3:6443",
                   {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "x"}})
        cluster, where = current_context_cluster(self.dir, {"KUBECONFIG": self.config})
        self.assertIsNone(cluster)
        self.assertIn("cannot hand over", where)


class AnswersTests(TestCase):
    """
    The demo probes a context's cluster before fronting it.
    """

    timeout = 30

    def test_answers(self) -> Deferred[None]:
        """
        A cluster that accepts the context's token answers; one that does not, does not.
        """

        async def run() -> None:
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            ca = CertificateAuthority.generate()
            cert, key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(directory, "api")
            standin = KubeAPIStandIn(tokens={"good": UserInfo("admin", ("system:masters",))}, clock=reactor)
            port = listen_tls(reactor, Address("127.0.0.1", 0), Site(standin.resource()),
                              ServerTLS.from_files(cert, key))
            self.addCleanup(port.stopListening)
            server = f"https://127.0.0.1:{port.getHost().port}"
            config = os.path.join(directory, "config")
            for token, expected in (("good", True), ("bad", False)):
                kubeconfig(config, server, {"token": token}, ca.cert_pem)
                cluster, _ = current_context_cluster(directory, {"KUBECONFIG": config})
                self.assertEqual(await _answers(reactor, cluster), expected, token)

        return ensureDeferred(run())


class _Demo(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))  # type: ignore[attr-defined]


class DemoRunTests(TestCase):
    """
    ``banyan-kproxy demo`` end to end.
    """

    timeout = 90

    def test_demo(self) -> Deferred[None]:
        """
        The demo shows an allowed and a forbidden request, and Ctrl-C (SIGINT) stops
        it and its daemon, exiting 0.
        """

        if shutil.which("kubectl") is None:
            raise SkipTest("kubectl is not on PATH")

        async def run() -> None:
            directory = os.path.abspath(self.mktemp())
            env = source_env()
            env["KUBECONFIG"] = os.path.join(directory, "none")  # no current cluster
            env["HOME"] = directory
            demo = _Demo()
            process = reactor.spawnProcess(
                demo, sys.executable,
                [sys.executable, "-m", "banyan_kproxy.cli", "demo", "--dir", directory],
                env=env,
            )
            deadline = reactor.seconds() + 60
            while b"Press Ctrl-C" not in demo.output and not demo.ended.called:
                if reactor.seconds() > deadline:
                    process.signalProcess("KILL")
                    self.fail(demo.output.decode())
                await deferLater(reactor, 0.1, lambda: None)
            text = demo.output.decode()
            self.assertIn("in front of the built-in Kubernetes API stand-in (no kubeconfig", text)
            self.assertIn(
                'Error from server (Forbidden): services is forbidden: User "banyan:myuser@example.com" '
                'cannot list resource "services" in API group "" in the namespace "default"', text)
            self.assertIn("web-1   1/1     Running", text)
            pid = int(text.split("The proxy (pid ")[1].split(")")[0])
            process.signalProcess("INT")
            code = await demo.ended
            self.assertEqual(code, 0, demo.output.decode())
            self.assertIn("Stopped.", demo.output.decode())
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)

        return ensureDeferred(run())
