"""
Tests for the gateway role (`banyan_kproxy.gateway`): the policy and audit events in
memory, then the real listener against curl, openssl s_client and kubectl on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from banyan_kproxy.audit.event import encode_event
from banyan_kproxy.audit.policy import DEFAULT_POLICY, parse_policy
from banyan_kproxy.config import Address, GatewayService, load_config
from banyan_kproxy.connectserver import ClientIdentity, ConnectRefused, ConnectRequest, TunnelRecord
from banyan_kproxy.gateway.audit import TunnelAuditor
from banyan_kproxy.gateway.policy import GatewayPolicy, client_allowed, dial_backend
from banyan_kproxy.gateway.service import add_gateway_role, gateway_services
from banyan_kproxy.health import Metrics
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.connecthop import ConnectThrough, serve_hop
from banyan_kproxy.testing.loopback import serve
from banyan_kproxy.testing.stack import twistd_command
from banyan_kproxy.tls import ServerTLS, TLSConfigError, https_policy
from banyan_kproxy.tunnel import SpliceEnd
from tests.test_kubectl import FORBIDDEN_SERVICES, StackTestCase, kubectl_binary
from tests.test_tls import LogCapture, run

LOOPBACK = "127.0.0.1"
#: This checkout, put first on the daemon's PYTHONPATH.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALICE = ClientIdentity("laptop-17", ("laptop-17.devices.corp.example.com", "me@example.com"), "ab" * 32)
PEER = IPv4Address("TCP", "10.1.2.3", 40000)


def request(host: str, port: int, client: ClientIdentity | None = ALICE) -> ConnectRequest:
    """
    A parsed CONNECT for ``host:port`` from ``client``.
    """
    return ConnectRequest(host, port, PEER, Headers(), client)


class FakeDial:
    """
    Records the backends dialled and answers with a given result.
    """

    def __init__(self, result: Any = None) -> None:
        self.dialled: list[Address] = []
        self.result = result

    def __call__(self, backend: Address) -> Deferred[SpliceEnd]:
        self.dialled.append(backend)
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(self.result)


SERVICES = (
    GatewayService("mykube.corp.example.com", 8443, Address("10.0.0.5", 443)),
    GatewayService("admin.corp.example.com", 443, Address("10.0.0.6", 443), ("ops-*", "*@corp.example.com")),
)


class PolicyTests(SynchronousTestCase):
    """
    Which CONNECT the gateway accepts, and where it dials.
    """

    def refusal(self, d: Deferred[Any]) -> tuple[int, str]:
        e = self.failureResultOf(d, ConnectRefused).value
        return e.code, e.reason

    def test_registered(self) -> None:
        """
        A registered domain is dialled at its backend address, never by its own name.
        """
        end = SpliceEnd()
        dial = FakeDial(end)
        policy = GatewayPolicy(SERVICES, dial)
        self.assertIs(self.successResultOf(policy.open(request("mykube.corp.example.com", 8443))), end)
        self.assertEqual(dial.dialled, [Address("10.0.0.5", 443)])

    def test_unregistered(self) -> None:
        """
        Another domain, or the right domain on another port, gets 403 and nothing is dialled.
        """
        dial = FakeDial(SpliceEnd())
        policy = GatewayPolicy(SERVICES, dial)
        self.assertEqual(
            self.refusal(policy.open(request("evil.example.com", 443))),
            (403, "evil.example.com:443 is not a registered service"),
        )
        self.assertEqual(
            self.refusal(policy.open(request("mykube.corp.example.com", 443))),
            (403, "mykube.corp.example.com:443 is not a registered service"),
        )
        self.assertEqual(dial.dialled, [])

    def test_client_patterns(self) -> None:
        """
        A service with client patterns admits a client whose CN or a DNS / email SAN
        matches (ignoring case) and refuses others with 403.
        """
        policy = GatewayPolicy(SERVICES, FakeDial(SpliceEnd()))
        self.assertEqual(
            self.refusal(policy.open(request("admin.corp.example.com", 443))),
            (403, "laptop-17 may not use admin.corp.example.com:443"),
        )
        for client in (
            ClientIdentity("OPS-Anna", ()),
            ClientIdentity(None, ("anna@Corp.Example.com",)),
            ClientIdentity("laptop-9", ("ops-laptop-9.devices.example.com",)),
        ):
            self.successResultOf(policy.open(request("admin.corp.example.com", 443, client)))
        self.assertFalse(client_allowed(("ops-*",), ClientIdentity("laptop-ops-1", ())))
        self.assertTrue(client_allowed((), ClientIdentity(None, ())))

    def test_no_certificate(self) -> None:
        """
        A request without a client identity is refused (the listener requires one anyway).
        """
        policy = GatewayPolicy(SERVICES, FakeDial(SpliceEnd()))
        self.assertEqual(
            self.refusal(policy.open(request("mykube.corp.example.com", 8443, None))),
            (403, "a client certificate is required"),
        )

    def test_backend_failures(self) -> None:
        """
        A refusing backend gives 502, a silent one 504, an unknown name 502; the answer
        names the service, not the backend's address.
        """
        cases = [
            (error.ConnectionRefusedError(), 502, "the backend of mykube.corp.example.com:8443 refused the connection"),
            (error.TimeoutError(), 504, "the backend of mykube.corp.example.com:8443 did not answer within 3s"),
            (error.DNSLookupError(), 502, "the backend name of mykube.corp.example.com:8443 does not resolve"),
        ]
        for exception, code, reason in cases:
            policy = GatewayPolicy(SERVICES, FakeDial(exception), connect_timeout=3)
            self.assertEqual(self.refusal(policy.open(request("mykube.corp.example.com", 8443))), (code, reason))

    def test_dial(self) -> None:
        """
        Backends given as IPv4 or IPv6 addresses are dialled with the connect timeout.
        """
        clock = MemoryReactorClock()
        dial_backend(clock, Address("10.0.0.5", 443), 7)
        dial_backend(clock, Address("fd00::5", 8443), 7)
        self.assertEqual([(c[0], c[1], c[3]) for c in clock.tcpClients], [("10.0.0.5", 443, 7), ("fd00::5", 8443, 7)])


def record(**kwargs: Any) -> TunnelRecord:
    """
    A tunnel record for ``mykube.corp.example.com:8443`` from laptop-17.
    """
    values: dict[str, Any] = {
        "tunnel_id": "0123456789abcdef0123456789abcdef", "peer": PEER, "client": ALICE,
        "host": "mykube.corp.example.com", "port": 8443, "code": 200, "outcome": "open",
        "started": 1700000000.0, "established": 1700000000.25, "user_agent": "kubectl/v1.33.0",
    }
    values.update(kwargs)
    return TunnelRecord(**values)


class AuditTests(SynchronousTestCase):
    """
    Tunnels as audit.k8s.io/v1 events.
    """

    def auditor(self, policy: Any = DEFAULT_POLICY) -> tuple[TunnelAuditor, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        return TunnelAuditor(policy, events.append), events

    def test_tunnel(self) -> None:
        """
        With the default policy (Metadata, RequestReceived omitted) a tunnel gives
        ResponseStarted when it opens and ResponseComplete with bytes, duration and
        outcome when it ends, sharing one audit ID.
        """
        auditor, events = self.auditor()
        auditor.opened(record())
        auditor.closed(record(outcome="closed", bytes_up=1234, bytes_down=56789, ended=1700000061.5))
        user = {
            "username": "laptop-17",
            "extra": {
                "authentication.kubernetes.io/credential-id": ["X509SHA256=" + "ab" * 32],
                "gateway.banyan-kproxy/subject-alt-names": ["laptop-17.devices.corp.example.com", "me@example.com"],
            },
        }
        common = {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": "01234567-89ab-cdef-0123-456789abcdef",
            "requestURI": "mykube.corp.example.com:8443",
            "verb": "connect",
            "user": user,
            "sourceIPs": ["10.1.2.3"],
            "userAgent": "kubectl/v1.33.0",
            "responseStatus": {"metadata": {}, "code": 200},
            "requestReceivedTimestamp": "2023-11-14T22:13:20.000000Z",
        }
        self.assertEqual(
            events,
            [
                dict(common, stage="ResponseStarted", stageTimestamp="2023-11-14T22:13:20.250000Z"),
                dict(
                    common,
                    stage="ResponseComplete",
                    stageTimestamp="2023-11-14T22:14:21.500000Z",
                    annotations={
                        "gateway.banyan-kproxy/outcome": "closed",
                        "gateway.banyan-kproxy/bytes-up": "1234",
                        "gateway.banyan-kproxy/bytes-down": "56789",
                        "gateway.banyan-kproxy/duration": "61.500s",
                    },
                ),
            ],
        )
        self.assertEqual(list(events[0])[:6], ["kind", "apiVersion", "level", "auditID", "stage", "requestURI"])
        json.loads(encode_event(events[1], 100 * 1024))

    def test_refused(self) -> None:
        """
        A refused CONNECT gives one ResponseComplete with its status and reason.
        """
        auditor, events = self.auditor()
        auditor.closed(record(code=403, outcome="forbidden", reason="laptop-17 may not use x", established=None,
                              ended=1700000000.001, host="admin.corp.example.com", port=443))
        [event] = events
        self.assertEqual(event["stage"], "ResponseComplete")
        self.assertEqual(event["requestURI"], "admin.corp.example.com:443")
        self.assertEqual(
            event["responseStatus"],
            {"metadata": {}, "status": "Failure", "message": "laptop-17 may not use x", "code": 403},
        )

    def test_policy_decides(self) -> None:
        """
        The audit policy chooses by verb and user (kube-apiserver's validation keeps
        nonResourceURLs to paths, so ``"*"`` is the only one that matches a tunnel):
        level None records nothing, and stages that are not omitted (RequestReceived)
        are emitted.
        """
        policy = parse_policy(
            b"""
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: None
    users: [quiet-robot]
  - level: Metadata
    verbs: [connect]
    nonResourceURLs: ["*"]
""",
            "policy.yaml",
        )
        auditor, events = self.auditor(policy)
        quiet = ClientIdentity("quiet-robot", ())
        auditor.opened(record(client=quiet))
        auditor.closed(record(client=quiet, outcome="closed", ended=1700000001.0))
        self.assertEqual(events, [])
        auditor.opened(record())
        auditor.closed(record(outcome="idle_timeout", ended=1700003600.0))
        self.assertEqual(
            [e["stage"] for e in events], ["RequestReceived", "ResponseStarted", "ResponseComplete"]
        )
        self.assertEqual(events[0]["stageTimestamp"], events[0]["requestReceivedTimestamp"])
        self.assertNotIn("responseStatus", events[0])
        auditor, events = self.auditor(parse_policy(
            b"apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n  - level: Metadata\n    verbs: [get]\n",
            "policy.yaml",
        ))
        auditor.closed(record(code=403, outcome="forbidden", reason="no"))
        self.assertEqual(events, [])

    def test_anonymous_and_cancelled(self) -> None:
        """
        Without a certificate the user is system:anonymous; a client that left before
        the answer is recorded with code 499.
        """
        auditor, events = self.auditor()
        auditor.closed(record(client=None, code=0, outcome="cancelled", reason="the client went away"))
        [event] = events
        self.assertEqual(event["user"], {"username": "system:anonymous", "groups": ["system:unauthenticated"]})
        self.assertEqual(event["responseStatus"]["code"], 499)


class Files:
    """
    A directory with a server CA, a device CA, and certificates from both.
    """

    def __init__(self, case: TestCase) -> None:
        self.directory = os.path.abspath(case.mktemp())
        os.makedirs(self.directory)
        self.server_ca = CertificateAuthority.generate("server CA")
        self.ca_file = self.server_ca.write_cert(self.directory, "ca")
        self.device_ca = CertificateAuthority.generate("device CA")
        self.device_ca_file = self.device_ca.write_cert(self.directory, "device-ca")
        self.alice = self.device_ca.issue(
            "laptop-17", dns_names=["laptop-17.devices.corp.example.com"],
            email_addresses=["me@example.com"], client=True,
        ).write(self.directory, "alice")
        self.mallory = CertificateAuthority.generate("other CA").issue("laptop-17", client=True).write(
            self.directory, "mallory"
        )
        self.gateway = self.server_ca.issue(
            "gateway.corp.example.com", dns_names=["gateway.corp.example.com", "localhost"],
            ip_addresses=[LOOPBACK],
        ).write(self.directory, "gateway")

    def path(self, name: str) -> str:
        """
        A file in the directory.
        """
        return os.path.join(self.directory, name)

    def write(self, name: str, text: str) -> str:
        """
        Write a text file into the directory; its path.
        """
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def gateway_ini(self, services: str, extra: str = "", **keys: str) -> str:
        """
        A gateway configuration file with these services, more [gateway] keys and
        ``extra`` sections; its path.
        """
        lines = [
            "[gateway]",
            "listen = 127.0.0.1:0",
            f"tls_cert_file = {self.gateway[0]}",
            f"tls_key_file = {self.gateway[1]}",
            f"client_ca_file = {self.device_ca_file}",
            "services = " + services,
            *(f"{k} = {v}" for k, v in keys.items()),
        ]
        return self.write("gateway.ini", "\n".join(lines) + "\n" + extra)


class ServiceTests(SynchronousTestCase):
    """
    The role's services, built from configuration.
    """

    def test_names(self) -> None:
        """
        The gateway adds its listener, certificate reloader and (with health_listen)
        health listener; with [audit], the audit service comes first.
        """
        files = Files(self)
        config = load_config(files.gateway_ini("a.example.com:443=10.0.0.1:443", health_listen="127.0.0.1:0"))
        names = [s.name for s in gateway_services(config, MemoryReactorClock(), Metrics())]
        self.assertEqual(names, ["gateway-certificates", "gateway", "gateway-health"])
        config = load_config(files.gateway_ini(
            "a.example.com:443=10.0.0.1:443",
            f"[audit]\nlog_file = {files.path('audit.log')}\nspool_dir = {files.path('spool')}\n",
        ))
        names = [s.name for s in gateway_services(config, MemoryReactorClock(), Metrics())]
        self.assertEqual(names, ["audit", "gateway-certificates", "gateway"])

    def test_shares_audit(self) -> None:
        """
        When another role already added the audit service, the gateway feeds its spool
        instead of making a second pipeline.
        """
        files = Files(self)
        config = load_config(files.gateway_ini(
            "a.example.com:443=10.0.0.1:443",
            f"[audit]\nlog_file = {files.path('audit.log')}\nspool_dir = {files.path('spool')}\n",
        ))
        accepted: list[dict[str, Any]] = []

        class Spool:
            accept = accepted.append

        waits_for: list[Any] = []
        existing = Service()
        existing.setName("audit")
        existing.spool = Spool()  # type: ignore[attr-defined]
        existing.stop_after = waits_for.append  # type: ignore[attr-defined]
        parent = MultiService()
        existing.setServiceParent(parent)
        add_gateway_role(parent, config, MemoryReactorClock(), Metrics())
        self.assertEqual([s.name for s in parent], ["audit", "gateway-certificates", "gateway"])
        # The shared audit service stops only after the gateway's drain.
        self.assertEqual(waits_for, [parent.getServiceNamed("gateway")])

    def test_tap(self) -> None:
        """
        ``twistd banyan-kproxy --config gateway.ini`` builds the gateway's services.
        """
        from banyan_kproxy import tap

        files = Files(self)
        options = tap.Options()
        options.parseOptions(["--config", files.gateway_ini("a.example.com:443=10.0.0.1:443")])
        service = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual([s.name for s in service], ["gateway-certificates", "gateway", "reload"])

    def test_reuse_port(self) -> None:
        """
        With reuse_port the listener's socket is made with SO_REUSEPORT and adopted by
        the reactor, so several gateway processes can share the port.
        """
        files = Files(self)
        config = load_config(files.gateway_ini("a.example.com:443=10.0.0.1:443", reuse_port="true"))
        clock = MemoryReactorClock()
        [listener] = [s for s in gateway_services(config, clock, Metrics()) if s.name == "gateway"]
        listener.privilegedStartService()
        self.assertEqual(len(clock.adoptedPorts), 1)
        self.assertEqual(clock.tcpServers, [])
        config = load_config(files.gateway_ini("a.example.com:443=10.0.0.1:443"))
        [listener] = [s for s in gateway_services(config, clock, Metrics()) if s.name == "gateway"]
        listener.privilegedStartService()
        self.assertEqual([(p[0], p[3]) for p in clock.tcpServers], [(0, "127.0.0.1")])

    def test_bad_certificate(self) -> None:
        """
        A client CA file that is not PEM stops the role from being built, naming the file.
        """
        files = Files(self)
        config = load_config(files.gateway_ini("a.example.com:443=10.0.0.1:443"))
        with open(files.device_ca_file, "w") as f:
            f.write("not a certificate\n")
        e = self.assertRaises(TLSConfigError, gateway_services, config, MemoryReactorClock(), Metrics())
        self.assertIn(files.device_ca_file, str(e))

    def test_sample_file(self) -> None:
        """
        etc/banyan-kproxy/gateway.ini is a valid configuration once its files exist.
        """
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(here, "etc", "banyan-kproxy", "gateway.ini"), encoding="utf-8") as f:
            text = f.read()
        files = Files(self)
        config = load_config(files.write("sample.ini", text.replace("/etc/banyan-kproxy/", files.directory + "/")))
        assert config.gateway is not None
        self.assertEqual(
            [(s.domain, s.port, str(s.backend), s.clients) for s in config.gateway.services],
            [
                ("mykube.corp.example.com", 8443, "10.0.0.5:443", ()),
                ("staging-kube.corp.example.com", 8443, "kube-oidc-proxy.staging.internal:443",
                 ("*@corp.example.com", "ops-*")),
            ],
        )


class _Hello(Resource):
    """
    The backend application: answers with the host it was asked for.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render_GET(self, request: Any) -> bytes:
        self.requests += 1
        return b"hello from " + (request.getHeader(b"host") or b"?") + b"\n"


async def until(condition: Any, what: str, timeout: float = 10.0) -> None:
    """
    Wait (in real time, bounded) until ``condition()`` holds.
    """
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class _Feed(ProcessProtocol):
    """
    Writes ``data`` to the child's stdin, closes it, gathers the output and exit code.
    """

    def __init__(self, data: bytes, done: Deferred[tuple[bytes, int]]) -> None:
        self.data = data
        self.done = done
        self.output: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback((b"".join(self.output), reason.value.exitCode))


def run_with_input(data: bytes, *argv: str) -> Deferred[tuple[bytes, int]]:
    """
    Run a program with ``data`` on its stdin; killed after 20 seconds.
    """
    executable = shutil.which(argv[0])
    if executable is None:
        raise SkipTest(f"{argv[0]} is not on PATH")
    protocol: _Feed

    def kill(d: Deferred[Any]) -> None:
        protocol.transport.signalProcess("KILL")

    done: Deferred[tuple[bytes, int]] = Deferred(kill)
    protocol = _Feed(data, done)
    reactor.spawnProcess(protocol, executable, argv, env={"PATH": os.environ.get("PATH", "")})
    return done.addTimeout(20, reactor)


class GatewayLoopbackTests(TestCase):
    """
    The gateway's services on loopback, in this process, against curl and openssl.
    """

    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.files = Files(self)
        self.logs = LogCapture(self)
        self.hello = _Hello()
        app_tls = ServerTLS.from_files(*self.files.server_ca.issue(
            "app.corp.example.com", dns_names=["app.corp.example.com", "admin.corp.example.com"]
        ).write(self.files.directory, "app"))
        self.app = serve(reactor, Site(self.hello), tls=app_tls)
        self.addCleanup(self.app.stop)
        # A port nothing listens on: bound and released by the OS.
        closed = reactor.listenTCP(0, Site(Resource()), interface=LOOPBACK)
        self.closed_port = closed.getHost().port
        return closed.stopListening()

    async def start(self, extra: str = "", **keys: str) -> None:
        """
        Start the gateway with the app (and a dead backend) registered.
        """
        app = self.app.port_number
        services = (
            f"app.corp.example.com:8443=127.0.0.1:{app}, "
            f"admin.corp.example.com:443=127.0.0.1:{app} clients=ops-*|*@ops.example.com, "
            f"dead.corp.example.com:443=127.0.0.1:{self.closed_port}"
        )
        keys.setdefault("health_listen", "127.0.0.1:0")
        self.config = load_config(self.files.gateway_ini(services, extra, **keys))
        self.service = MultiService()
        for service in gateway_services(self.config, reactor, Metrics()):
            service.setServiceParent(self.service)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(lambda: ensureDeferred(self.stop()))
        listening: Any = self.service.getServiceNamed("gateway")
        self.port = listening.port.getHost().port
        self.connections = listening.port.factory.protocols
        self.limits = listening.port.factory.wrappedFactory.limits
        self.health = self.service.getServiceNamed("gateway-health").port.getHost().port

    async def stop(self) -> None:
        """
        Wait until the gateway has seen every connection end, then stop it.
        """
        await self.idle()
        if self.service.running:
            await self.service.stopService()

    async def idle(self) -> None:
        """
        Wait until the gateway has no connection and no tunnel left.
        """
        await until(lambda: not self.connections and not self.limits.total, "the gateway's connections to end")

    def curl(self, url: str, *args: str, cert: tuple[str, str] | None = None) -> Deferred[tuple[bytes, int]]:
        """
        curl ``url`` through the gateway, presenting ``cert`` (default: alice's).
        """
        cert = self.files.alice if cert is None else cert
        proxy_cert = ["--proxy-cert", cert[0], "--proxy-key", cert[1]] if cert else []
        return run(
            "curl", "-sS", "--max-time", "15",
            "--proxy", f"https://127.0.0.1:{self.port}", "--proxy-cacert", self.files.ca_file,
            *proxy_cert, "--cacert", self.files.ca_file, *args, url,
        )

    def s_client(self, data: bytes, *args: str) -> Deferred[tuple[bytes, int]]:
        """
        ``openssl s_client`` to the gateway offering ALPN h2 and http/1.1, sending ``data``.
        """
        return run_with_input(
            data, "openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-servername",
            "gateway.corp.example.com", "-CAfile", self.files.ca_file, "-alpn", "h2,http/1.1",
            "-ign_eof", *args,
        )

    def gateway_lines(self) -> list[str]:
        """
        What the gateway logged about tunnels and handshakes.
        """
        return [
            formatEvent(e) for e in self.logs.events
            if e.get("log_namespace") == "banyan_kproxy.gateway.service"
            and ("CONNECT" in formatEvent(e) or "handshake" in formatEvent(e))
        ]

    async def _curl(self) -> None:
        await self.start()
        output, code = await self.curl("https://app.corp.example.com:8443/hello", "-v")
        self.assertEqual(code, 0, output)
        self.assertTrue(output.endswith(b"hello from app.corp.example.com:8443\n"), output)
        self.assertIn(b"< HTTP/1.1 200 Connection established", output)
        self.assertIn(b"subject: CN=app.corp.example.com", output)
        await until(lambda: len(self.gateway_lines()) == 2, "the tunnel to close")
        [opened, closed] = self.gateway_lines()
        self.assertRegex(opened, r"^CONNECT app\.corp\.example\.com:8443 from laptop-17 \(127\.0\.0\.1:\d+\): tunnel open$")
        self.assertRegex(
            closed,
            r"^CONNECT app\.corp\.example\.com:8443 from laptop-17 \(127\.0\.0\.1:\d+\): tunnel closed after "
            r"[0-9.]+s, [1-9]\d* bytes up, [1-9]\d* bytes down$",
        )

    def test_curl(self) -> None:
        """
        curl with a device certificate reaches the HTTPS backend registered for the
        domain through the gateway (the domain itself does not resolve), and the
        tunnel is logged when it opens and when it closes.
        """
        return ensureDeferred(self._curl())

    async def _drain(self) -> None:
        log_file = self.files.path("audit.log")
        await self.start(
            f"[audit]\nlog_file = {log_file}\nspool_dir = {self.files.path('spool')}\n",
            drain_timeout="1s",
        )
        # A tunnel that stays open: s_client keeps its side, the app waits for a
        # TLS handshake that does not come.
        client = self.s_client(
            b"CONNECT app.corp.example.com:8443 HTTP/1.1\r\nHost: app.corp.example.com:8443\r\n\r\n",
            "-cert", self.files.alice[0], "-key", self.files.alice[1],
        )
        await until(lambda: len(self.gateway_lines()) == 1, "the tunnel to open")
        await self.service.stopService()
        output, _ = await client
        self.assertIn(b"HTTP/1.1 200 Connection established", output)
        messages = [formatEvent(e) for e in self.logs.events]
        self.assertIn("Draining 1 connections for up to 1s", messages)
        self.assertIn("Drain deadline (1s): closing 1 connections", messages)
        # The audit service stopped after the drain: the closing event is there.
        with open(log_file, encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
        self.assertEqual([e["stage"] for e in events], ["ResponseStarted", "ResponseComplete"], messages)
        self.assertEqual(events[1]["annotations"]["gateway.banyan-kproxy/outcome"], "closed")
        self.assertFalse(any("DROPPED" in m or "after the audit service stopped" in m for m in messages))

    def test_drain(self) -> None:
        """
        Stopping the gateway (SIGTERM) lets an open tunnel run until
        ``drain_timeout``, then closes it; the audit pipeline stops only after that,
        so the tunnel's ResponseComplete event is written.
        """
        return ensureDeferred(self._drain())

    async def _no_certificate(self) -> None:
        await self.start()
        output, code = await self.curl("https://app.corp.example.com:8443/hello", cert=())  # type: ignore[arg-type]
        self.assertEqual(code, 56, output)
        self.assertIn(b"alert certificate required", output)
        output, code = await self.curl("https://app.corp.example.com:8443/hello", cert=self.files.mallory)
        self.assertEqual(code, 56, output)
        self.assertIn(b"alert unknown ca", output)
        await until(lambda: len(self.gateway_lines()) == 2, "two handshake lines")
        self.assertEqual(
            [re.sub(r":\d+ ", ":PORT ", line) for line in self.gateway_lines()],
            [
                "Gateway TLS handshake from 127.0.0.1:PORT failed: peer did not return a certificate",
                "Gateway TLS handshake from 127.0.0.1:PORT failed: certificate verify failed",
            ],
        )
        self.assertEqual(self.hello.requests, 0)
        self.assertEqual(self.logs.at_least(LogLevel.warn), [])

    def test_no_certificate(self) -> None:
        """
        Without a client certificate, or with one from another CA, curl is refused in
        the TLS handshake, the backend is never reached, and each attempt is one log
        line (below warn) with the peer's address.
        """
        return ensureDeferred(self._no_certificate())

    async def _refusals(self) -> None:
        await self.start()
        output, code = await self.curl("https://evil.example.com:443/", "-v")
        self.assertEqual(code, 56, output)
        self.assertIn(b"< HTTP/1.1 403 Forbidden", output)
        self.assertIn(b"curl: (56) CONNECT tunnel failed, response 403", output)
        output, code = await self.curl("https://admin.corp.example.com/")
        self.assertEqual((output, code), (b"curl: (56) CONNECT tunnel failed, response 403\n", 56))
        output, code = await self.curl("https://dead.corp.example.com/")
        self.assertEqual((output, code), (b"curl: (56) CONNECT tunnel failed, response 502\n", 56))
        await until(lambda: len(self.gateway_lines()) == 3, "three refusal lines")
        self.assertEqual(
            [re.sub(r":\d+\)", ":PORT)", line) for line in self.gateway_lines()],
            [
                "CONNECT evil.example.com:443 from laptop-17 (127.0.0.1:PORT) refused with 403: "
                "evil.example.com:443 is not a registered service",
                "CONNECT admin.corp.example.com:443 from laptop-17 (127.0.0.1:PORT) refused with 403: "
                "laptop-17 may not use admin.corp.example.com:443",
                "CONNECT dead.corp.example.com:443 from laptop-17 (127.0.0.1:PORT) refused with 502: "
                "the backend of dead.corp.example.com:443 refused the connection",
            ],
        )
        self.assertEqual(self.hello.requests, 0)

    def test_refusals(self) -> None:
        """
        An unregistered destination and a client outside the service's patterns get
        403, a backend that refuses 502; each is one log line saying why.
        """
        return ensureDeferred(self._refusals())

    async def _s_client(self) -> None:
        await self.start()
        connect = b"CONNECT evil.example.com:443 HTTP/1.1\r\nHost: evil.example.com:443\r\n\r\n"
        cert = ("-cert", self.files.alice[0], "-key", self.files.alice[1])
        output, code = await self.s_client(connect, *cert)
        self.assertIn(b"ALPN protocol: http/1.1", output)
        self.assertIn(b"Verify return code: 0 (ok)", output)
        self.assertIn(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 49\r\n"
            b"Connection: close\r\n\r\nevil.example.com:443 is not a registered service\n",
            output,
        )
        # TLS 1.3: the server's verdict on the client certificate follows the handshake.
        output, code = await self.s_client(connect)
        self.assertIn(b"alert certificate required", output)
        self.assertNotIn(b"HTTP/1.1", output)
        output, code = await self.s_client(connect, "-cert", self.files.mallory[0], "-key", self.files.mallory[1])
        self.assertIn(b"alert unknown ca", output)
        # TLS 1.2: the handshake itself fails.
        output, code = await self.s_client(connect, "-tls1_2")
        self.assertIn(b"alert handshake failure", output)
        self.assertNotIn(b"HTTP/1.1", output)
        self.assertNotEqual(code, 0)
        output, code = await self.s_client(connect, "-tls1_2", *cert)
        self.assertIn(b"ALPN protocol: http/1.1", output)
        self.assertIn(b"HTTP/1.1 403 Forbidden", output)

    def test_s_client(self) -> None:
        """
        openssl s_client offering ALPN h2 and http/1.1 negotiates http/1.1 and, with a
        device certificate, gets a CONNECT answered; without one, or with an untrusted
        one, it gets the handshake alert (TLS 1.3 and 1.2) and no HTTP.
        """
        return ensureDeferred(self._s_client())

    async def _limits(self) -> None:
        await self.start(max_connections_per_client="1")
        tls = https_policy(self.files.ca_file, *self.files.alice).creatorForNetloc(b"localhost", self.port)
        held = ConnectThrough("app.corp.example.com:8443")

        class One(Factory):
            def buildProtocol(self, addr: Any) -> Any:
                return held

        await wrapClientTLS(tls, TCP4ClientEndpoint(reactor, LOOPBACK, self.port)).connect(One())
        await held.answered
        output, code = await self.curl("https://app.corp.example.com:8443/hello")
        self.assertEqual((output, code), (b"curl: (56) CONNECT tunnel failed, response 429\n", 56))
        held.transport.loseConnection()
        await self.idle()
        output, code = await self.curl("https://app.corp.example.com:8443/hello")
        self.assertEqual((output, code), (b"hello from app.corp.example.com:8443\n", 0))

    def test_limits(self) -> None:
        """
        With max_connections_per_client = 1, a device holding a tunnel open gets 429
        for a second one, and succeeds once the first is closed.
        """
        return ensureDeferred(self._limits())

    async def _metrics(self) -> None:
        import treq

        await self.start()
        await self.curl("https://app.corp.example.com:8443/hello")
        await self.curl("https://evil.example.com/")
        await self.curl("https://app.corp.example.com:8443/hello", cert=self.files.mallory)
        await self.idle()
        base = f"http://127.0.0.1:{self.health}"
        for path in ("/live", "/ready"):
            response = await treq.get(base + path, reactor=reactor, persistent=False)
            self.assertEqual((response.code, await treq.text_content(response)), (200, "ok\n"))
        response = await treq.get(base + "/metrics", reactor=reactor, persistent=False)
        text = await treq.text_content(response)
        for line in (
            'kproxy_gateway_tunnels_total{outcome="closed"} 1',
            'kproxy_gateway_tunnels_total{outcome="forbidden"} 1',
            'kproxy_gateway_tunnels_total{outcome="unreachable"} 0',
            "kproxy_gateway_open_tunnels 0",
            "kproxy_gateway_tls_handshake_failures_total 1",
        ):
            self.assertIn("\n" + line + "\n", text)
        self.assertRegex(text, r'\nkproxy_gateway_tunnel_bytes_total\{direction="down"\} [1-9]\d*\n')

    def test_metrics(self) -> None:
        """
        /live and /ready answer ok; /metrics counts tunnels by outcome, open tunnels,
        bytes and failed handshakes.
        """
        return ensureDeferred(self._metrics())

    async def _audit(self) -> None:
        audit_log = self.files.path("audit.log")
        await self.start(
            f"[audit]\nlog_file = {audit_log}\nspool_dir = {self.files.path('spool')}\n"
            "batch_max_wait = 100ms\n"
        )
        output, code = await self.curl("https://app.corp.example.com:8443/hello", "-A", "curl-audit/1")
        self.assertEqual(code, 0, output)
        await self.curl("https://admin.corp.example.com/")
        await self.stop()
        with open(audit_log, encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
        self.assertEqual(
            [(e["stage"], e["verb"], e["requestURI"], e["user"]["username"], e["responseStatus"]["code"])
             for e in events],
            [
                ("ResponseStarted", "connect", "app.corp.example.com:8443", "laptop-17", 200),
                ("ResponseComplete", "connect", "app.corp.example.com:8443", "laptop-17", 200),
                ("ResponseComplete", "connect", "admin.corp.example.com:443", "laptop-17", 403),
            ],
        )
        self.assertEqual(events[0]["auditID"], events[1]["auditID"])
        self.assertEqual(events[1]["sourceIPs"], ["127.0.0.1"])
        self.assertEqual(events[1]["userAgent"], "curl-audit/1")
        self.assertGreater(int(events[1]["annotations"]["gateway.banyan-kproxy/bytes-down"]), 0)
        self.assertEqual(events[2]["responseStatus"]["message"], "laptop-17 may not use admin.corp.example.com:443")

    def test_audit(self) -> None:
        """
        With [audit], tunnels and refusals go through the audit pipeline to its log
        file as audit.k8s.io/v1 events.
        """
        return ensureDeferred(self._audit())


_GATEWAY_LISTENING = re.compile(rb"the gateway on \S+ listening on 127\.0\.0\.1:(\d+)")


class _GatewayDaemon(ProcessProtocol):
    """
    ``twistd -n banyan-kproxy`` running a gateway: its output, port and exit.
    """

    def __init__(self) -> None:
        self.output = b""
        self.port: Deferred[int] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = _GATEWAY_LISTENING.search(self.output)
        if match and not self.port.called:
            self.port.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError(f"the gateway exited before listening:\n{self.output.decode()}"))
        self.ended.callback(getattr(reason.value, "exitCode", None))


class KubectlThroughGatewayTests(StackTestCase):
    """
    kubectl -> CONNECT hop -> gateway daemon (mTLS) -> proxy daemon -> API stand-in.
    """

    def make_stack(self) -> Any:
        stack = super().make_stack()
        stack.proxy_dns_names = ["mykube.corp.example.com"]
        return stack

    async def start_gateway(self) -> int:
        """
        Run the gateway as its own twistd daemon with mykube.corp.example.com:8443
        registered at the proxy's address; its port.
        """
        self.files = Files(self)
        ini = self.files.gateway_ini(f"mykube.corp.example.com:8443=127.0.0.1:{self.stack.proxy_port}")
        command = twistd_command()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        self.gateway = _GatewayDaemon()
        process = reactor.spawnProcess(
            self.gateway, command[0],
            [*command, "--nodaemon", "--pidfile=", "banyan-kproxy", "--config", ini],
            env=env, path=self.files.directory,
        )
        self.addCleanup(lambda: ensureDeferred(self.stop_gateway(process)))
        port = self.gateway.port
        port.addTimeout(30, reactor)
        return await port

    async def stop_gateway(self, process: Any) -> None:
        """
        SIGTERM the gateway daemon (by its process), SIGKILL after 10 seconds.
        """
        if self.gateway.ended.called:
            return
        process.signalProcess("TERM")
        killer = reactor.callLater(10, process.signalProcess, "KILL")
        await self.gateway.ended
        if killer.active():
            killer.cancel()

    async def _chain(self, device_proxy: str) -> None:
        """
        kubectl through ``device_proxy`` (its ``proxy-url``) and the gateway.
        """
        kubeconfig = self.stack.write_kubeconfig(
            "kubeconfig",
            {"reader": self.stack.token("myuser@example.com", ["any-employee-personal-device"])},
            server="https://mykube.corp.example.com:8443",
            proxy_url=device_proxy,
        )
        output, code = await self.kubectl(kubeconfig, "get", "pods")
        self.assertEqual(code, 0, output)
        self.assertTrue(output.startswith("NAME"), output)
        self.assertIn("web-1", output)
        output, code = await self.kubectl(kubeconfig, "get", "services")
        self.assertEqual((output, code), (FORBIDDEN_SERVICES, 1))
        await until(lambda: self.gateway.output.count(b"tunnel closed after") >= 2, "the gateway's log lines")
        self.assertRegex(
            self.gateway.output.decode(),
            r"CONNECT mykube\.corp\.example\.com:8443 from laptop-17 \(127\.0\.0\.1:\d+\): tunnel closed after",
        )

    async def _through_hop(self) -> None:
        self.stack.standin.add_pod("web-1")
        gateway_port = await self.start_gateway()
        hop = serve_hop(
            reactor, Address(LOOPBACK, gateway_port), self.files.ca_file, *self.files.alice,
            server_name="gateway.corp.example.com",
        )
        self.addCleanup(hop.stop)
        await self._chain(hop.url)

    def test_kubectl_through_gateway(self) -> None:
        """
        kubectl with ``proxy-url`` (a plain CONNECT hop that carries the CONNECT on over
        mTLS) and ``server: https://mykube.corp.example.com:8443`` lists pods through
        the gateway daemon, which dials the registered backend (the proxy, whose
        certificate names the service domain), and gets the apiserver's exact
        Forbidden message for services.
        """
        return ensureDeferred(self._through_hop())

    async def _through_connect_service(self) -> None:
        from banyan_kproxy.connect.service import connect_factory

        self.stack.standin.add_pod("web-1")
        gateway_port = await self.start_gateway()
        ini = self.files.write("connect.ini", "\n".join([
            "[connect]",
            "listen = 127.0.0.1:0",
            f"next_hop = https://127.0.0.1:{gateway_port}",
            f"client_cert_file = {self.files.alice[0]}",
            f"client_key_file = {self.files.alice[1]}",
            f"ca_file = {self.files.ca_file}",
            "allow = mykube.corp.example.com:8443",
        ]) + "\n")
        connect = serve(reactor, connect_factory(load_config(ini), reactor))
        self.addCleanup(connect.stop)
        await self._chain(connect.url)
        await self._exec_and_port_forward(connect.url)

    async def _exec_and_port_forward(self, device_proxy: str) -> None:
        """
        ``kubectl exec`` and ``kubectl port-forward`` (an admin) through the same chain.
        """
        from twisted.web.client import Agent, readBody
        from twisted.web.static import Data

        from tests.test_kubeapi_streams import KubectlProcess

        root = Resource()
        root.putChild(b"", Data(b"behind port 80\n", "text/plain"))
        web = serve(reactor, Site(root))
        self.addCleanup(web.stop)
        self.stack.standin.set_pod_port("web-1", 80, web.port_number)
        kubeconfig = self.stack.write_kubeconfig(
            "admin-kubeconfig",
            {"admin": self.stack.token("admin@example.com", ["all-admins-corporate-device"])},
            server="https://mykube.corp.example.com:8443",
            proxy_url=device_proxy,
        )
        output, code = await self.kubectl(kubeconfig, "exec", "web-1", "--", "echo", "through the chain")
        self.assertEqual((output, code), ("through the chain", 0))
        binary = kubectl_binary(None)
        protocol = KubectlProcess(None)
        process = reactor.spawnProcess(
            protocol, binary, [binary, "port-forward", "pod/web-1", ":80"],
            env={"HOME": self.home, "KUBECONFIG": kubeconfig, "PATH": os.environ.get("PATH", "")},
        )
        try:
            pattern = rb"Forwarding from 127\.0\.0\.1:(\d+) -> 80"
            await until(lambda: re.search(pattern, bytes(protocol.out)), "the forwarded port")
            port = int(re.search(pattern, bytes(protocol.out)).group(1))
            response = await Agent(reactor).request(
                b"GET", f"http://127.0.0.1:{port}/".encode()
            ).addTimeout(30, reactor)
            self.assertEqual(await readBody(response), b"behind port 80\n")
        finally:
            if not protocol.ended.called:
                process.signalProcess("TERM")
                await protocol.ended.addTimeout(30, reactor)

    def test_kubectl_through_connect_service(self) -> None:
        """
        The whole path: kubectl -> the device-side connect service -> the gateway
        daemon (mTLS) -> the proxy daemon -> the API stand-in, for get, exec and
        port-forward.
        """
        return ensureDeferred(self._through_connect_service())
