"""
Integration tests: ``kubectl exec``, ``cp``, ``attach`` and ``port-forward`` through
the real daemon to the Kubernetes API stand-in, with the WebSocket kubectl (1.33) and
the SPDY one (1.29).
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from banyan_kproxy.testing.stack import LoopbackStack

from .test_kubeapi_streams import KubectlProcess
from .test_kubectl import StackTestCase, kubectl_binary


class _StreamTests(StackTestCase):
    """
    The scenarios, run with the kubectl ``version`` a subclass names.
    """

    version = ""
    PAGE = b"<h1>behind the pod's port 80</h1>\n"

    def make_stack(self) -> LoopbackStack:
        root = Resource()
        root.putChild(b"", Data(self.PAGE, "text/html"))
        web = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        self.web_port = web.getHost().port
        return LoopbackStack(reactor, os.path.abspath(self.mktemp()))

    def setUp(self) -> Deferred[None]:
        self.binary = kubectl_binary(self.version)
        started = super().setUp()

        def populate(_: object) -> None:
            self.data = os.urandom(1 << 20)
            self.stack.standin.add_pod(
                "web-1", ports={80: self.web_port}, attach_banner="attached to web-1\n",
                files={"/srv/data.bin": self.data},
            )
            self.kubeconfig = self.users()

        return started.addCallback(populate)

    def spawn(self, *args: str, stdin: bytes | None = None, context: str = "admin") -> KubectlProcess:
        protocol = KubectlProcess(stdin)
        env = {"HOME": self.home, "KUBECONFIG": self.kubeconfig, "PATH": os.environ.get("PATH", "")}
        process = reactor.spawnProcess(
            protocol, self.binary,
            [self.binary, "--context", context, "--request-timeout=30s", *args], env=env,
        )

        def stop() -> Deferred[int] | None:
            if protocol.ended.called:
                return None
            process.signalProcess("KILL")
            return protocol.ended

        self.addCleanup(stop)
        return protocol

    async def run_kubectl(self, *args: str, stdin: bytes | None = None,
                          context: str = "admin") -> tuple[bytes, bytes, int]:
        protocol = self.spawn(*args, stdin=stdin, context=context)
        code = await protocol.ended.addTimeout(90, reactor)
        return bytes(protocol.out), bytes(protocol.err), code

    def test_exec_binary_round_trip(self) -> Deferred[None]:
        """
        ``kubectl exec -i POD -- cat`` with 4 MiB of random bytes on stdin gets the
        same bytes back through the proxy, nothing on stderr, exit 0; the tunnel is
        counted and its closing logged with the user and the byte counts.
        """

        async def run() -> None:
            payload = os.urandom(4 * 1024 * 1024)
            out, err, code = await self.run_kubectl("exec", "-i", "web-1", "--", "cat", stdin=payload)
            self.assertEqual((code, err), (0, b""))
            self.assertEqual(len(out), len(payload))
            self.assertTrue(out == payload, "the bytes differ")
            [session] = self.stack.standin.sessions
            self.assertEqual(session.user, "banyan:admin@example.com")
            await self.wait_for(lambda: "Tunnel closed" in self.stack.daemon_output, "the tunnel log line")
            line = next(x for x in self.stack.daemon_output.splitlines() if "Tunnel closed" in x)
            self.assertIn("banyan:admin@example.com", line)
            self.assertIn("/api/v1/namespaces/default/pods/web-1/exec", line)
            sent = int(re.search(r"(\d+) bytes in", line).group(1))
            self.assertGreater(sent, len(payload))

        return ensureDeferred(run())

    def test_exec_streams_and_exit_code(self) -> Deferred[None]:
        """
        stdout and stderr come back apart, and ``exit 3`` makes kubectl exit 3.
        """

        async def run() -> None:
            out, err, code = await self.run_kubectl(
                "exec", "web-1", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
            self.assertEqual((out, err, code), (
                b"to-stdout\n", b"to-stderr\ncommand terminated with exit code 3\n", 3))

        return ensureDeferred(run())

    def test_cp_both_ways(self) -> Deferred[None]:
        """
        ``kubectl cp`` copies a 1 MiB binary file into the pod and the pod's file out,
        byte for byte.
        """

        async def run() -> None:
            local = os.path.join(self.home, "upload.bin")
            upload = os.urandom(1 << 20)
            with open(local, "wb") as f:
                f.write(upload)
            out, err, code = await self.run_kubectl("cp", local, "web-1:/tmp/upload.bin")
            self.assertEqual((code, err), (0, b""), out)
            self.assertTrue(self.stack.standin.pod_filesystem("web-1").read("/tmp/upload.bin") == upload)
            download = os.path.join(self.home, "download.bin")
            out, err, code = await self.run_kubectl("cp", "web-1:/srv/data.bin", download)
            self.assertEqual(code, 0, err)
            with open(download, "rb") as f:
                self.assertTrue(f.read() == self.data, "the downloaded bytes differ")

        return ensureDeferred(run())

    def test_attach(self) -> Deferred[None]:
        """
        ``kubectl attach -i`` shows the pod's output and what it echoes.
        """

        async def run() -> None:
            out, err, code = await self.run_kubectl("attach", "-i", "web-1", stdin=b"hello, pod\n")
            self.assertEqual((out, code), (b"attached to web-1\nhello, pod\n", 0), err)

        return ensureDeferred(run())

    def test_port_forward(self) -> Deferred[None]:
        """
        ``kubectl port-forward pod/web-1 :80`` through the proxy: two HTTP GETs through
        the forwarded local port reach the web server behind the pod's port 80.
        """

        async def run() -> None:
            protocol = self.spawn("port-forward", "pod/web-1", ":80")
            await self.wait_for(lambda: re.search(rb"Forwarding from 127\.0\.0\.1:(\d+) -> 80",
                                                  bytes(protocol.out)), "the forwarded port")
            port = int(re.search(rb"Forwarding from 127\.0\.0\.1:(\d+) -> 80", bytes(protocol.out)).group(1))
            agent = Agent(reactor)
            for _ in range(2):
                response = await agent.request(b"GET", f"http://127.0.0.1:{port}/".encode()).addTimeout(
                    30, reactor)
                self.assertEqual(response.code, 200)
                self.assertEqual(await readBody(response), self.PAGE)
            protocol.transport.signalProcess("TERM")
            await protocol.ended.addTimeout(30, reactor)

        return ensureDeferred(run())

    def test_forbidden(self) -> Deferred[None]:
        """
        The reader, whose RBAC lacks ``create`` on ``pods/exec``, gets the apiserver's
        Forbidden message promptly, not a hang, and nothing is upgraded.
        """

        async def run() -> None:
            started = reactor.seconds()
            out, err, code = await self.run_kubectl(
                "exec", "-i", "web-1", "--", "cat", stdin=b"x", context="reader")
            self.assertEqual((out, code), (b"", 1))
            self.assertEqual(err.decode().splitlines()[-1], (
                'Error from server (Forbidden): pods "web-1" is forbidden: User '
                '"banyan:myuser@example.com" cannot create resource "pods/exec" in API group "" '
                'in the namespace "default"'))
            self.assertLess(reactor.seconds() - started, 15)
            self.assertEqual(self.stack.standin.sessions, [])

        return ensureDeferred(run())

    async def wait_for(self, condition: Any, what: str, timeout: float = 30.0) -> None:
        from twisted.internet.task import deferLater

        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.05, lambda: None)


class Kubectl133StreamTests(_StreamTests):
    """
    kubectl 1.33: WebSocket ``v5.channel.k8s.io``; port-forward as WebSocket-tunnelled SPDY.
    """

    version = "1.33"


class Kubectl129StreamTests(_StreamTests):
    """
    kubectl 1.29: SPDY/3.1 for exec, cp, attach and port-forward.
    """

    version = "1.29"


del _StreamTests
