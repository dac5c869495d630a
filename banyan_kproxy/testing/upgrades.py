"""
The upgraded connections of the Kubernetes API stand-in: ``pods/exec``, ``pods/attach``
and ``pods/portforward`` after the ``101 Switching Protocols``.

`take_over` lifts the connection out of twisted.web (which cannot hand a `Request`'s
connection to another protocol) the way autobahn's ``WebSocketResource`` does: the
HTTP channel stops being the transport's producer, the transport's protocol (the
``wrappedProtocol`` of a `ProtocolWrapper` such as TLS) becomes the new protocol,
reading resumes, and the bytes the channel had already buffered after the request
head are handed over first.  It works on Twisted 22.4 and on current releases.

Then, as kube-apiserver, the kubelet and the container runtime together do:

- `WebSocketRemoteCommand`: exec/attach over the WebSocket channel protocols
  (``v5.channel.k8s.io`` with its CLOSE signal, ``v4.channel.k8s.io``,
  ``v4.base64.channel.k8s.io``, ``channel.k8s.io``, ``base64.channel.k8s.io``): one
  byte (or, base64, one digit) of channel id before each message: 0 stdin, 1 stdout,
  2 stderr, 3 error (the exit status), 4 resize, 255 close.
- `SpdyRemoteCommand`: exec/attach over SPDY/3.1, a stream per channel named by its
  ``streamType`` header.
- `PortForward`: ``portforward.k8s.io`` over SPDY/3.1, either straight on the
  connection or tunnelled in WebSocket binary messages (``SPDY/3.1+portforward.k8s.io``,
  kubectl 1.31 and later): an error stream and a data stream per connection, paired
  by ``requestID``, spliced to a loopback port.

What the error channel carries: with v4 and v5 a ``metav1.Status`` (``Success``;
``Failure`` with reason ``NonZeroExitCode`` and the code as cause ``ExitCode``; or
``InternalError`` when the runtime could not start the command); with the older
protocols the message as text.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any

from attr import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from banyan_kproxy.testing.containers import (
    CommandNotFound,
    Container,
    ExitStatus,
    Process,
    runtime_error,
)
from banyan_kproxy.testing.spdy import (
    RstStatus,
    SpdyProtocol,
    SpdySession,
    SpdyStream,
)
from banyan_kproxy.testing.websocket import CloseCode, WebSocketProtocol, lose_connection

_log = Logger()

# Channel ids of the remote command protocols.
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255

#: WebSocket exec/attach protocols, best first, and whether they carry base64 text.
WEBSOCKET_EXEC_PROTOCOLS: dict[str, bool] = {
    "v5.channel.k8s.io": False,
    "v4.channel.k8s.io": False,
    "v4.base64.channel.k8s.io": True,
    "channel.k8s.io": False,
    "base64.channel.k8s.io": True,
}
#: SPDY exec/attach protocols (``X-Stream-Protocol-Version``), best first.
SPDY_EXEC_PROTOCOLS = (
    "v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
    "channel.k8s.io",
)
#: The port-forward protocol, and its name when tunnelled in a WebSocket.
PORTFORWARD_PROTOCOL = "portforward.k8s.io"
TUNNELED_PORTFORWARD_PROTOCOL = "SPDY/3.1+portforward.k8s.io"

#: How long the server waits for a client to create its SPDY streams (kubelet: 30 s).
STREAM_CREATION_TIMEOUT = 30.0
#: How long the server waits for the client to close after the session ended.
FINISH_TIMEOUT = 10.0


# -- taking the connection over ----------------------------------------------------------


def response_head(headers: Sequence[tuple[str, str]]) -> bytes:
    """
    The bytes of a ``101 Switching Protocols`` response with ``headers``.
    """
    lines = ["HTTP/1.1 101 Switching Protocols"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _ReadGate:
    """
    Stops a transport reading while anyone holds the gate.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.holds = 0

    def hold(self) -> None:
        self.holds += 1
        if self.holds == 1:
            self.transport.pauseProducing()

    def release(self) -> None:
        if self.holds:
            self.holds -= 1
            if not self.holds:
                self.transport.resumeProducing()


@implementer(IPushProducer)
class _WhileFull:
    """
    The producer registered on a transport: while its write buffer is full, the
    gates are held.
    """

    def __init__(self, gates: list[_ReadGate]) -> None:
        self.gates = gates
        self.paused = False

    def add(self, gate: _ReadGate) -> None:
        self.gates.append(gate)
        if self.paused:
            gate.hold()

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            for gate in self.gates:
                gate.hold()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            for gate in self.gates:
                gate.release()

    def stopProducing(self) -> None:
        self.paused = False


class Flow:
    """
    Backpressure for one upgraded connection, in the manner of Twisted's
    ``portforward.py``: while the client's write buffer is full, nothing more is read,
    neither from the client (so ``cat`` cannot pile up output) nor from the loopback
    connections a port-forward feeds it from; while a loopback connection's write
    buffer is full, the client is not read.  Memory stays bounded by the buffers.
    """

    def __init__(self) -> None:
        self._client: _ReadGate | None = None
        self._output: _WhileFull | None = None

    def attach(self, transport: Any) -> None:
        """
        Watch the client connection (`take_over` does this).
        """
        self._client = _ReadGate(transport)
        self._output = _WhileFull([self._client])
        transport.registerProducer(self._output, True)

    def add_local(self, transport: Any) -> None:
        """
        Watch a loopback connection spliced to the client.
        """
        if self._client is None or self._output is None:
            return
        self._output.add(_ReadGate(transport))
        transport.registerProducer(_WhileFull([self._client]), True)

    @property
    def client_paused(self) -> bool:
        """
        Whether reading from the client is held back now.
        """
        return self._client is not None and self._client.holds > 0


def take_over(request: Request, protocol: Protocol, head: bytes, clock: IReactorTime,
              flow: Flow | None = None) -> None:
    """
    Answer ``request`` with ``head`` (a complete 101 response) and give its
    connection to ``protocol``, with every byte the client sent after the request;
    ``flow`` (a new `Flow` by default) then applies backpressure to it.

    Call from ``render`` (and return ``NOT_DONE_YET``).  The swap happens on the next
    reactor turn, once twisted.web has finished with the request it is parsing; until
    then the channel keeps buffering what arrives.
    """
    channel = request.channel
    # Bytes LineReceiver still holds after the request head: take them now, or the
    # channel would parse them as the next request (Twisted 22.4, line mode).
    leftover = bytes(getattr(channel, "_buffer", b""))
    channel._buffer = b""

    def swap() -> None:
        transport = channel.transport
        if request.channel is None or transport is None:
            return  # the client went away meanwhile
        pending = leftover + b"".join(getattr(channel, "_dataBuffer", []))
        channel._dataBuffer = []
        transport.unregisterProducer()
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        transport.write(head)
        protocol.makeConnection(transport)
        # The channel pauses reading while a request is handled (Twisted 16+).
        transport.resumeProducing()
        (flow or Flow()).attach(transport)
        if pending:
            protocol.dataReceived(pending)

    clock.callLater(0, swap)


# -- what a session asks for, and its record ---------------------------------------------


@frozen
class ExecOptions:
    """
    The streams an exec or attach asked for (``PodExecOptions`` /
    ``PodAttachOptions``).
    """

    subresource: str
    container: str
    argv: tuple[str, ...] = ()
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    tty: bool = False


@define(eq=False)
class StreamSession:
    """
    One upgraded session the stand-in served, for tests to inspect.

    ``transport`` is ``websocket``, ``spdy`` or ``websocket+spdy`` (port-forward
    tunnelled in WebSocket); ``protocol`` the negotiated sub-protocol; ``status`` how
    the command ended (exec/attach); ``sizes`` the terminal sizes received; ``ports``
    the pod ports a port-forward connected to, one entry per connection.
    """

    namespace: str
    pod: str
    subresource: str
    transport: str
    protocol: str
    user: str | None
    container: str = ""
    argv: tuple[str, ...] = ()
    tty: bool = False
    status: ExitStatus | None = None
    sizes: list[tuple[int, int]] = field(factory=list)
    ports: list[int] = field(factory=list)
    closed: bool = False
    _waiters: list[Deferred[None]] = field(factory=list)

    def when_closed(self) -> Deferred[None]:
        """
        A Deferred that fires once the connection has closed.
        """
        if self.closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def mark_closed(self) -> None:
        """
        Record that the connection closed and fire the waiters.
        """
        if not self.closed:
            self.closed = True
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)


def status_message(options: ExecOptions, status: ExitStatus, versioned: bool) -> bytes:
    """
    What the error channel carries when a command ended: a ``metav1.Status`` for the
    v4/v5 protocols (``versioned``), text (nothing on success) for the older ones.
    """
    if status.error is not None:
        message = (
            "Internal error occurred: error executing command in container: failed to exec"
            f' in container: failed to start exec "{options.container}": {status.error}'
        )
        body: dict[str, Any] = {
            "metadata": {}, "status": "Failure", "message": message, "reason": "InternalError",
            "details": {"causes": [{"message": message.split(": ", 1)[1]}]}, "code": 500,
        }
    elif status.code == 0:
        body = {"metadata": {}, "status": "Success"}
    else:
        argv = " ".join(options.argv) if options.argv else options.subresource
        message = (
            f"command terminated with non-zero exit code: error executing command [{argv}],"
            f" exit code {status.code}"
        )
        body = {
            "metadata": {}, "status": "Failure", "message": message, "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(status.code)}]},
        }
    if versioned:
        return json.dumps(body, separators=(",", ":")).encode("utf-8")
    return b"" if status.success else body["message"].encode("utf-8")


class _Command:
    """
    The process side of an exec or attach, shared by both transports: starts the
    process, forwards its output, reports its end.
    """

    def __init__(self, options: ExecOptions, container: Container, record: StreamSession,
                 write: Callable[[int, bytes], Any], finish: Callable[[ExitStatus], Any]) -> None:
        self.options = options
        self.container = container
        self.record = record
        self._write = write
        self._finish = finish
        self.process: Process | None = None
        # Input that came before the process started (SPDY: before every stream).
        self._early: list[bytes] = []
        self._early_eof = False
        self._resize_text = ""

    def start(self) -> None:
        """
        Start the command (or the attachment), or finish at once when the runtime
        cannot start it.
        """
        options = self.options
        stdout = self._output(STDOUT) if options.stdout else _discard
        stderr = self._output(STDERR) if options.stderr and not options.tty else stdout
        try:
            if options.subresource == "attach":
                self.process = self.container.attach(
                    stdout=stdout, on_exit=self._exited, stdin=options.stdin, tty=options.tty
                )
            else:
                self.process = self.container.exec(
                    options.argv, stdout=stdout, stderr=stderr, on_exit=self._exited,
                    stdin=options.stdin, tty=options.tty,
                )
        except CommandNotFound:
            self._exited(ExitStatus(126, runtime_error(options.argv)))
            return
        self.process.start()
        early, self._early = self._early, []
        for data in early:
            self.process.feed_stdin(data)
        if self._early_eof:
            self.process.close_stdin()

    def _output(self, channel: int) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            if data:
                self._write(channel, data)

        return write

    def _exited(self, status: ExitStatus) -> None:
        self.record.status = status
        self._finish(status)

    def stdin(self, data: bytes) -> None:
        """
        Input from the client.
        """
        if self.process is not None:
            self.process.feed_stdin(data)
        else:
            self._early.append(data)

    def stdin_closed(self) -> None:
        """
        The client closed stdin.
        """
        if self.process is not None:
            self.process.close_stdin()
        else:
            self._early_eof = True

    def resize(self, data: bytes) -> None:
        """
        Terminal size events: a stream of JSON objects ``{"Width": W, "Height": H}``,
        which may arrive split anywhere.
        """
        decoder = json.JSONDecoder()
        text = (self._resize_text + data.decode("utf-8", "replace")).lstrip()
        self._resize_text = ""
        while text:
            try:
                size, end = decoder.raw_decode(text)
            except ValueError:
                # Incomplete: keep it for the next piece (garbage is dropped at 4 KiB).
                self._resize_text = text if len(text) < 4096 else ""
                return
            text = text[end:].lstrip()
            if isinstance(size, dict):
                pair = (int(size.get("Width", 0)), int(size.get("Height", 0)))
                self.record.sizes.append(pair)
                if self.process is not None:
                    self.process.resize(*pair)

    def kill(self) -> None:
        """
        The client went away.
        """
        if self.process is not None:
            self.process.kill()


def _discard(data: bytes) -> None:
    return None


# -- exec and attach over WebSocket --------------------------------------------------------


class WebSocketRemoteCommand:
    """
    exec/attach over a WebSocket channel protocol (a `WebSocketProtocol` handler).

    The server first sends an empty message on the lowest channel it writes (as
    kube-apiserver does), then output as it comes; when the command ends, the status
    on the error channel and a close frame.
    """

    def __init__(self, protocol_name: str, options: ExecOptions, container: Container,
                 record: StreamSession) -> None:
        self.protocol_name = protocol_name
        self._base64 = WEBSOCKET_EXEC_PROTOCOLS.get(protocol_name, False)
        self._versioned = protocol_name.startswith(("v4.", "v5."))
        self._close_signal = protocol_name.startswith("v5.")
        self.options = options
        self.command = _Command(options, container, record, self._write, self._finished)
        self.record = record
        self._ws: WebSocketProtocol | None = None
        self._done = False

    def websocket_opened(self, protocol: WebSocketProtocol) -> None:
        """
        Announce the lowest channel and start the command.
        """
        self._ws = protocol
        first = STDOUT if self.options.stdout else STDERR if self.options.stderr else ERROR
        self._write(first, b"", force=True)
        self.command.start()

    def _write(self, channel: int, data: bytes, force: bool = False) -> None:
        if self._ws is None or (self._done and not force):
            return
        if self._base64:
            self._ws.send(bytes([ord("0") + channel]) + base64.b64encode(data), binary=False)
        else:
            self._ws.send(bytes([channel]) + data)

    def _finished(self, status: ExitStatus) -> None:
        if self._done:
            return
        message = status_message(self.options, status, self._versioned)
        if message:
            self._write(ERROR, message)
        self._done = True
        assert self._ws is not None
        self._ws.close(CloseCode.NORMAL)

    def message_received(self, payload: bytes, binary: bool) -> None:
        """
        Stdin, resize and CLOSE messages from the client.
        """
        if not payload:
            return
        if self._base64:
            channel = payload[0] - ord("0")
            try:
                data = base64.b64decode(payload[1:])
            except ValueError:
                return
        else:
            channel, data = payload[0], payload[1:]
        if channel == STDIN and self.options.stdin:
            self.command.stdin(data)
        elif channel == RESIZE:
            self.command.resize(data)
        elif channel == CLOSE and self._close_signal and data[:1] == bytes([STDIN]):
            self.command.stdin_closed()

    def websocket_closed(self, code: int | None, reason: str) -> None:
        """
        The connection closed: stop the command if it still runs.
        """
        self._done = True
        self.command.kill()
        self.record.mark_closed()


# -- exec and attach over SPDY ----------------------------------------------------------------


class SpdyRemoteCommand:
    """
    exec/attach over SPDY/3.1: the client opens one stream per channel (``error``,
    ``stdin``, ``stdout``, ``stderr``, ``resize``); once all it asked for exist the
    command starts.  At its end the output streams are half-closed, the status goes
    on the error stream, and GOAWAY follows.
    """

    def __init__(self, protocol_name: str, options: ExecOptions, container: Container,
                 record: StreamSession, clock: IReactorTime) -> None:
        self.protocol_name = protocol_name
        self._versioned = protocol_name.startswith(("v4.", "v5."))
        self.options = options
        self.record = record
        self._clock = clock
        self.command = _Command(options, container, record, self._write, self._finished)
        self.streams: dict[str, SpdyStream] = {}
        self.expected = {"error"}
        if options.stdin:
            self.expected.add("stdin")
        if options.stdout:
            self.expected.add("stdout")
        if options.stderr and not options.tty:
            self.expected.add("stderr")
        if options.tty and protocol_name != "channel.k8s.io" and protocol_name != "v2.channel.k8s.io":
            self.expected.add("resize")
        self.session: SpdySession | None = None
        self._close: Callable[[], Any] = lambda: None
        self._timer: IDelayedCall | None = None
        self._started = False
        self._done = False

    def connected(self, session: SpdySession, close: Callable[[], Any]) -> None:
        """
        The SPDY session is up; ``close`` closes the connection.
        """
        self.session = session
        self._close = close
        self._timer = self._clock.callLater(STREAM_CREATION_TIMEOUT, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        _log.warn("exec: the client created streams {got}, not {wanted}; closing",
                  got=sorted(self.streams), wanted=sorted(self.expected))
        self._close()

    def stream_opened(self, stream: SpdyStream) -> None:
        """
        A channel stream from the client.
        """
        kind = (stream.header("streamtype") or "").lower()
        if kind not in ("error", "stdin", "stdout", "stderr", "resize") or kind in self.streams:
            stream.reset(RstStatus.REFUSED_STREAM)
            return
        stream.reply()
        self.streams[kind] = stream
        if kind == "stdin":
            stream.on_data = self.command.stdin
            stream.on_end = self.command.stdin_closed
            stream.on_reset = lambda status: self.command.stdin_closed()
        elif kind == "resize":
            stream.on_data = self.command.resize
        if not self._started and self.expected <= set(self.streams):
            self._started = True
            self._cancel_timer()
            self.command.start()

    def _write(self, channel: int, data: bytes) -> None:
        stream = self.streams.get({STDOUT: "stdout", STDERR: "stderr"}.get(channel, ""))
        if stream is not None and not self._done:
            stream.write(data)

    def _finished(self, status: ExitStatus) -> None:
        if self._done:
            return
        self._done = True
        for kind in ("stdout", "stderr"):
            if kind in self.streams:
                self.streams[kind].close()
        error = self.streams["error"]
        message = status_message(self.options, status, self._versioned)
        if message:
            error.write(message)
        error.close()
        assert self.session is not None
        self.session.go_away()
        # Let the client read everything and close; close ourselves if it does not.
        self._timer = self._clock.callLater(FINISH_TIMEOUT, self._give_up)

    def _give_up(self) -> None:
        self._timer = None
        self._close()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connection_lost(self) -> None:
        """
        The connection closed.
        """
        self._cancel_timer()
        self._done = True
        self.command.kill()
        self.record.mark_closed()


# -- port forwarding ----------------------------------------------------------------------------


class _LocalConnection(Protocol):
    """
    The loopback TCP connection one forwarded connection is spliced to.
    """

    def __init__(self, pair: _ForwardPair) -> None:
        self.pair = pair
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.pair.local_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.pair.from_local(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.pair.local_lost()
        if not self.lost.called:
            self.lost.callback(None)


class _LocalFactory(ClientFactory):
    def __init__(self, pair: _ForwardPair) -> None:
        self.pair = pair

    def buildProtocol(self, addr: Any) -> _LocalConnection:
        return _LocalConnection(self.pair)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.pair.connect_failed(reason)


@define(eq=False)
class _ForwardPair:
    """
    The error and data streams of one forwarded connection, and its local end.
    """

    forward: PortForward
    request_id: str
    port: int
    error: SpdyStream | None = None
    data: SpdyStream | None = None
    local: _LocalConnection | None = None
    buffered: list[bytes] = field(factory=list)
    client_ended: bool = False
    finished: bool = False
    local_closed: bool = False
    grace: IDelayedCall | None = None

    #: After one direction ends, how long the other may take (containerd: 1 s).
    GRACE = 1.0

    def start(self) -> None:
        target = self.forward.target(self.port)
        self.forward.record.ports.append(self.port)
        if target is None:
            self.fail_with(
                f"error forwarding port {self.port} to pod {self.forward.record.pod}, uid :"
                f" failed to connect to localhost:{self.port} inside namespace"
                f' "{self.forward.record.pod}", IPv4: dial tcp4 127.0.0.1:{self.port}:'
                f" connect: connection refused IPv6 dial tcp6 [::1]:{self.port}: connect:"
                f" connection refused "
            )
            return
        host, port = target
        self.forward.reactor.connectTCP(host, port, _LocalFactory(self), timeout=10)

    def local_connected(self, local: _LocalConnection) -> None:
        self.local = local
        self.forward.locals.add(local)
        self.forward.flow.add_local(local.transport)
        if self.finished:
            local.transport.abortConnection()
            return
        for chunk in self.buffered:
            local.transport.write(chunk)
        self.buffered = []
        if self.client_ended:
            self._half_close_local()

    def connect_failed(self, reason: Failure) -> None:
        self.fail_with(
            f"error forwarding port {self.port} to pod {self.forward.record.pod}, uid :"
            f" failed to connect to localhost:{self.port}: {reason.getErrorMessage()}"
        )

    def fail_with(self, message: str) -> None:
        if self.error is not None and not self.finished:
            self.error.write(message.encode("utf-8"))
        self.finish()

    def from_client(self, data: bytes) -> None:
        if self.finished:
            return
        if self.local is not None:
            self.local.transport.write(data)
        else:
            self.buffered.append(data)

    def client_end(self) -> None:
        self.client_ended = True
        if self.local is not None and not self.finished:
            self._half_close_local()

    def _half_close_local(self) -> None:
        # Pass the client's FIN on and give the target a moment to finish answering.
        assert self.local is not None
        transport = self.local.transport
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        if self.grace is None and not self.finished:
            self.grace = self.forward.reactor.callLater(self.GRACE, self.finish)

    def client_reset(self, status: int) -> None:
        self.finish()

    def from_local(self, data: bytes) -> None:
        if self.data is not None:
            self.data.write(data)

    def local_lost(self) -> None:
        self.local_closed = True
        self.finish()

    def finish(self) -> None:
        """
        End the forwarded connection: FIN both streams, close the local end.
        """
        if self.grace is not None and self.grace.active():
            self.grace.cancel()
        self.grace = None
        if self.finished:
            return
        self.finished = True
        for stream in (self.data, self.error):
            if stream is not None:
                stream.close()
        if self.local is not None and not self.local_closed:
            self.local.transport.abortConnection()
        self.forward.pairs.pop(self.request_id, None)


class PortForward:
    """
    ``portforward.k8s.io``: for each connection the client opens an error stream and
    a data stream with the same ``requestID`` and ``port`` headers; the data stream is
    spliced to the loopback port ``target(port)`` names (``None``: nothing listens,
    and the error stream says so, as the kubelet does).
    """

    def __init__(self, record: StreamSession, target: Callable[[int], tuple[str, int] | None],
                 reactor: Any, flow: Flow | None = None) -> None:
        self.record = record
        self.target = target
        self.reactor = reactor
        self.flow = flow or Flow()
        self.pairs: dict[str, _ForwardPair] = {}
        self.locals: set[_LocalConnection] = set()
        self.session: SpdySession | None = None
        self._close: Callable[[], Any] = lambda: None

    def connected(self, session: SpdySession, close: Callable[[], Any]) -> None:
        """
        The SPDY session is up.
        """
        self.session = session
        self._close = close

    def stream_opened(self, stream: SpdyStream) -> None:
        """
        An error or data stream from the client.
        """
        kind = (stream.header("streamtype") or "").lower()
        port_text = stream.header("port") or ""
        if kind not in ("error", "data") or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            stream.reset(RstStatus.PROTOCOL_ERROR)
            return
        request_id = stream.header("requestid")
        if request_id is None:
            # Clients before requestID: the data stream follows its error stream.
            request_id = str(stream.id if kind == "error" else stream.id - 2)
        pair = self.pairs.get(request_id)
        if pair is None:
            pair = self.pairs[request_id] = _ForwardPair(self, request_id, int(port_text))
        if getattr(pair, kind) is not None:
            stream.reset(RstStatus.PROTOCOL_ERROR)
            return
        stream.reply()
        setattr(pair, kind, stream)
        if kind == "data":
            stream.on_data = pair.from_client
            stream.on_end = pair.client_end
            stream.on_reset = pair.client_reset
        else:
            stream.on_reset = pair.client_reset
        if pair.data is not None and pair.error is not None:
            pair.start()

    def connection_lost(self) -> None:
        """
        The client went away: cut every local connection.
        """
        for pair in list(self.pairs.values()):
            pair.finish()
        for local in list(self.locals):
            if local.transport is not None:
                local.transport.abortConnection()
        self.record.mark_closed()

    def when_locals_closed(self) -> Deferred[Any]:
        """
        Fires once every local connection has closed.
        """
        from twisted.internet.defer import gatherResults

        return gatherResults([local.lost for local in self.locals])


# -- carriers: SPDY straight on the connection, or inside a WebSocket ---------------------------


def spdy_protocol(app: SpdyRemoteCommand | PortForward) -> SpdyProtocol:
    """
    A protocol running ``app`` over SPDY/3.1 straight on the connection.
    """
    holder: list[SpdyProtocol] = []

    def build(send: Callable[[bytes], Any], on_error: Callable[[str], Any]) -> SpdySession:
        def failed(message: str) -> None:
            _log.warn("SPDY protocol error from the client: {message}", message=message)
            on_error(message)

        session = SpdySession(send, on_stream=app.stream_opened, on_error=failed)
        app.connected(session, lambda: lose_connection(holder[0].transport))
        return session

    protocol = SpdyProtocol(build, lambda reason: app.connection_lost())
    holder.append(protocol)
    return protocol


class WebSocketSpdyTunnel:
    """
    SPDY/3.1 carried in WebSocket binary messages (``SPDY/3.1+portforward.k8s.io``):
    message payloads joined are the SPDY byte stream both ways.
    """

    def __init__(self, app: PortForward) -> None:
        self.app = app
        self.session: SpdySession | None = None
        self._ws: WebSocketProtocol | None = None

    def websocket_opened(self, protocol: WebSocketProtocol) -> None:
        """
        Start the SPDY session inside the WebSocket.
        """
        self._ws = protocol
        self.session = SpdySession(
            protocol.send, on_stream=self.app.stream_opened,
            on_error=self._failed,
        )
        self.app.connected(self.session, lambda: protocol.close(CloseCode.NORMAL))

    def _failed(self, message: str) -> None:
        _log.warn("SPDY protocol error from the client: {message}", message=message)
        assert self._ws is not None
        self._ws.close(CloseCode.PROTOCOL_ERROR, "SPDY protocol error")

    def message_received(self, payload: bytes, binary: bool) -> None:
        """
        SPDY bytes (text messages are refused).
        """
        assert self.session is not None and self._ws is not None
        if not binary:
            self._ws.close(CloseCode.UNSUPPORTED_DATA, "binary messages only")
            return
        self.session.receive(payload)

    def websocket_closed(self, code: int | None, reason: str) -> None:
        """
        The WebSocket closed.
        """
        self.app.connection_lost()


def negotiate(offered: Sequence[str], supported: Sequence[str]) -> str | None:
    """
    The first protocol the client offered that the server supports (kubelet's rule).
    """
    return next((p for p in offered if p in supported), None)
