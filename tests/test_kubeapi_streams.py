"""
Tests for exec, attach, cp and port-forward on the Kubernetes API stand-in
(L{banyan_kproxy.testing.kubeapi} with L{banyan_kproxy.testing.upgrades}): the upgrade
protocols in memory, byte by byte, and the real ``kubectl`` 1.29 (SPDY/3.1) and 1.33
(WebSocket) against the stand-in over TLS on loopback.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.containers import ExitStatus
from banyan_kproxy.testing.loopback import TrackingFactory
from banyan_kproxy.testing.kubeapi import KubeAPIStandIn, UserInfo, listen
from banyan_kproxy.testing.spdy import (
    DataFrame,
    FrameDecoder,
    GoAway,
    HeaderCompressor,
    SpdySession,
    SynStream,
    encode_frame,
)
from banyan_kproxy.testing.websocket import (
    Frame,
    FrameParser,
    Opcode,
    accept_key,
    close_payload,
    encode_frame as ws_frame,
    parse_close_payload,
)
from banyan_kproxy.tls import ServerTLS

ADMIN_TOKEN = "admin-token"
READER_TOKEN = "reader-token"
TOKENS = {
    ADMIN_TOKEN: UserInfo("kubernetes-admin", ("system:masters",)),
    READER_TOKEN: UserInfo("reader"),
}
#: The reader may get pods, but not exec, attach or port-forward.
READER_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: default}
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader-reads-pods, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: reader}
"""
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
SUCCESS = {"metadata": {}, "status": "Success"}


def exit_status(code: int, argv: str) -> dict[str, Any]:
    """
    The v4/v5 error-channel Status for a non-zero exit code.
    """
    return {
        "metadata": {}, "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command"
                   f" [{argv}], exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


# -- in memory ---------------------------------------------------------------------------------


class _Conversation:
    """
    One connection to the stand-in's twisted.web site over a L{StringTransport}.
    """

    def __init__(self, standin: KubeAPIStandIn, clock: Clock) -> None:
        self.clock = clock
        self.site = Site(standin.resource(), reactor=clock)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.read = 0

    def request(self, method: str, path: str, headers: Mapping[str, str | Sequence[str]],
                after: bytes = b"") -> bytes:
        """
        Send a request head (and ``after`` in the same write); return the response
        head once the upgrade has happened.
        """
        lines = [f"{method} {path} HTTP/1.1", "Host: kube.example",
                 f"Authorization: Bearer {ADMIN_TOKEN}"]
        for name, values in headers.items():
            for value in [values] if isinstance(values, str) else values:
                lines.append(f"{name}: {value}")
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + after)
        self.clock.advance(0)
        data = self.transport.value()
        head, _, _ = data.partition(b"\r\n\r\n")
        self.read = len(head) + 4
        return head

    def send(self, data: bytes) -> None:
        """
        Bytes from the client after the upgrade.
        """
        self.transport.protocol.dataReceived(data)

    def received(self) -> bytes:
        """
        What the server sent since the last call.
        """
        data = self.transport.value()[self.read:]
        self.read += len(data)
        return data


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}


class _InMemory(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = MemoryReactorClock()
        self.standin = KubeAPIStandIn(tokens=TOKENS, rbac_yaml=[READER_RBAC], clock=self.clock,
                                      reactor=self.memory)
        self.standin.add_pod("web-1", ports={80: 8080}, attach_banner="welcome\n",
                             files={"/srv/a.txt": "alpha\n"})
        self.conversation = _Conversation(self.standin, self.clock)


class WebSocketExecTests(_InMemory):
    """
    exec and attach over the WebSocket channel protocols.
    """

    def upgrade(self, query: str, protocols: str, after: bytes = b"",
                subresource: str = "exec") -> dict[str, str]:
        head = self.conversation.request(
            "GET", f"/api/v1/namespaces/default/pods/web-1/{subresource}?{query}", {
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": WS_KEY, "Sec-WebSocket-Protocol": protocols,
            }, after)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), head)
        return _headers(head)

    def frames(self) -> list[Frame]:
        return FrameParser(masked=False).feed(self.conversation.received())

    def client(self, payload: bytes, binary: bool = True) -> None:
        self.conversation.send(ws_frame(Frame(Opcode.BINARY if binary else Opcode.TEXT, payload),
                                        os.urandom(4)))

    def test_v5_cat(self) -> None:
        """
        v5: the handshake is answered with the accept key and protocol; the server
        announces stdout with an empty message; stdin sent in the same packet as the
        request head is not lost; the CLOSE signal for stdin ends cat, whose Success
        status goes on channel 3 before a normal close frame.
        """
        early = ws_frame(Frame(Opcode.BINARY, b"\x00early "), os.urandom(4))
        headers = self.upgrade(
            "command=cat&stdin=true&stdout=true&stderr=true",
            "v5.channel.k8s.io, v4.channel.k8s.io, base64url.bearer.authorization.k8s.io.eA",
            early,
        )
        self.assertEqual(
            (headers["upgrade"], headers["connection"], headers["sec-websocket-accept"],
             headers["sec-websocket-protocol"]),
            ("websocket", "Upgrade", accept_key(WS_KEY), "v5.channel.k8s.io"),
        )
        self.assertTrue(headers["audit-id"])
        self.client(b"\x00later")
        self.assertEqual(self.frames(), [Frame(Opcode.BINARY, b"\x01"),
                                         Frame(Opcode.BINARY, b"\x01early "),
                                         Frame(Opcode.BINARY, b"\x01later")])
        self.client(b"\x04" + json.dumps({"Width": 100, "Height": 40}).encode())
        self.client(b"\xff\x00")
        frames = self.frames()
        self.assertEqual(frames[0].payload[:1], b"\x03")
        self.assertEqual(json.loads(frames[0].payload[1:]), SUCCESS)
        self.assertEqual(frames[1], Frame(Opcode.CLOSE, close_payload(1000)))
        self.conversation.send(ws_frame(Frame(Opcode.CLOSE, close_payload(1000)), os.urandom(4)))
        self.assertTrue(self.conversation.transport.disconnecting)
        [session] = self.standin.sessions
        self.assertEqual((session.transport, session.protocol, session.argv, session.status,
                          session.sizes, session.user),
                         ("websocket", "v5.channel.k8s.io", ("cat",), ExitStatus(0),
                          [(100, 40)], "kubernetes-admin"))
        self.assertEqual(self.standin.requests[-1].code, 101)

    def test_v4_exit_code(self) -> None:
        """
        v4: stdout and stderr on their channels, then the NonZeroExitCode Status
        carrying the code as cause ExitCode.
        """
        self.upgrade("command=sh&command=-c&command=echo+out%3B+echo+err+%3E%262%3B+exit+3"
                     "&stdout=true&stderr=true", "v4.channel.k8s.io")
        frames = self.frames()
        self.assertEqual([f.payload for f in frames[:3]], [b"\x01", b"\x01out\n", b"\x02err\n"])
        self.assertEqual(json.loads(frames[3].payload[1:]),
                         exit_status(3, "sh -c echo out; echo err >&2; exit 3"))
        self.assertEqual(frames[4].opcode, Opcode.CLOSE)

    def test_base64(self) -> None:
        """
        base64.channel.k8s.io: text messages, a digit for the channel, base64 data;
        the old protocols put no Status on the error channel on success.
        """
        self.upgrade("command=echo&command=hi&stdout=true", "base64.channel.k8s.io")
        frames = self.frames()
        self.assertEqual([(f.opcode, f.payload) for f in frames[:2]],
                         [(Opcode.TEXT, b"1"), (Opcode.TEXT, b"1" + base64.b64encode(b"hi\n"))])
        self.assertEqual(frames[2].opcode, Opcode.CLOSE)

    def test_unknown_command(self) -> None:
        """
        An executable the container lacks: the InternalError Status containerd causes.
        """
        self.upgrade("command=nosuch&stdout=true", "v5.channel.k8s.io")
        status = json.loads(self.frames()[1].payload[1:])
        self.assertEqual((status["status"], status["reason"], status["code"]),
                         ("Failure", "InternalError", 500))
        self.assertIn('exec: "nosuch": executable file not found in $PATH', status["message"])

    def test_attach(self) -> None:
        """
        attach: the banner, then stdin echoed back.
        """
        self.upgrade("stdin=true&stdout=true&stderr=true", "v5.channel.k8s.io",
                     subresource="attach")
        self.client(b"\x00ping\n")
        self.assertEqual([f.payload for f in self.frames()],
                         [b"\x01", b"\x01welcome\n", b"\x01ping\n"])

    def test_backpressure(self) -> None:
        """
        While the client does not read what cat writes (its write buffer is full),
        the stand-in stops reading the client's stdin.
        """
        self.upgrade("command=cat&stdin=true&stdout=true", "v5.channel.k8s.io")
        transport = self.conversation.transport
        transport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_client_goes_away(self) -> None:
        """
        When the connection drops, the command is stopped and the session closed.
        """
        self.upgrade("command=cat&stdin=true&stdout=true", "v5.channel.k8s.io")
        self.conversation.transport.protocol.connectionLost(Failure(Exception("gone")))
        [session] = self.standin.sessions
        self.assertTrue(session.closed)
        self.assertEqual(session.status, None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UpgradeRefusalTests(_InMemory):
    """
    Requests that do not get a 101.
    """

    def answer(self, method: str, query: str, headers: Mapping[str, str],
               token: str = ADMIN_TOKEN) -> tuple[int, dict[str, str], bytes]:
        self.conversation.transport.clear()
        lines = [f"{method} /api/v1/namespaces/default/pods/web-1/{query} HTTP/1.1",
                 "Host: kube.example", f"Authorization: Bearer {token}", "Content-Length: 0"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.conversation.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.clock.advance(0)
        head, _, body = self.conversation.transport.value().partition(b"\r\n\r\n")
        return int(head.split()[1]), _headers(head), body

    def test_refusals(self) -> None:
        """
        No upgrade headers: "Upgrade request required"; a WebSocket without its key or
        with no protocol the server speaks, a missing container, a missing command and
        no streams: 400 with the reason; SPDY with no common protocol: 403 listing
        what the server accepts.
        """
        ws = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": WS_KEY, "Sec-WebSocket-Protocol": "v5.channel.k8s.io"}
        spdy = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                "X-Stream-Protocol-Version": "v4.channel.k8s.io"}
        cases = [
            ("POST", "exec?command=ls&stdout=true", {}, "Upgrade request required"),
            ("GET", "exec?command=ls&stdout=true", {**ws, "Sec-WebSocket-Key": "c2hvcnQ="},
             "unable to upgrade: Sec-WebSocket-Key is not 16 bytes of base64"),
            ("GET", "exec?command=ls&stdout=true", {**ws, "Sec-WebSocket-Protocol": "v9.channel.k8s.io"},
             "unable to upgrade: unable to negotiate protocol: client supports [v9.channel.k8s.io],"
             " server supports [v5.channel.k8s.io v4.channel.k8s.io v4.base64.channel.k8s.io"
             " channel.k8s.io base64.channel.k8s.io]"),
            ("POST", "exec?command=ls&stdout=true&container=db", spdy,
             "container db is not valid for pod web-1"),
            ("POST", "exec?stdout=true", spdy, "you must specify at least 1 command"),
            ("POST", "exec?command=ls", spdy, "you must specify at least one of stdin, stdout, stderr"),
        ]
        for method, query, headers, message in cases:
            code, _, body = self.answer(method, query, headers)
            self.assertEqual((code, json.loads(body)["message"]), (400, message), query)
        code, headers, body = self.answer("POST", "exec?command=ls&stdout=true",
                                          {**spdy, "X-Stream-Protocol-Version": "v9.channel.k8s.io"})
        self.assertEqual((code, body), (403, (
            b"unable to upgrade: unable to negotiate protocol: client supports [v9.channel.k8s.io],"
            b" server accepts [v5.channel.k8s.io v4.channel.k8s.io v3.channel.k8s.io"
            b" v2.channel.k8s.io channel.k8s.io]\n")))
        self.assertEqual(self.standin.sessions, [])

    def test_forbidden(self) -> None:
        """
        A user who may read pods but not exec gets the RBAC Forbidden at once, and
        nothing is upgraded: SPDY's POST is refused ``create`` on pods/exec, the
        WebSocket GET first ``get`` (the apiserver checks both since 1.30).
        """
        for method, headers, verb in (
            ("POST", {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                      "X-Stream-Protocol-Version": "v4.channel.k8s.io"}, "create"),
            ("GET", {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": WS_KEY, "Sec-WebSocket-Protocol": "v5.channel.k8s.io"},
             "get"),
        ):
            code, _, body = self.answer(method, "exec?command=ls&stdout=true", headers, READER_TOKEN)
            self.assertEqual((code, json.loads(body)["message"]), (403, (
                f'pods "web-1" is forbidden: User "reader" cannot {verb} resource "pods/exec"'
                f' in API group "" in the namespace "default"')))
        self.assertEqual(self.standin.sessions, [])


class _SpdyClient:
    """
    A client L{SpdySession} talking to the stand-in through a L{_Conversation}.
    """

    def __init__(self, conversation: _Conversation) -> None:
        self.conversation = conversation
        self.outgoing: list[bytes] = []
        self.session = SpdySession(self.outgoing.append, client=True)
        self.session.record_frames = True

    def flush(self) -> None:
        while True:
            if self.outgoing:
                data = b"".join(self.outgoing)
                self.outgoing.clear()
                self.conversation.send(data)
            received = self.conversation.received()
            if not received and not self.outgoing:
                return
            self.session.receive(received)


class SpdyExecTests(_InMemory):
    """
    exec over SPDY/3.1.
    """

    def upgrade(self, query: str, after: bytes = b"") -> None:
        head = self.conversation.request(
            "POST", f"/api/v1/namespaces/default/pods/web-1/exec?{query}", {
                "Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                "X-Stream-Protocol-Version": ["v4.channel.k8s.io", "v3.channel.k8s.io",
                                              "v2.channel.k8s.io", "channel.k8s.io"],
                "Content-Length": "0",
            }, after)
        headers = _headers(head)
        self.assertEqual(
            (head.split(b"\r\n")[0], headers["connection"], headers["upgrade"],
             headers["x-stream-protocol-version"]),
            (b"HTTP/1.1 101 Switching Protocols", "Upgrade", "SPDY/3.1", "v4.channel.k8s.io"),
        )

    def test_cat(self) -> None:
        """
        Streams named by streamType get SYN_REPLY; stdin (its SYN_STREAM sent with the
        request head) reaches cat; FIN on stdin ends it; stdout is half-closed, the
        Success Status goes on the error stream, and GOAWAY follows.
        """
        compressor = HeaderCompressor()
        early = encode_frame(SynStream(1, {"streamtype": "error"}), compressor)
        self.upgrade("command=cat&stdin=true&stdout=true&stderr=true", early)
        client = _SpdyClient(self.conversation)
        # The client session must continue the compression stream it started.
        client.session._compressor = compressor
        client.session._next_stream_id = 3
        error_data: list[bytes] = []
        out: list[bytes] = []
        streams = {"stdin": client.session.open_stream({"streamtype": "stdin"}),
                   "stdout": client.session.open_stream({"streamtype": "stdout"}),
                   "stderr": client.session.open_stream({"streamtype": "stderr"})}
        streams["stdout"].on_data = out.append
        client.session.streams[1] = error_stream = type(streams["stdin"])(
            client.session, 1, (("streamtype", "error"),), 65536, 65536, replied=True)
        error_stream.on_data = error_data.append
        client.flush()
        streams["stdin"].write(b"\x00binary\xff" * 1000)
        streams["stdin"].close()
        client.flush()
        self.assertEqual(b"".join(out), b"\x00binary\xff" * 1000)
        self.assertTrue(streams["stdout"].remote_closed)
        self.assertTrue(error_stream.remote_closed)
        self.assertEqual(json.loads(b"".join(error_data)), SUCCESS)
        self.assertIn(GoAway(7), client.session.frames_received)
        self.assertEqual(self.standin.sessions[0].protocol, "v4.channel.k8s.io")
        # The server waits for the client to close, but not for ever.
        self.assertFalse(self.conversation.transport.disconnecting)
        self.clock.advance(10)
        self.assertTrue(self.conversation.transport.disconnecting)

    def test_exit_code(self) -> None:
        """
        A non-zero exit puts the NonZeroExitCode Status on the error stream.
        """
        self.upgrade("command=sh&command=-c&command=exit+3&stdout=true&stderr=true")
        client = _SpdyClient(self.conversation)
        error_data: list[bytes] = []
        error = client.session.open_stream({"streamtype": "error"})
        error.on_data = error_data.append
        client.session.open_stream({"streamtype": "stdout"})
        client.flush()
        self.assertEqual(error_data, [])  # stderr was asked for and not created yet
        client.session.open_stream({"streamtype": "stderr"})
        client.flush()
        self.assertEqual(json.loads(b"".join(error_data)), exit_status(3, "sh -c exit 3"))

    def test_tty(self) -> None:
        """
        With a TTY the client creates a resize stream instead of stderr; sizes sent on
        it (split anywhere) are parsed and recorded, and output comes with CR LF line
        ends.
        """
        self.upgrade("command=sh&command=-c&command=echo+a%3B+echo+b+%3E%262&stdout=true"
                     "&stderr=true&tty=true")
        client = _SpdyClient(self.conversation)
        out: list[bytes] = []
        client.session.open_stream({"streamtype": "error"})
        resize = client.session.open_stream({"streamtype": "resize"})
        resize.write(b'{"Width":120,"Height":30}{"Width":8')
        client.flush()
        resize.write(b'0,"Height":24}')
        stdout = client.session.open_stream({"streamtype": "stdout"})
        stdout.on_data = out.append
        client.flush()
        self.assertEqual(b"".join(out), b"a\r\nb\r\n")
        [session] = self.standin.sessions
        self.assertEqual((session.tty, session.sizes), (True, [(120, 30), (80, 24)]))

    def test_stdin_before_streams(self) -> None:
        """
        stdin data and its FIN sent before the last stream exists are kept and given
        to the command when it starts.
        """
        self.upgrade("command=cat&stdin=true&stdout=true")
        client = _SpdyClient(self.conversation)
        client.session.open_stream({"streamtype": "error"})
        stdin = client.session.open_stream({"streamtype": "stdin"})
        client.flush()
        stdin.write(b"early")
        stdin.close()
        client.flush()
        out: list[bytes] = []
        client.session.open_stream({"streamtype": "stdout"}).on_data = out.append
        client.flush()
        self.assertEqual(b"".join(out), b"early")
        self.assertEqual(self.standin.sessions[0].status, ExitStatus(0))

    def test_streams_never_created(self) -> None:
        """
        A client that does not create every stream it asked for is cut off after 30 s.
        """
        self.upgrade("command=cat&stdin=true&stdout=true")
        client = _SpdyClient(self.conversation)
        client.session.open_stream({"streamtype": "error"})
        client.flush()
        self.clock.advance(29)
        self.assertFalse(self.conversation.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.conversation.transport.disconnecting)


class PortForwardTests(_InMemory):
    """
    port-forward over SPDY/3.1, and tunnelled in a WebSocket.
    """

    def forward(self) -> _SpdyClient:
        head = self.conversation.request(
            "POST", "/api/v1/namespaces/default/pods/web-1/portforward", {
                "Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                "X-Stream-Protocol-Version": "portforward.k8s.io", "Content-Length": "0",
            })
        self.assertEqual(_headers(head)["x-stream-protocol-version"], "portforward.k8s.io")
        return _SpdyClient(self.conversation)

    def test_splice(self) -> None:
        """
        An error and a data stream with the same requestID connect to the loopback
        port the pod's port maps to; bytes flow both ways; when the target closes,
        both streams are half-closed.
        """
        client = self.forward()
        headers = {"port": "80", "requestid": "0"}
        error = client.session.open_stream({"streamtype": "error", **headers})
        data = client.session.open_stream({"streamtype": "data", **headers})
        received: list[bytes] = []
        data.on_data = received.append
        data.write(b"GET / HTTP/1.0\r\n\r\n")
        client.flush()
        [(host, port, factory, _, _)] = self.memory.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        local = factory.buildProtocol(None)
        local_transport = StringTransport()
        local.makeConnection(local_transport)
        self.assertEqual(local_transport.value(), b"GET / HTTP/1.0\r\n\r\n")
        local.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nhello")
        local.connectionLost(Failure(Exception("closed")))
        client.flush()
        self.assertEqual(b"".join(received), b"HTTP/1.0 200 OK\r\n\r\nhello")
        self.assertTrue(data.remote_closed)
        self.assertTrue(error.remote_closed)
        self.assertEqual(self.standin.sessions[0].ports, [80])

    def test_client_half_close(self) -> None:
        """
        The client's FIN half-closes the target connection; if the target has not
        finished a second later, the forwarded connection is ended.
        """
        client = self.forward()
        headers = {"port": "80", "requestid": "7"}
        client.session.open_stream({"streamtype": "error", **headers})
        data = client.session.open_stream({"streamtype": "data", **headers})
        client.flush()
        local = self.memory.tcpClients[0][2].buildProtocol(None)
        local_transport = StringTransport()
        local.makeConnection(local_transport)
        data.close()
        client.flush()
        self.assertFalse(local_transport.disconnecting)
        self.memory.advance(1)
        client.flush()
        self.assertTrue(data.remote_closed)

    def test_backpressure(self) -> None:
        """
        While the client's write buffer is full, neither the client nor the target is
        read; while the target's is full, the client is not read; both resume after.
        """
        client = self.forward()
        headers = {"port": "80", "requestid": "0"}
        client.session.open_stream({"streamtype": "error", **headers})
        client.session.open_stream({"streamtype": "data", **headers})
        client.flush()
        local = self.memory.tcpClients[0][2].buildProtocol(None)
        local_transport = StringTransport()
        local.makeConnection(local_transport)
        client_transport = self.conversation.transport
        self.assertEqual((client_transport.producerState, local_transport.producerState),
                         ("producing", "producing"))
        client_transport.producer.pauseProducing()
        self.assertEqual((client_transport.producerState, local_transport.producerState),
                         ("paused", "paused"))
        local_transport.producer.pauseProducing()
        client_transport.producer.resumeProducing()
        self.assertEqual((client_transport.producerState, local_transport.producerState),
                         ("paused", "producing"))
        local_transport.producer.resumeProducing()
        self.assertEqual(client_transport.producerState, "producing")

    def test_nothing_listens(self) -> None:
        """
        A pod port that forwards nowhere: the kubelet's connection-refused message on
        the error stream.
        """
        client = self.forward()
        headers = {"port": "81", "requestid": "1"}
        error_data: list[bytes] = []
        error = client.session.open_stream({"streamtype": "error", **headers})
        error.on_data = error_data.append
        client.session.open_stream({"streamtype": "data", **headers})
        client.flush()
        self.assertIn(b"failed to connect to localhost:81", b"".join(error_data))
        self.assertIn(b"connect: connection refused", b"".join(error_data))
        self.assertTrue(error.remote_closed)
        self.assertEqual(self.memory.tcpClients, [])

    def test_tunnelled(self) -> None:
        """
        SPDY/3.1+portforward.k8s.io: the same streams, carried in binary WebSocket
        messages.
        """
        head = self.conversation.request(
            "GET", "/api/v1/namespaces/default/pods/web-1/portforward", {
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": WS_KEY,
                "Sec-WebSocket-Protocol": "SPDY/3.1+portforward.k8s.io",
            })
        self.assertEqual(_headers(head)["sec-websocket-protocol"], "SPDY/3.1+portforward.k8s.io")
        compressor = HeaderCompressor()
        frames = [SynStream(1, {"streamtype": "error", "port": "80", "requestid": "0"}),
                  SynStream(3, {"streamtype": "data", "port": "80", "requestid": "0"}),
                  DataFrame(3, b"hello")]
        for frame in frames:
            self.conversation.send(ws_frame(Frame(Opcode.BINARY, encode_frame(frame, compressor)),
                                            os.urandom(4)))
        local = self.memory.tcpClients[0][2].buildProtocol(None)
        local_transport = StringTransport()
        local.makeConnection(local_transport)
        self.assertEqual(local_transport.value(), b"hello")
        local.dataReceived(b"back")
        spdy = b"".join(f.payload for f in FrameParser(masked=False).feed(self.conversation.received()))
        decoded = FrameDecoder().feed(spdy)
        self.assertIn(DataFrame(3, b"back"), decoded)
        self.assertEqual(self.standin.sessions[0].transport, "websocket+spdy")
        self.conversation.send(ws_frame(Frame(Opcode.CLOSE, close_payload(1000)), os.urandom(4)))
        self.assertTrue(local_transport.disconnecting)
        self.assertTrue(self.standin.sessions[0].closed)
        self.assertEqual(parse_close_payload(
            FrameParser(masked=False).feed(self.conversation.received())[-1].payload), (1000, ""))


class MainTests(SynchronousTestCase):
    """
    The stand-in's command line.
    """

    def test_pod_port(self) -> None:
        """
        ``--pod-port POD:PORT=LOCAL_PORT`` makes a pod's port forward to a loopback port;
        a malformed one, or one for an unknown pod, stops the command.
        """
        from banyan_kproxy.testing.kubeapi import _build, _parse_args

        token = self.mktemp()
        with open(token, "w") as f:
            f.write("t0ken\n")
        base = ["--token", f"{token}=someone", "--pod", "web-1", "--pod", "ops/db-0"]
        standin, _ = _build(_parse_args(base + ["--pod-port", "web-1:80=18080",
                                                "--pod-port", "ops/db-0:5432=15432"]), Clock())
        self.assertEqual(standin._runtime("default", "web-1").ports, {80: ("127.0.0.1", 18080)})
        self.assertEqual(standin._runtime("ops", "db-0").ports, {5432: ("127.0.0.1", 15432)})
        for bad in ("web-1:80", "web-1:http=1", "nope:80=1"):
            self.assertRaises(SystemExit, _build, _parse_args(base + ["--pod-port", bad]), Clock())


# -- the real kubectl ---------------------------------------------------------------------------


def kubectl_binary(version: str) -> str:
    """
    The versioned kubectl beside the default one, or skip.
    """
    default = shutil.which("kubectl")
    if default is None:
        raise SkipTest("kubectl is not on PATH")
    path = os.path.join(os.path.dirname(os.path.realpath(default)), f"kubectl.{version}")
    if not os.path.exists(path):
        raise SkipTest(f"{path} does not exist")
    return path


class KubectlProcess(ProcessProtocol):
    """
    One kubectl run: stdin written and closed, stdout and stderr collected apart.
    """

    def __init__(self, stdin: bytes | None) -> None:
        self.stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.waiters: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for pattern, d in list(self.waiters):
            match = pattern.search(self.out)
            if match:
                self.waiters.remove((pattern, d))
                d.callback(match)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def wait_for(self, pattern: bytes) -> Deferred[re.Match[bytes]]:
        """
        Fires with the first match of ``pattern`` in stdout.
        """
        compiled = re.compile(pattern)
        match = compiled.search(self.out)
        if match:
            return succeed(match)
        d: Deferred[re.Match[bytes]] = Deferred()
        self.waiters.append((compiled, d))
        return d

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(code if code is not None else -1)


class _KubectlTestCase(TestCase):
    """
    The stand-in over TLS on 127.0.0.1, a tiny web server as the pod's port 80, and
    kubectl of the version the subclass names.
    """

    version = ""
    timeout = 120
    PAGE = b"<h1>served by the test web server</h1>\n"

    def setUp(self) -> None:
        self.binary = kubectl_binary(self.version)
        self.reactor = global_reactor
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.directory, "home"))
        ca = CertificateAuthority.generate()
        cert_file, key_file = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(
            self.directory, "server")
        self.ca_data = base64.b64encode(ca.cert_pem).decode()
        root = Resource()
        root.putChild(b"", Data(self.PAGE, "text/html"))
        self.web = TrackingFactory(Site(root))
        web_port = self.reactor.listenTCP(0, self.web, interface="127.0.0.1")
        self.addCleanup(lambda: web_port.stopListening().addCallback(lambda _: self.web.when_idle()))
        self.standin = KubeAPIStandIn(tokens=TOKENS, rbac_yaml=[READER_RBAC], clock=self.reactor)
        self.data = os.urandom(1 << 20)
        self.standin.add_pod("web-1", ports={80: web_port.getHost().port},
                             attach_banner="attached to web-1\n",
                             files={"/srv/data.bin": self.data, "/srv/dir/note.txt": "note\n"})
        self.listening = listen(self.reactor, self.standin,
                                tls=ServerTLS.from_files(cert_file, key_file))
        self.addCleanup(self.listening.stop)

    def kubeconfig(self, token: str) -> str:
        """
        A kubeconfig for the stand-in with a bearer token.
        """
        path = os.path.join(self.directory, f"kubeconfig-{token}")
        with open(path, "w") as f:
            json.dump({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "standin", "cluster": {
                    "server": self.listening.url, "certificate-authority-data": self.ca_data}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "standin", "context": {
                    "cluster": "standin", "user": "u", "namespace": "default"}}],
                "current-context": "standin",
            }, f)
        return path

    def spawn(self, *args: str, stdin: bytes | None = None, token: str = ADMIN_TOKEN) -> KubectlProcess:
        """
        Start kubectl (HOME in the test directory); the test stops it.
        """
        protocol = KubectlProcess(stdin)
        env = {"HOME": os.path.join(self.directory, "home"), "PATH": os.environ.get("PATH", "")}
        argv = [self.binary, "--kubeconfig", self.kubeconfig(token), "--request-timeout=30s", *args]
        process = self.reactor.spawnProcess(protocol, self.binary, argv, env=env,
                                            path=self.directory)

        def stop() -> Deferred[Any] | None:
            if protocol.ended.called:
                return None
            process.signalProcess("KILL")
            return protocol.ended

        self.addCleanup(stop)
        return protocol

    async def kubectl(self, *args: str, stdin: bytes | None = None, token: str = ADMIN_TOKEN,
                      timeout: float = 60) -> tuple[bytes, bytes, int]:
        """
        Run kubectl to its end (at most ``timeout`` seconds): stdout, stderr, exit code.
        """
        protocol = self.spawn(*args, stdin=stdin, token=token)
        code = await protocol.ended.addTimeout(timeout, self.reactor)
        return bytes(protocol.out), bytes(protocol.err), code

    def run_async(self, coroutine: Any) -> Deferred[Any]:
        """
        Run a test coroutine (trial on Twisted 22.4 does not run ``async def`` tests).
        """
        return Deferred.fromCoroutine(coroutine)

    async def port_forward(self) -> None:
        """
        Run ``kubectl port-forward pod/web-1 :80``, read the local port it prints,
        GET the page through it twice, stop kubectl.
        """
        protocol = self.spawn("port-forward", "pod/web-1", ":80")
        match = await protocol.wait_for(rb"Forwarding from 127\.0\.0\.1:(\d+) -> 80").addTimeout(
            30, self.reactor)
        port = int(match.group(1))
        agent = Agent(self.reactor)
        for _ in range(2):
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/".encode()).addTimeout(
                30, self.reactor)
            self.assertEqual(response.code, 200)
            self.assertEqual(await readBody(response), self.PAGE)
        [session] = self.standin.sessions
        self.assertEqual(session.ports, [80, 80])
        self.check_port_forward_transport(session)
        protocol.transport.signalProcess("TERM")
        await protocol.ended.addTimeout(30, self.reactor)
        await deferLater(self.reactor, 0, lambda: None)
        await gatherResults([self.web.when_idle()]).addTimeout(10, self.reactor)

    def check_transport(self, session: Any) -> None:
        """
        Check the exec session used this version's transport and protocol.
        """
        raise NotImplementedError

    def check_port_forward_transport(self, session: Any) -> None:
        """
        Check the port-forward session used this version's transport and protocol.
        """
        raise NotImplementedError


class _SessionTests:
    """
    The kubectl tests run with each version.
    """

    standin: KubeAPIStandIn
    data: bytes
    directory: str
    reactor: Any

    def test_exec_binary_round_trip(self) -> Deferred[None]:
        """
        ``kubectl exec -i POD -- cat`` with 4 MiB of random bytes on stdin gives the
        same bytes back on stdout, nothing on stderr, exit 0.
        """
        async def run() -> None:
            payload = os.urandom(4 * 1024 * 1024)
            out, err, code = await self.kubectl("exec", "-i", "web-1", "--", "cat", stdin=payload)
            self.assertEqual((code, err), (0, b""))
            self.assertEqual(len(out), len(payload))
            self.assertTrue(out == payload, "the bytes differ")
            self.assertEqual(self.standin.sessions[-1].status, ExitStatus(0))
            self.check_transport(self.standin.sessions[-1])

        return self.run_async(run())

    def test_exec_streams_and_exit_code(self) -> Deferred[None]:
        """
        stdout and stderr arrive apart, and ``exit 3`` in the pod makes kubectl exit 3.
        """
        async def run() -> None:
            out, err, code = await self.kubectl(
                "exec", "web-1", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
            self.assertEqual((out, err, code), (
                b"to-stdout\n", b"to-stderr\ncommand terminated with exit code 3\n", 3))

        return self.run_async(run())

    def test_exec_unknown_command(self) -> Deferred[None]:
        """
        An executable the container lacks: the runtime's error, exit 1.
        """
        async def run() -> None:
            out, err, code = await self.kubectl("exec", "web-1", "--", "nosuch")
            self.assertEqual((out, code), (b"", 1))
            self.assertEqual(err.decode(), (
                'error: Internal error occurred: error executing command in container: failed to'
                ' exec in container: failed to start exec "web-1": OCI runtime exec failed: exec'
                ' failed: unable to start container process: exec: "nosuch": executable file not'
                ' found in $PATH: unknown\n'))

        return self.run_async(run())

    def test_cp_both_ways(self) -> Deferred[None]:
        """
        ``kubectl cp`` copies a 1 MiB binary file into the pod's filesystem, copies the
        pod's file and a directory out, byte for byte, with the argv kubectl uses.
        """
        async def run() -> None:
            local = os.path.join(self.directory, "upload.bin")
            upload = os.urandom(1 << 20)
            with open(local, "wb") as f:
                f.write(upload)
            out, err, code = await self.kubectl("cp", local, "web-1:/tmp/upload.bin")
            self.assertEqual((code, err), (0, b""), out)
            self.assertTrue(self.standin.pod_filesystem("web-1").read("/tmp/upload.bin") == upload)
            download = os.path.join(self.directory, "download.bin")
            out, err, code = await self.kubectl("cp", "web-1:/srv/data.bin", download)
            self.assertEqual(code, 0, err)
            with open(download, "rb") as f:
                self.assertTrue(f.read() == self.data, "the downloaded bytes differ")
            tree = os.path.join(self.directory, "tree")
            out, err, code = await self.kubectl("cp", "web-1:/srv/dir", tree)
            self.assertEqual(code, 0, err)
            with open(os.path.join(tree, "note.txt"), "rb") as f:
                self.assertEqual(f.read(), b"note\n")
            argvs = [s.argv for s in self.standin.sessions]
            self.assertEqual(argvs, [
                ("test", "-d", "/tmp/upload.bin"),
                ("tar", "-xmf", "-", "-C", "/tmp"),
                ("tar", "cf", "-", "/srv/data.bin"),
                ("tar", "cf", "-", "/srv/dir"),
            ])

        return self.run_async(run())

    def test_attach(self) -> Deferred[None]:
        """
        ``kubectl attach -i`` shows the main process's banner and what it echoes.
        """
        async def run() -> None:
            out, err, code = await self.kubectl("attach", "-i", "web-1", stdin=b"hello, pod\n")
            self.assertEqual((out, code), (b"attached to web-1\nhello, pod\n", 0))
            self.assertEqual(self.standin.sessions[-1].subresource, "attach")

        return self.run_async(run())

    def test_port_forward(self) -> Deferred[None]:
        """
        ``kubectl port-forward pod/web-1 :80`` prints the local port; two HTTP GETs
        through it reach the web server the pod's port 80 maps to.
        """
        return self.run_async(self.port_forward())

    def test_forbidden(self) -> Deferred[None]:
        """
        A user who may read pods but not create pods/exec gets the apiserver's
        Forbidden message at once (no hang), and nothing was upgraded.
        """
        async def run() -> None:
            start = self.reactor.seconds()
            out, err, code = await self.kubectl("exec", "-i", "web-1", "--", "cat", stdin=b"x",
                                                token=READER_TOKEN, timeout=20)
            self.assertEqual((out, code), (b"", 1))
            self.assertEqual(err.decode(), (
                'Error from server (Forbidden): pods "web-1" is forbidden: User "reader" cannot'
                ' create resource "pods/exec" in API group "" in the namespace "default"\n'))
            self.assertLess(self.reactor.seconds() - start, 10)
            self.assertEqual(self.standin.sessions, [])

        return self.run_async(run())

class Kubectl133Tests(_SessionTests, _KubectlTestCase):
    """
    kubectl 1.33: WebSocket ``v5.channel.k8s.io`` for exec, attach and cp, and
    WebSocket-tunnelled SPDY for port-forward.
    """

    version = "1.33"

    def check_transport(self, session: Any) -> None:
        self.assertEqual((session.transport, session.protocol), ("websocket", "v5.channel.k8s.io"))
        [request] = [r for r in self.standin.requests if r.code == 101]
        self.assertEqual(request.method, "GET")
        self.assertEqual(request.header_values("Sec-WebSocket-Protocol"), [b"v5.channel.k8s.io"])

    def check_port_forward_transport(self, session: Any) -> None:
        self.assertEqual((session.transport, session.protocol),
                         ("websocket+spdy", "SPDY/3.1+portforward.k8s.io"))


class Kubectl129Tests(_SessionTests, _KubectlTestCase):
    """
    kubectl 1.29: SPDY/3.1 (it offers ``v5.channel.k8s.io`` down to ``channel.k8s.io``
    for exec, ``portforward.k8s.io`` for port-forward).
    """

    version = "1.29"

    def check_transport(self, session: Any) -> None:
        self.assertEqual((session.transport, session.protocol), ("spdy", "v5.channel.k8s.io"))
        [request] = [r for r in self.standin.requests if r.code == 101]
        self.assertEqual(request.method, "POST")
        self.assertEqual(request.header_values("X-Stream-Protocol-Version"), [
            b"v5.channel.k8s.io", b"v4.channel.k8s.io", b"v3.channel.k8s.io",
            b"v2.channel.k8s.io", b"channel.k8s.io"])

    def check_port_forward_transport(self, session: Any) -> None:
        self.assertEqual((session.transport, session.protocol), ("spdy", "portforward.k8s.io"))


class Kubectl131PortForwardTests(_KubectlTestCase):
    """
    kubectl 1.31, the first release to tunnel port-forward's SPDY in a WebSocket.
    """

    version = "1.31"

    def test_port_forward(self) -> Deferred[None]:
        """
        ``kubectl port-forward`` over ``SPDY/3.1+portforward.k8s.io`` reaches the web
        server twice.
        """
        return self.run_async(self.port_forward())

    def check_port_forward_transport(self, session: Any) -> None:
        self.assertEqual((session.transport, session.protocol),
                         ("websocket+spdy", "SPDY/3.1+portforward.k8s.io"))


class Kubectl130Tests(_KubectlTestCase):
    """
    kubectl 1.30: the first to exec over WebSocket by default; its port-forward
    still uses SPDY.
    """

    version = "1.30"

    def test_exec_binary_round_trip(self) -> Deferred[None]:
        """
        4 MiB through ``cat`` over ``v5.channel.k8s.io`` come back byte for byte.
        """
        return _SessionTests.test_exec_binary_round_trip(self)  # type: ignore[arg-type]

    def test_port_forward(self) -> Deferred[None]:
        """
        ``kubectl port-forward`` over SPDY reaches the web server twice.
        """
        return self.run_async(self.port_forward())

    def check_transport(self, session: Any) -> None:
        self.assertEqual((session.transport, session.protocol), ("websocket", "v5.channel.k8s.io"))

    def check_port_forward_transport(self, session: Any) -> None:
        self.assertEqual((session.transport, session.protocol), ("spdy", "portforward.k8s.io"))


class Kubectl132PortForwardTests(Kubectl131PortForwardTests):
    """
    kubectl 1.32 port-forward, tunnelled like 1.31's.
    """

    version = "1.32"
