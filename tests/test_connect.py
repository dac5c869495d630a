"""
Tests for the device side's parts: `banyan_kproxy.connect.nexthop` (CONNECT through
an upstream proxy, in memory and over real mutual TLS on loopback),
`banyan_kproxy.connect.service` (the allow-list policy and the ``[connect]`` role)
and `banyan_kproxy.connect.kubeconfig` (``banyan-kproxy kubeconfig``).
"""

from __future__ import annotations

import base64
import io
import os
import stat
import sys
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from banyan_kproxy import cli, tap
from banyan_kproxy.config import CLUSTER_NAME_RULE, load_config
from banyan_kproxy.connect.kubeconfig import KubeconfigError, write_kubeconfig
from banyan_kproxy.connect.nexthop import (
    HTTPConnectProxyEndpoint,
    NextHop,
    NextHopError,
    next_hop_endpoint,
)
from banyan_kproxy.connect.service import DaisyChainPolicy
from banyan_kproxy.connectserver import ConnectRefused, ConnectRequest, client_identity
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.loopback import serve
from banyan_kproxy.tls import ServerTLS
from banyan_kproxy.tunnel import SpliceEnd

TARGET = "mykube.corp.example.com"
PEER = IPv4Address("TCP", "127.0.0.1", 50000)


class Recorder(Protocol):
    """
    The caller's protocol: remembers what reached it.
    """

    def __init__(self) -> None:
        self.data = b""
        self.made = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    An endpoint whose connection the test completes, fails or leaves pending.
    """

    def __init__(self) -> None:
        self.attempt: Deferred[Any] | None = None
        self.factory: Any = None
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factory = factory

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled = True

        self.attempt = Deferred(cancel)
        return self.attempt

    def complete(self) -> tuple[Protocol, StringTransport]:
        protocol = self.factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        self.attempt.callback(protocol)  # type: ignore[union-attr]
        return protocol, transport


class NextHopEndpointTests(SynchronousTestCase):
    """
    `HTTPConnectProxyEndpoint` asks the proxy for a tunnel and hands it over only on 2xx.
    """

    def setUp(self) -> None:
        self.proxy = FakeEndpoint()
        self.endpoint = HTTPConnectProxyEndpoint(
            self.proxy, TARGET, 8443, "next hop http://127.0.0.1:3128", b"alice:p@ss word"
        )
        self.recorder = Recorder()
        self.connecting = self.endpoint.connect(Factory.forProtocol(lambda: self.recorder))

    def test_request(self) -> None:
        """The request is CONNECT in authority form with Host and basic proxy credentials."""
        _, transport = self.proxy.complete()
        credentials = base64.b64encode(b"alice:p@ss word")
        self.assertEqual(
            transport.value(),
            b"CONNECT mykube.corp.example.com:8443 HTTP/1.1\r\nHost: mykube.corp.example.com:8443\r\n"
            b"Proxy-Authorization: Basic " + credentials + b"\r\n\r\n",
        )
        self.assertNoResult(self.connecting)
        self.assertFalse(self.recorder.made)

    def test_no_credentials_ipv6(self) -> None:
        """Without user info there is no Proxy-Authorization; an IPv6 target is bracketed."""
        proxy = FakeEndpoint()
        HTTPConnectProxyEndpoint(proxy, "::1", 443).connect(Factory.forProtocol(Recorder))
        _, transport = proxy.complete()
        self.assertEqual(transport.value(), b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n")

    def test_established(self) -> None:
        """On 200 the caller's protocol is connected and gets the bytes after the head, then all later events."""
        setup, transport = self.proxy.complete()
        setup.dataReceived(b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n")
        self.assertNoResult(self.connecting)
        setup.dataReceived(b"\r\n\x16\x03\x01early")
        self.assertIs(self.successResultOf(self.connecting), self.recorder)
        self.assertTrue(self.recorder.made)
        self.assertIs(self.recorder.transport, transport)
        setup.dataReceived(b"-more")
        self.assertEqual(self.recorder.data, b"\x16\x03\x01early-more")
        setup.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(self.recorder.lost.value, ConnectionDone)  # type: ignore[union-attr]

    def test_refused(self) -> None:
        """A non-2xx answer fails with the hop and its status line, and the connection is aborted."""
        setup, transport = self.proxy.complete()
        setup.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        error = self.failureResultOf(self.connecting, NextHopError).value
        self.assertEqual(
            str(error),
            "next hop http://127.0.0.1:3128 refused CONNECT mykube.corp.example.com:8443: "
            "HTTP/1.1 407 Proxy Authentication Required",
        )
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.recorder.made)

    def test_not_http(self) -> None:
        """An answer that is not an HTTP status line is refused, quoting it."""
        setup, _ = self.proxy.complete()
        setup.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        self.assertIn("refused CONNECT mykube.corp.example.com:8443: SSH-2.0-OpenSSH_9.2",
                      str(self.failureResultOf(self.connecting, NextHopError).value))

    def test_head_too_large(self) -> None:
        """A response head longer than the bound fails instead of growing the buffer."""
        setup, transport = self.proxy.complete()
        setup.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * (16 * 1024) + b"\r\n")
        self.assertIn("with a response head over 16384 bytes",
                      str(self.failureResultOf(self.connecting, NextHopError).value))
        self.assertTrue(transport.disconnecting)

    def test_closed_before_answer(self) -> None:
        """A proxy that closes before answering is reported as such."""
        setup, _ = self.proxy.complete()
        setup.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            str(self.failureResultOf(self.connecting, NextHopError).value),
            "next hop http://127.0.0.1:3128 closed the connection before answering CONNECT "
            "mykube.corp.example.com:8443",
        )

    def test_proxy_unreachable(self) -> None:
        """A proxy that cannot be reached is named in the error."""
        self.proxy.attempt.errback(ConnectionRefusedError("Connection refused"))  # type: ignore[union-attr]
        message = str(self.failureResultOf(self.connecting, NextHopError).value)
        self.assertTrue(message.startswith("cannot connect to next hop http://127.0.0.1:3128: "), message)
        self.assertIn("Connection refused", message)

    def test_cancel_while_connecting(self) -> None:
        """Cancelling before the proxy connection exists cancels that attempt."""
        self.connecting.cancel()
        self.assertTrue(self.proxy.cancelled)
        self.failureResultOf(self.connecting, CancelledError)

    def test_cancel_while_waiting_for_answer(self) -> None:
        """Cancelling while waiting for the proxy's answer aborts the connection."""
        _, transport = self.proxy.complete()
        self.connecting.cancel()
        self.failureResultOf(self.connecting, CancelledError)
        self.assertTrue(transport.disconnecting)

    def test_parse(self) -> None:
        """A next_hop URL gives host, port, percent-decoded credentials, and a display without them."""
        hop = NextHop.parse("https://bob:s%40cret@gw.example.com:8443")
        self.assertEqual((hop.scheme, hop.host, hop.port, hop.credentials),
                         ("https", "gw.example.com", 8443, b"bob:s@cret"))
        self.assertEqual(hop.display, "https://gw.example.com:8443")
        self.assertNotIn("cret", repr(hop))
        self.assertEqual(NextHop.parse("http://proxy").port, 80)
        self.assertEqual(NextHop.parse("https://[::1]").display, "https://[::1]:443")


class _EchoConnectProxy(Protocol):
    """
    A TLS CONNECT proxy for tests: answers 200, then echoes, remembering the request
    head and the client's certificate name.
    """

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen
        self.buffer = b""
        self.tunnel = False

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            identity = client_identity(self.transport)
            self.seen.append((head, identity.common_name if identity else None))
            self.tunnel = True
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + rest)


class NextHopTLSTests(TestCase):
    """
    ``https://`` next hops over real TLS on loopback, the proxy requiring a client certificate.
    """

    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = CertificateAuthority.generate("gateway CA")
        self.ca_file = ca.write_cert(self.dir, "ca")
        cert, key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(self.dir, "gateway")
        devices = CertificateAuthority.generate("device CA")
        self.device_ca = devices.write_cert(self.dir, "devices")
        self.client_cert, self.client_key = devices.issue("laptop-1", client=True).write(self.dir, "device")
        self.seen: list[Any] = []
        tls = ServerTLS.from_files(cert, key, self.device_ca)
        served = serve(reactor, Factory.forProtocol(lambda: _EchoConnectProxy(self.seen)), tls=tls)
        self.addCleanup(served.stop)
        self.url = f"https://127.0.0.1:{served.port_number}"

    async def tunnel(self, **tls: Any) -> Recorder:
        make = next_hop_endpoint(reactor, self.url, connect_timeout=5, **tls)
        recorder = Recorder()
        connected = make(TARGET, 8443).connect(Factory.forProtocol(lambda: recorder))
        await connected.addTimeout(10, reactor)
        self.addCleanup(lambda: recorder.transport.loseConnection())
        return recorder

    def test_mutual_tls(self) -> None:
        """With the client certificate the proxy sees the device's name and the tunnel carries bytes both ways."""

        async def go() -> None:
            recorder = await self.tunnel(ca_file=self.ca_file, client_cert_file=self.client_cert,
                                         client_key_file=self.client_key)
            recorder.transport.write(b"ping through the tunnel")
            deadline = reactor.seconds() + 10
            while recorder.data != b"ping through the tunnel" and reactor.seconds() < deadline:
                await _tick()
            self.assertEqual(recorder.data, b"ping through the tunnel")
            self.assertEqual(self.seen, [(
                b"CONNECT mykube.corp.example.com:8443 HTTP/1.1\r\nHost: mykube.corp.example.com:8443",
                "laptop-1",
            )])

        return ensureDeferred(go())

    def test_without_client_certificate(self) -> None:
        """Without a client certificate the TLS handshake fails and the error names the hop."""

        async def go() -> None:
            with self.assertRaises(NextHopError) as caught:
                await self.tunnel(ca_file=self.ca_file)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"next hop {self.url} closed the connection before "
                                               "answering CONNECT mykube.corp.example.com:8443"), message)
            self.assertEqual(self.seen, [])

        return ensureDeferred(go())

    def test_untrusted_proxy_certificate(self) -> None:
        """A proxy whose certificate does not chain to ca_file is not sent the CONNECT."""

        async def go() -> None:
            with self.assertRaises(NextHopError) as caught:
                await self.tunnel(ca_file=self.device_ca, client_cert_file=self.client_cert,
                                  client_key_file=self.client_key)
            self.assertIn("certificate verify failed", str(caught.exception))
            self.assertEqual(self.seen, [])

        return ensureDeferred(go())


def _tick() -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)


class PolicyTests(SynchronousTestCase):
    """
    `DaisyChainPolicy` allows only listed destinations and turns failures into 502 / 504.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.made: list[tuple[str, int]] = []
        self.endpoints: list[FakeEndpoint] = []

        def endpoint_for(host: str, port: int) -> FakeEndpoint:
            self.made.append((host, port))
            endpoint = FakeEndpoint()
            self.endpoints.append(endpoint)
            return endpoint

        self.policy = DaisyChainPolicy(
            allow=[(TARGET, 8443), ("0:0::1", 443)], endpoint_for=endpoint_for,
            hop="next hop https://gw.example.com:8443", clock=self.clock, connect_timeout=10,
        )

    def request(self, host: str = TARGET, port: int = 8443) -> ConnectRequest:
        return ConnectRequest(host, port, PEER, Headers())

    def test_not_allowed(self) -> None:
        """A destination not in allow is a 403 and nothing is dialled."""
        refused = self.failureResultOf(self.policy.open(self.request(port=443)), ConnectRefused).value
        self.assertEqual((refused.code, refused.reason), (
            403, "mykube.corp.example.com:443 is not a destination this proxy may tunnel to ([connect] allow)"))
        self.assertEqual(self.made, [])

    def test_allowed(self) -> None:
        """An allowed destination is dialled and the connected SpliceEnd handed back."""
        opening = self.policy.open(self.request())
        self.endpoints[0].complete()
        end = self.successResultOf(opening)
        self.assertIsInstance(end, SpliceEnd)
        self.assertEqual(self.made, [(TARGET, 8443)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ipv6_allow_normalised(self) -> None:
        """An IPv6 destination in allow matches however it was spelt."""
        self.policy.open(self.request("::1", 443))
        self.assertEqual(self.made, [("::1", 443)])

    def test_next_hop_refused(self) -> None:
        """A next hop's refusal is a 502 carrying its message."""
        opening = self.policy.open(self.request())
        self.endpoints[0].attempt.errback(NextHopError(  # type: ignore[union-attr]
            "next hop https://gw.example.com:8443 refused CONNECT mykube.corp.example.com:8443: HTTP/1.1 403 Forbidden"))
        refused = self.failureResultOf(opening, ConnectRefused).value
        self.assertEqual((refused.code, refused.reason), (502, (
            "next hop https://gw.example.com:8443 refused CONNECT mykube.corp.example.com:8443: "
            "HTTP/1.1 403 Forbidden")))

    def test_timeout(self) -> None:
        """No tunnel within connect_timeout is a 504 naming the hop, and the attempt is cancelled."""
        opening = self.policy.open(self.request())
        self.clock.advance(9.9)
        self.assertNoResult(opening)
        self.clock.advance(0.1)
        refused = self.failureResultOf(opening, ConnectRefused).value
        self.assertEqual((refused.code, refused.reason), (
            504, "next hop https://gw.example.com:8443: no tunnel to mykube.corp.example.com:8443 within 10s"))
        self.assertTrue(self.endpoints[0].cancelled)

    def test_direct_refused(self) -> None:
        """A direct connection that is refused is a 502 naming the destination."""
        self.policy.hop = "direct"
        opening = self.policy.open(self.request())
        self.endpoints[0].attempt.errback(ConnectionRefusedError())  # type: ignore[union-attr]
        refused = self.failureResultOf(opening, ConnectRefused).value
        self.assertEqual(refused.code, 502)
        self.assertTrue(refused.reason.startswith("cannot connect to mykube.corp.example.com:8443 (direct): "))

    def test_client_gone(self) -> None:
        """When the client leaves (the listener cancels), the dialling stops."""
        opening = self.policy.open(self.request())
        opening.cancel()
        self.failureResultOf(opening, CancelledError)
        self.assertTrue(self.endpoints[0].cancelled)


class _Files:
    """
    A configuration directory with a CA file and a refresh token.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory)
        self.ca_pem = CertificateAuthority.generate("proxy CA").cert_pem
        with open(os.path.join(directory, "proxy-ca.crt"), "wb") as f:
            f.write(self.ca_pem)
        with open(os.path.join(directory, "refresh-token"), "w") as f:
            f.write("rt\n")

    def ini(self, connect: str = "listen = 127.0.0.1:8443", cluster: str = "testcluster",
            kubeconfig_path: str = "kube/banyan") -> str:
        path = os.path.join(self.dir, "connect.ini")
        with open(path, "w") as f:
            f.write(
                f"[connect]\n{connect}\nallow = mykube.corp.example.com:8443\n\n"
                "[oidc_client]\nissuer_url = https://example.trust.banyanops.com/v2\n"
                "client_id = external-services\nrefresh_token_file = refresh-token\n\n"
                f"[kubeconfig]\npath = {os.path.join(self.dir, kubeconfig_path)}\n"
                f"cluster_name = {cluster}\nserver = https://mykube.corp.example.com:8443\n"
                "ca_file = proxy-ca.crt\n"
            )
        return path


class KubeconfigTests(SynchronousTestCase):
    """
    ``banyan-kproxy kubeconfig`` writes the seed's ``~/.kube/banyan``.
    """

    def setUp(self) -> None:
        self.files = _Files(os.path.abspath(self.mktemp()))
        self.path = os.path.join(self.files.dir, "kube", "banyan")

    def read(self) -> Any:
        with open(self.path) as f:
            return yaml.safe_load(f)

    def test_written(self) -> None:
        """A new file (0600) has the cluster through the connect service, the exec plugin user and the context."""
        ini = self.files.ini()
        self.assertEqual(write_kubeconfig(load_config(ini), ["/usr/bin/banyan-kproxy"]), self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.read(), {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "testcluster", "cluster": {
                "server": "https://mykube.corp.example.com:8443",
                "certificate-authority-data": base64.b64encode(self.files.ca_pem).decode(),
                "proxy-url": "http://127.0.0.1:8443",
            }}],
            "users": [{"name": "testcluster", "user": {"exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": "/usr/bin/banyan-kproxy",
                "args": ["credential", "--config", ini],
                "interactiveMode": "Never",
                "provideClusterInfo": False,
                "installHint": "banyan-kproxy provides the ID tokens for this cluster: install it "
                               "(apt install banyan-kproxy, or pip install banyan-kproxy)",
            }}}],
            "contexts": [{"name": "testcluster", "context": {"cluster": "testcluster", "user": "testcluster"}}],
            "current-context": "testcluster",
        })

    def test_default_command(self) -> None:
        """Without a command given, the plugin is this Python's banyan-kproxy (or -m banyan_kproxy.cli)."""
        write_kubeconfig(load_config(self.files.ini()))
        user = self.read()["users"][0]["user"]["exec"]
        here = os.path.join(os.path.dirname(sys.executable), "banyan-kproxy")
        if os.path.exists(here):
            self.assertEqual((user["command"], user["args"][0]), (here, "credential"))
        else:
            self.assertEqual((user["command"], user["args"][:3]),
                             (sys.executable, ["-m", "banyan_kproxy.cli", "credential"]))

    def test_keeps_other_entries(self) -> None:
        """An existing file keeps its other clusters, users, contexts and current context; ours is replaced."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "prod",
                "clusters": [{"name": "prod", "cluster": {"server": "https://prod:6443"}},
                             {"name": "testcluster", "cluster": {"server": "https://old:1"}}],
                "users": [{"name": "prod", "user": {"token": "t"}}],
                "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "prod"}}],
            }, f)
        write_kubeconfig(load_config(self.files.ini()), ["banyan-kproxy"])
        document = self.read()
        self.assertEqual([c["name"] for c in document["clusters"]], ["prod", "testcluster"])
        self.assertEqual(document["clusters"][1]["cluster"]["server"], "https://mykube.corp.example.com:8443")
        self.assertEqual([u["name"] for u in document["users"]], ["prod", "testcluster"])
        self.assertEqual([c["name"] for c in document["contexts"]], ["prod", "testcluster"])
        self.assertEqual(document["current-context"], "prod")

    def test_wildcard_listen(self) -> None:
        """A connect service listening on every address is reached on loopback."""
        write_kubeconfig(load_config(self.files.ini("listen = 0.0.0.0:9443")), ["x"])
        self.assertEqual(self.read()["clusters"][0]["cluster"]["proxy-url"], "http://127.0.0.1:9443")

    def test_port_zero(self) -> None:
        """A listen port of 0 cannot go into proxy-url."""
        with self.assertRaises(KubeconfigError) as caught:
            write_kubeconfig(load_config(self.files.ini("listen = 127.0.0.1:0")), ["x"])
        self.assertIn("[connect] listen has port 0; kubectl needs a fixed port in proxy-url",
                      str(caught.exception))

    def test_not_yaml(self) -> None:
        """An existing file that is not YAML is left alone and reported."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("clusters: [\n")
        with self.assertRaises(KubeconfigError):
            write_kubeconfig(load_config(self.files.ini()), ["x"])
        with open(self.path) as f:
            self.assertEqual(f.read(), "clusters: [\n")

    def test_cli(self) -> None:
        """The command writes the file and says where."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["kubeconfig", "--config", self.files.ini()]), 0)
        self.assertEqual(out.getvalue(), f"wrote {self.path}\n")
        self.assertEqual(self.read()["current-context"], "testcluster")

    def test_cli_bad_cluster_name(self) -> None:
        """A cluster name kubectl cannot use is refused with the rule stated, and nothing is written."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        ini = self.files.ini(cluster="TestCluster")
        self.assertEqual(cli.main(["kubeconfig", "--config", ini]), 1)
        self.assertEqual(err.getvalue(), f"{ini}: [kubeconfig] cluster_name: 'TestCluster' is not a valid "
                         f"cluster name: use {CLUSTER_NAME_RULE}\n")
        self.assertFalse(os.path.exists(self.path))


class ConnectRoleTests(SynchronousTestCase):
    """
    ``twistd banyan-kproxy`` with a ``[connect]`` section.
    """

    def setUp(self) -> None:
        self.files = _Files(os.path.abspath(self.mktemp()))

    def make(self, ini: str, reactor: MemoryReactorClock) -> Any:
        options = tap.Options()
        options.parseOptions(["--config", ini])
        return tap.makeService(options, reactor=reactor)

    def test_listener(self) -> None:
        """The role is one child, ``connect``, that binds the listen address when started."""
        reactor = MemoryReactorClock()
        service = self.make(self.files.ini("listen = 127.0.0.1:8443\nnext_hop = http://127.0.0.1:3128"), reactor)
        self.assertEqual([s.name for s in service], ["connect", "reload"])
        child = service.getServiceNamed("connect")
        child.privilegedStartService()
        child.startService()
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (8443, "127.0.0.1"))
        self.assertEqual(factory.policy.hop, "next hop http://127.0.0.1:3128")
        self.assertEqual(factory.policy.allow, frozenset({(TARGET, 8443)}))
        self.successResultOf(child.stopService())

    def test_direct(self) -> None:
        """Without next_hop destinations are dialled directly."""
        reactor = MemoryReactorClock()
        service = self.make(self.files.ini(), reactor)
        child = service.getServiceNamed("connect")
        child.privilegedStartService()
        [(_, factory, _, _)] = reactor.tcpServers
        self.assertEqual(factory.policy.hop, "direct")
        child.stopService()


class SampleConnectFileTests(SynchronousTestCase):
    """
    The shipped device-side sample, etc/banyan-kproxy/connect.ini.
    """

    def test_loads(self) -> None:
        """The sample is a valid configuration once the files it names exist beside it."""
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "banyan-kproxy")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(here, "connect.ini")) as f:
            text = f.read()
        path = os.path.join(directory, "connect.ini")
        with open(path, "w") as f:
            f.write(text)
        for name in ("device.crt", "device.key", "access-tier-ca.crt", "refresh-token", "kproxy-ca.crt"):
            with open(os.path.join(directory, name), "w") as f:
                f.write("x\n")
        config = load_config(path)
        assert config.connect is not None and config.kubeconfig is not None
        self.assertEqual(config.connect.next_hop, "https://access-tier.corp.example.com:8443")
        self.assertEqual(config.connect.allow, ((TARGET, 8443),))
        self.assertEqual(config.kubeconfig.path, os.path.expanduser("~/.kube/banyan"))
        self.assertEqual(config.kubeconfig.server, "https://mykube.corp.example.com:8443")
