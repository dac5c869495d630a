"""
Process-level tests of the daemon as operators run it: ``twistd -n banyan-kproxy``
and ``banyan-kproxy check-config``.
"""

from __future__ import annotations

import json
import os
import socket
import sys


import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.stack import LoopbackStack, repository_file, twistd_command


def source_env() -> dict[str, str]:
    """
    The environment that makes child processes run this checkout's code.
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(repository_file("twisted", "plugins") or ""))
    env["PYTHONPATH"] = root
    return env


class Files:
    """
    A directory with a certificate pair and a token for configuration files.
    """

    def __init__(self, case: TestCase) -> None:
        self.dir = os.path.abspath(case.mktemp())
        os.makedirs(self.dir)
        ca = CertificateAuthority.generate()
        self.cert, self.key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(self.dir, "tls")
        self.token = os.path.join(self.dir, "token")
        with open(self.token, "w") as f:
            f.write("t\n")

    def ini(self, listen: str = "127.0.0.1:0", extra: str = "") -> str:
        path = os.path.join(self.dir, "kproxy.ini")
        with open(path, "w") as f:
            f.write(
                f"[proxy]\nlisten = {listen}\ntls_cert_file = {self.cert}\n"
                f"tls_key_file = {self.key}\n{extra}\n"
                "[oidc]\nissuer_url = https://127.0.0.1:1/v2\nclient_id = kubernetes\n\n"
                f"[upstream]\nserver = https://127.0.0.1:1\ntoken_file = {self.token}\n"
            )
        return path


async def twistd(config: str) -> tuple[str, str, int]:
    """
    Run ``twistd -n banyan-kproxy --config FILE`` expecting it to exit by itself.
    """
    twistd, *first = twistd_command()
    out, err, code = await getProcessOutputAndValue(
        twistd,
        (*first, "--nodaemon", "--pidfile=", "banyan-kproxy", "--config", config),
        env=source_env(),
        reactor=reactor,
    )
    return out.decode(), err.decode(), code


class StartupFailureTests(TestCase):
    """
    A daemon that cannot start says why in one line and exits non-zero.
    """

    timeout = 60

    def test_config_error(self) -> Deferred[None]:
        """
        A configuration problem exits with status 2 and names file, section and key,
        on every supported Twisted (22.4 would exit 0 on a UsageError).
        """

        async def run() -> None:
            files = Files(self)
            path = files.ini(extra="colour = blue")
            out, err, code = await twistd(path)
            self.assertEqual(code, 2)
            self.assertEqual(
                err.strip().splitlines(),
                ["banyan-kproxy: configuration error:", f"  {path}: [proxy] colour: unknown key "
                 "(known keys: drain_timeout, health_listen, listen, reuse_port, tls_cert_file, tls_key_file)"],
            )
            self.assertNotIn("Traceback", out + err)

        return ensureDeferred(run())

    def test_bad_certificate(self) -> Deferred[None]:
        """
        A key that does not match the certificate stops the daemon before it listens.
        """

        async def run() -> None:
            files = Files(self)
            other = CertificateAuthority.generate().issue("x", dns_names=["x"])
            with open(files.key, "wb") as f:
                f.write(other.key_pem)
            out, err, code = await twistd(files.ini())
            self.assertEqual(code, 2)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn("does not match the certificate", err)
            self.assertNotIn("Traceback", out + err)

        return ensureDeferred(run())

    def test_port_in_use(self) -> Deferred[None]:
        """
        A port that cannot be bound exits with status 1 and one line naming it.
        """

        async def run() -> None:
            files = Files(self)
            busy = socket.socket()
            self.addCleanup(busy.close)
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            out, err, code = await twistd(files.ini(listen=f"127.0.0.1:{port}"))
            self.assertEqual(code, 1)
            lines = err.strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertTrue(
                lines[0].startswith(f"banyan-kproxy: cannot listen for the proxy on 127.0.0.1:{port}"),
                lines[0],
            )
            self.assertNotIn("Traceback", out + err)

        return ensureDeferred(run())


class CheckConfigTests(TestCase):
    """
    ``banyan-kproxy check-config FILE``.
    """

    timeout = 60

    async def check(self, path: str) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ("-m", "banyan_kproxy.cli", "check-config", path),
            env=source_env(),
            reactor=reactor,
        )
        return out.decode(), err.decode(), code

    def test_ok(self) -> Deferred[None]:
        """
        A valid file prints ``ok`` and exits 0.
        """

        async def run() -> None:
            out, err, code = await self.check(Files(self).ini())
            self.assertEqual((out, err, code), ("ok\n", "", 0))

        return ensureDeferred(run())

    def test_problems(self) -> Deferred[None]:
        """
        An invalid file prints each problem and exits 1.
        """

        async def run() -> None:
            files = Files(self)
            path = files.ini(listen="nowhere", extra="reuse_port = maybe")
            out, err, code = await self.check(path)
            self.assertEqual(out, "")
            self.assertEqual(code, 1)
            self.assertEqual(
                err.splitlines(),
                [
                    f"{path}: [proxy] listen: 'nowhere' is not host:port (use [addr]:port for IPv6)",
                    f"{path}: [proxy] reuse_port: 'maybe' is not true or false",
                ],
            )

        return ensureDeferred(run())


class RunningDaemonTests(TestCase):
    """
    The running daemon seen with curl and its health endpoints.
    """

    timeout = 90

    def setUp(self) -> None:
        self.stack = LoopbackStack(reactor, os.path.abspath(self.mktemp()), issuer_status=503)
        self.addCleanup(lambda: ensureDeferred(self.stack.stop()))

    async def get(self, path: str) -> tuple[int, str]:
        response = await treq.get(self.stack.health_url + path, persistent=False, timeout=5)
        return response.code, await treq.text_content(response)

    def test_ready_follows_issuer(self) -> Deferred[None]:
        """
        /ready answers 503 with the reason while the issuer's keys cannot be loaded,
        and 200 once they are; /live is 200 throughout.
        """

        async def run() -> None:
            await self.stack.start(wait_ready=False)
            self.assertEqual(await self.get("/live"), (200, "ok\n"))
            # Until the first discovery attempt has failed there is no reason yet.
            deadline = reactor.seconds() + 15
            while True:
                code, body = await self.get("/ready")
                self.assertEqual(code, 503)
                self.assertIn("oidc: signing keys not loaded", body)
                if "503" in body or reactor.seconds() > deadline:
                    break
                await deferLater(reactor, 0.1, lambda: None)
            self.assertIn("503", body)
            self.stack.issuer.discovery_status = 200
            await self.stack.wait_ready(20)
            self.assertEqual(await self.get("/ready"), (200, "ok\n"))

        return ensureDeferred(run())

    def test_curl_bad_token_and_metrics(self) -> Deferred[None]:
        """
        curl (offering ALPN h2 and http/1.1) with a bad token gets 401 and the
        Kubernetes Status body; /metrics counts the rejection by reason.
        """

        async def run() -> None:
            self.stack.issuer_status = 200
            await self.stack.start()
            out, err, code = await getProcessOutputAndValue(
                "curl",
                ("-sS", "--cacert", self.stack.ca_file, "-H", "Authorization: Bearer not.a.jwt",
                 "-w", "\n%{http_code} %{http_version}", self.stack.proxy_url + "/api/v1/pods"),
                env=dict(os.environ),
                reactor=reactor,
            )
            self.assertEqual(code, 0, err)
            body, status = out.decode().rsplit("\n", 1)
            self.assertEqual(status, "401 1.1")
            self.assertEqual(
                json.loads(body),
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": "Unauthorized", "reason": "Unauthorized", "code": 401},
            )
            code, metrics = await self.get("/metrics")
            self.assertEqual(code, 200)
            self.assertIn(
                'kproxy_token_verifications_total{outcome="rejected",reason="malformed"} 1', metrics
            )
            self.assertIn('kproxy_requests_total{method="GET",code="401"} 1', metrics)
            self.assertIn("token rejected (malformed)", self.stack.daemon_output)
            self.assertNotIn("not.a.jwt", self.stack.daemon_output)

        return ensureDeferred(run())

    def test_certificate_rotation(self) -> Deferred[None]:
        """
        New certificate files are served to new connections without a restart.
        """

        async def run() -> None:
            self.stack.issuer_status = 200
            await self.stack.start()

            async def served_subject() -> str:
                # s_client reads standard input until it ends: give it /dev/null.
                out, _, _ = await getProcessOutputAndValue(
                    "sh",
                    ("-c", 'exec openssl s_client -connect "$1" -alpn h2,http/1.1 -CAfile "$2" '
                     "</dev/null", "sh", f"127.0.0.1:{self.stack.proxy_port}", self.stack.ca_file),
                    env=dict(os.environ), reactor=reactor,
                )
                text = out.decode()
                self.assertIn("ALPN protocol: http/1.1", text)
                return next(line for line in text.splitlines() if line.startswith("subject="))

            self.assertIn("127.0.0.1", await served_subject())
            rotated = self.stack.ca.issue("rotated.example", ip_addresses=["127.0.0.1"])
            rotated.write(self.stack.directory, "proxy")
            deadline = reactor.seconds() + 20
            while "rotated.example" not in await served_subject():
                self.assertLess(reactor.seconds(), deadline, "the new certificate was not served")
                await deferLater(reactor, 0.5, lambda: None)
            self.assertIn("Reloaded TLS certificate CN=rotated.example", self.stack.daemon_output)

        return ensureDeferred(run())

    def test_upstream_down(self) -> Deferred[None]:
        """
        With the apiserver gone, kubectl gets the proxy's 503 Status message.
        """

        from .test_kubectl import kubectl_binary

        kubectl = kubectl_binary(None)

        async def run() -> None:
            from banyan_kproxy.testing.stack import READER_ROLE

            self.stack.issuer_status = 200
            await self.stack.start()
            kubeconfig = self.stack.write_kubeconfig(
                "kubeconfig", {"reader": self.stack.token("myuser@example.com", [READER_ROLE])}
            )
            listening, self.stack.standin_listening = self.stack.standin_listening, None
            await listening.stop()
            home = os.path.abspath(self.mktemp())
            os.makedirs(home)
            out, err, code = await getProcessOutputAndValue(
                kubectl, ("get", "pods", "--request-timeout=20s"),
                env={"HOME": home, "KUBECONFIG": kubeconfig, "PATH": os.environ["PATH"]},
                reactor=reactor,
            )
            self.assertEqual(code, 1)
            self.assertEqual(
                (out + err).decode().strip().splitlines()[-1],
                "Error from server (ServiceUnavailable): the server is currently unable to handle the request",
            )
            self.assertIn("upstream unavailable: Connection was refused", self.stack.daemon_output)

        return ensureDeferred(run())


