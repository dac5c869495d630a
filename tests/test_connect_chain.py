"""
Integration tests of the device side with real peers: the real ``kubectl`` with the
kubeconfig ``banyan-kproxy kubeconfig`` wrote, its exec credential plugin against the
test issuer, the connect service (``twistd -n banyan-kproxy`` with a ``[connect]``
section), a real Debian ``tinyproxy`` as the plain next hop, then the cluster-side
proxy daemon and the Kubernetes API stand-in (`LoopbackStack`).

tinyproxy comes from ``make check-tools``; these tests skip only when it is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from banyan_kproxy.testing.stack import ADMIN_ROLE, CLIENT_ID, LoopbackStack, twistd_command

from .test_kubectl import StackTestCase, kubectl_binary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot
    report the port they bound, and for the fixed port proxy-url needs).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Program(ProcessProtocol):
    """
    A process started by a test: output collected, stopped by its PID at cleanup.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.out = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    async def wait_for(self, pattern: bytes, timeout: float = 30.0) -> re.Match[bytes]:
        """
        The first match of ``pattern`` in the output, polled every 50 ms for at most ``timeout``.
        """
        compiled = re.compile(pattern)
        deadline = reactor.seconds() + timeout
        while True:
            match = compiled.search(self.out)
            if match:
                return match
            if self.ended.called or reactor.seconds() > deadline:
                raise AssertionError(f"{self.name} never printed {pattern!r}:\n{self.text}")
            await deferLater(reactor, 0.05, lambda: None)

    def stop(self, timeout: float = 10.0) -> Deferred[None]:
        """
        SIGTERM, then SIGKILL after ``timeout``; fires once it has exited.
        """

        async def stop() -> None:
            if self.ended.called:
                return
            self.transport.signalProcess("TERM")
            killer = reactor.callLater(timeout, self._kill)
            await self.ended
            if killer.active():
                killer.cancel()

        return ensureDeferred(stop())

    def _kill(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")


def start(name: str, argv: list[str], env: dict[str, str], path: str | None = None) -> Program:
    """
    Start ``argv`` with exactly ``env``.
    """
    program = Program(name)
    reactor.spawnProcess(program, argv[0], argv, env=env, path=path)
    return program


class _ChainTests(StackTestCase):
    """
    kubectl -> connect service -> tinyproxy -> proxy daemon -> stand-in, with the
    kubectl ``version`` a subclass names.
    """

    version = ""
    timeout = 180
    PAGE = b"<h1>behind web-1's port 80</h1>\n"

    def make_stack(self) -> LoopbackStack:
        self.tinyproxy = shutil.which("tinyproxy")
        if self.tinyproxy is None:
            raise SkipTest("tinyproxy is not installed (make check-tools installs it)")
        # The base class names no version and so skips, as in test_kubectl_streams.
        self.binary = kubectl_binary(self.version)
        root = Resource()
        root.putChild(b"", Data(self.PAGE, "text/html"))
        web = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        self.web_port = web.getHost().port
        return LoopbackStack(reactor, os.path.abspath(self.mktemp()))

    def setUp(self) -> Deferred[None]:
        started = super().setUp()

        async def device_side(_: object) -> None:
            try:
                await self.start_device_side()
            except BaseException:
                # tearDown does not run after a failed setUp.
                await self.stack.stop()
                raise

        return started.addCallback(lambda _: ensureDeferred(device_side(_)))

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT}

    def save_logs(self) -> None:
        """
        Keep what tinyproxy and the connect service printed beside the daemon's log.
        """
        for name, program in (("tinyproxy.log", getattr(self, "next_hop", None)),
                              ("connect.log", getattr(self, "connect", None))):
            if program is not None:
                with open(os.path.join(self.stack.directory, name), "wb") as f:
                    f.write(program.out)

    async def start_device_side(self) -> None:
        self.addCleanup(self.save_logs)
        self.stack.standin.add_pod("web-1", ports={80: self.web_port})
        directory = self.stack.directory
        proxy_port = self.stack.proxy_port
        # A port tinyproxy may not CONNECT to: its refusal shows how next-hop errors look.
        self.refused_port = free_port()

        self.tinyproxy_port = free_port()
        conf = os.path.join(directory, "tinyproxy.conf")
        with open(conf, "w") as f:
            f.write(
                f"Port {self.tinyproxy_port}\nListen 127.0.0.1\nTimeout 120\nMaxClients 50\n"
                f"LogLevel Info\nAllow 127.0.0.1\nConnectPort {proxy_port}\nDisableViaHeader Yes\n"
            )
        self.next_hop = start("tinyproxy", [self.tinyproxy, "-d", "-c", conf], self.env())
        self.addCleanup(self.next_hop.stop)
        await self.next_hop.wait_for(rb"Accepting connections")

        with open(os.path.join(directory, "refresh-token"), "w") as f:
            f.write(self.stack.refresh_token("admin@example.com", [ADMIN_ROLE]) + "\n")
        self.connect_port = free_port()
        self.kubeconfig = os.path.join(self.home, ".kube", "banyan")
        self.ini = os.path.join(directory, "connect.ini")
        with open(self.ini, "w") as f:
            f.write(
                "[connect]\n"
                f"listen = 127.0.0.1:{self.connect_port}\n"
                f"next_hop = http://127.0.0.1:{self.tinyproxy_port}\n"
                f"allow = localhost:{proxy_port}, localhost:{self.refused_port}\n"
                "connect_timeout = 20s\n\n"
                "[oidc_client]\n"
                f"issuer_url = {self.stack.issuer.issuer_url}\n"
                f"client_id = {CLIENT_ID}\n"
                "refresh_token_file = refresh-token\n"
                f"ca_file = {self.stack.ca_file}\n\n"
                "[kubeconfig]\n"
                f"path = {self.kubeconfig}\n"
                "cluster_name = testcluster\n"
                f"server = https://localhost:{proxy_port}\n"
                f"ca_file = {self.stack.ca_file}\n"
            )
        self.connect = start(
            "the connect service",
            [*twistd_command(), "--nodaemon", "--pidfile=", "banyan-kproxy", "--config", self.ini],
            self.env(), path=directory,
        )
        self.addCleanup(self.connect.stop)
        await self.connect.wait_for(rb"the connect service on \S+ listening on 127\.0\.0\.1:(\d+)")

        writer = start("banyan-kproxy kubeconfig",
                       [sys.executable, "-m", "banyan_kproxy.cli", "kubeconfig", "--config", self.ini],
                       self.env())
        code = await writer.ended.addTimeout(60, reactor)
        self.assertEqual(code, 0, writer.text)

    def kubectl_start(self, *args: str) -> Program:
        env = dict(self.env(), KUBECONFIG=self.kubeconfig)
        program = start("kubectl", [self.binary, "--request-timeout=30s", *args], env)
        self.addCleanup(program.stop)
        return program

    async def run_kubectl(self, *args: str) -> tuple[str, int | None]:
        program = self.kubectl_start(*args)
        code = await program.ended.addTimeout(90, reactor)
        return program.text, code

    async def _get_exec_port_forward(self) -> None:
        output, code = await self.run_kubectl("--context", "testcluster", "get", "pods")
        self.assertEqual(code, 0, output)
        self.assertTrue(output.startswith("NAME"), output)
        self.assertIn("web-1", output)
        self.assertEqual(self.stack.issuer.token_grants, 1)

        output, code = await self.run_kubectl("exec", "web-1", "--", "echo", "hi")
        self.assertEqual((output, code), ("hi\n", 0))

        forward = self.kubectl_start("port-forward", "pod/web-1", ":80")
        match = await forward.wait_for(rb"Forwarding from 127\.0\.0\.1:(\d+) -> 80", timeout=60)
        agent = Agent(reactor)
        for _ in range(2):
            response = await agent.request(
                b"GET", b"http://127.0.0.1:%s/" % match.group(1)).addTimeout(30, reactor)
            self.assertEqual(response.code, 200)
            self.assertEqual(await readBody(response), self.PAGE)
        await forward.stop()

        # One refresh in all: the later kubectl runs were answered from the plugin's cache.
        self.assertEqual(self.stack.issuer.token_grants, 1)
        # The stand-in saw the user of the refresh token, impersonated by the proxy.
        self.assertEqual({r.user for r in self.stack.standin.requests if "/pods" in r.path},
                         {"banyan:admin@example.com"})
        # Every request went through the connect service and tinyproxy.
        target = f"localhost:{self.stack.proxy_port}"
        await self.connect.wait_for(re.escape(f"CONNECT {target} from 127.0.0.1").encode() + rb".*tunnel closed")
        self.assertIn(f"CONNECT {target} from 127.0.0.1", self.connect.text)
        self.assertIn('Established connection to host "localhost" using file descriptor', self.next_hop.text)

    def test_get_exec_port_forward(self) -> None:
        """
        ``get pods``, ``exec web-1 -- echo hi`` and ``port-forward`` work through the
        whole chain with the written kubeconfig, with a single token refresh.
        """
        return ensureDeferred(self._get_exec_port_forward())


class ChainTestsKubectl133(_ChainTests):
    """
    The chain with kubectl 1.33 (WebSocket exec and port-forward).
    """

    version = "1.33"

    def test_next_hop_refusal(self) -> None:
        """
        When tinyproxy refuses the CONNECT, kubectl gets a Bad Gateway without hanging,
        and the connect service logs the hop and tinyproxy's status line.
        """

        async def go() -> None:
            output, code = await self.run_kubectl(
                "--server", f"https://localhost:{self.refused_port}", "get", "pods")
            self.assertEqual(code, 1, output)
            self.assertIn("Bad Gateway", output)
            line = await self.connect.wait_for(rb"refused with 502: .*")
            self.assertEqual(
                line.group(0).decode(),
                f"refused with 502: next hop http://127.0.0.1:{self.tinyproxy_port} refused CONNECT "
                f"localhost:{self.refused_port}: HTTP/1.1 403 Access violation",
            )

        return ensureDeferred(go())


class ChainTestsKubectl129(_ChainTests):
    """
    The chain with kubectl 1.29 (SPDY exec and port-forward).
    """

    version = "1.29"


__all__ = ["ChainTestsKubectl129", "ChainTestsKubectl133", "Program", "free_port", "start"]


del _ChainTests  # the scenarios run only with a kubectl version
