"""
Tests for L{banyan_kproxy.testing.websocket}: RFC 6455 framing, masking, message
reassembly, control frames, the closing handshake and the opening handshake.
"""

from __future__ import annotations

import os
import struct

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.testing.websocket import (
    CloseCode,
    Frame,
    FrameParser,
    HandshakeError,
    Opcode,
    WebSocketConnection,
    WebSocketProtocol,
    WebSocketProtocolError,
    accept_key,
    close_payload,
    encode_frame,
    handshake_response,
    mask,
    parse_close_payload,
)

KEY = b"\x37\xfa\x21\x3d"


class AcceptKeyTests(SynchronousTestCase):
    """
    The Sec-WebSocket-Accept computation.
    """

    def test_rfc_example(self) -> None:
        """
        The key and answer from RFC 6455 section 1.3.
        """
        self.assertEqual(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        self.assertEqual(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")


class MaskTests(SynchronousTestCase):
    """
    Masking XORs the payload with the repeated four-byte key.
    """

    def test_rfc_example(self) -> None:
        """
        RFC 6455 5.7: "Hello" masked with 37 fa 21 3d.
        """
        self.assertEqual(mask(b"Hello", KEY), bytes.fromhex("7f9f4d5158"))

    def test_involution(self) -> None:
        """
        Masking twice gives the payload back, for every length around the key size.
        """
        for size in range(0, 13):
            payload = os.urandom(size)
            self.assertEqual(mask(mask(payload, KEY), KEY), payload)

    def test_large(self) -> None:
        """
        A megabyte masks byte for byte like the definition.
        """
        payload = os.urandom(1 << 20)
        masked = mask(payload, KEY)
        self.assertEqual(len(masked), len(payload))
        for index in (0, 1, 2, 3, 4, 12345, len(payload) - 1):
            self.assertEqual(masked[index], payload[index] ^ KEY[index % 4])

    def test_key_length(self) -> None:
        """
        A key must have four bytes.
        """
        self.assertRaises(ValueError, mask, b"x", b"abc")


class FrameTests(SynchronousTestCase):
    """
    Encoding and decoding frames.
    """

    def test_rfc_examples(self) -> None:
        """
        The example frames of RFC 6455 5.7 encode and decode as given.
        """
        self.assertEqual(encode_frame(Frame(Opcode.TEXT, b"Hello")), bytes.fromhex("810548656c6c6f"))
        self.assertEqual(
            encode_frame(Frame(Opcode.TEXT, b"Hello"), KEY), bytes.fromhex("818537fa213d7f9f4d5158")
        )
        self.assertEqual(
            encode_frame(Frame(Opcode.TEXT, b"Hel", fin=False)) + encode_frame(
                Frame(Opcode.CONTINUATION, b"lo")),
            bytes.fromhex("010348656c") + bytes.fromhex("80026c6f"),
        )
        self.assertEqual(encode_frame(Frame(Opcode.PING, b"Hello")), bytes.fromhex("890548656c6c6f"))
        parser = FrameParser(masked=True)
        self.assertEqual(parser.feed(bytes.fromhex("818537fa213d7f9f4d5158")),
                         [Frame(Opcode.TEXT, b"Hello")])

    def test_length_encodings(self) -> None:
        """
        Payloads of 125, 126, 65535, 65536 and 70000 bytes use the 7-bit, 16-bit and
        64-bit lengths and decode back, masked and unmasked.
        """
        for size, header in ((125, 2), (126, 4), (65535, 4), (65536, 10), (70000, 10)):
            payload = os.urandom(size)
            plain = encode_frame(Frame(Opcode.BINARY, payload))
            self.assertEqual(len(plain), header + size)
            self.assertEqual(FrameParser(masked=False).feed(plain), [Frame(Opcode.BINARY, payload)])
            masked = encode_frame(Frame(Opcode.BINARY, payload), KEY)
            self.assertEqual(len(masked), header + 4 + size)
            self.assertEqual(FrameParser(masked=True).feed(masked), [Frame(Opcode.BINARY, payload)])
        self.assertEqual(encode_frame(Frame(Opcode.BINARY, b"x" * 126))[1:4], b"\x7e\x00\x7e")
        self.assertEqual(encode_frame(Frame(Opcode.BINARY, b"x" * 65536))[1:10],
                         b"\x7f" + struct.pack("!Q", 65536))

    def test_byte_by_byte(self) -> None:
        """
        Frames fed one byte at a time come out whole, in order.
        """
        frames = [Frame(Opcode.BINARY, os.urandom(300)), Frame(Opcode.PING, b"p"),
                  Frame(Opcode.TEXT, "ü".encode(), fin=False), Frame(Opcode.CONTINUATION, b"")]
        data = b"".join(encode_frame(f, os.urandom(4)) for f in frames)
        parser = FrameParser(masked=True)
        out = []
        for byte in data:
            out.extend(parser.feed(bytes([byte])))
        self.assertEqual(out, frames)

    def test_errors(self) -> None:
        """
        Unmasked client frames, masked server frames, RSV bits, unknown opcodes,
        fragmented or long control frames and oversize frames are protocol errors.
        """
        cases = [
            (True, encode_frame(Frame(Opcode.BINARY, b"x")), CloseCode.PROTOCOL_ERROR),
            (False, encode_frame(Frame(Opcode.BINARY, b"x"), KEY), CloseCode.PROTOCOL_ERROR),
            (None, encode_frame(Frame(Opcode.BINARY, b"x", rsv=4)), CloseCode.PROTOCOL_ERROR),
            (None, encode_frame(Frame(3, b"x")), CloseCode.PROTOCOL_ERROR),
            (None, encode_frame(Frame(Opcode.PING, b"x", fin=False)), CloseCode.PROTOCOL_ERROR),
            (None, b"\x89\x7e\x00\x7e" + b"x" * 126, CloseCode.PROTOCOL_ERROR),
            (None, b"\x82\x7f" + struct.pack("!Q", 1 << 63), CloseCode.PROTOCOL_ERROR),
        ]
        for masked, data, code in cases:
            error = self.assertRaises(WebSocketProtocolError, FrameParser(masked=masked).feed, data)
            self.assertEqual(error.code, code)
        small = FrameParser(masked=None, max_frame_size=10)
        error = self.assertRaises(WebSocketProtocolError, small.feed,
                                  encode_frame(Frame(Opcode.BINARY, b"x" * 11)))
        self.assertEqual(error.code, CloseCode.MESSAGE_TOO_BIG)


class ClosePayloadTests(SynchronousTestCase):
    """
    Close frame payloads.
    """

    def test_round_trip(self) -> None:
        """
        Code and reason survive; an empty payload means no status.
        """
        self.assertEqual(parse_close_payload(close_payload(1000, "bye")), (1000, "bye"))
        self.assertEqual(parse_close_payload(close_payload(None)), (None, ""))
        self.assertEqual(close_payload(1001), b"\x03\xe9")

    def test_invalid(self) -> None:
        """
        A one-byte payload, a reserved code and a non-UTF-8 reason are refused.
        """
        self.assertRaises(WebSocketProtocolError, parse_close_payload, b"\x03")
        for code in (999, 1004, 1005, 1006, 1015, 5000):
            self.assertRaises(WebSocketProtocolError, parse_close_payload, struct.pack("!H", code))
        error = self.assertRaises(WebSocketProtocolError, parse_close_payload, b"\x03\xe8\xff")
        self.assertEqual(error.code, CloseCode.INVALID_PAYLOAD)


class ConnectionTests(SynchronousTestCase):
    """
    A server-side L{WebSocketConnection}.
    """

    def setUp(self) -> None:
        self.sent: list[bytes] = []
        self.messages: list[tuple[bytes, bool]] = []
        self.closes: list[tuple[int | None, str]] = []
        self.connection = WebSocketConnection(
            self.sent.append,
            on_message=lambda payload, binary: self.messages.append((payload, binary)),
            on_close=lambda code, reason: self.closes.append((code, reason)),
        )

    def client(self, *frames: Frame) -> None:
        self.connection.receive(b"".join(encode_frame(f, os.urandom(4)) for f in frames))

    def server_frames(self) -> list[Frame]:
        return FrameParser(masked=False).feed(b"".join(self.sent))

    def test_messages(self) -> None:
        """
        Binary and text messages arrive whole; fragments are joined, with control
        frames between them handled at once.
        """
        self.client(Frame(Opcode.BINARY, b"\x00\x01"), Frame(Opcode.TEXT, "héllo".encode()))
        self.client(Frame(Opcode.BINARY, b"ab", fin=False), Frame(Opcode.PING, b"hi"),
                    Frame(Opcode.CONTINUATION, b"cd", fin=False),
                    Frame(Opcode.CONTINUATION, b"ef"))
        self.assertEqual(self.messages, [(b"\x00\x01", True), ("héllo".encode(), False),
                                         (b"abcdef", True)])
        self.assertEqual(self.server_frames(), [Frame(Opcode.PONG, b"hi")])

    def test_send_unmasked_and_fragmented(self) -> None:
        """
        A server sends unmasked frames, fragmented when asked.
        """
        self.connection.send_message(b"0123456789", fragment_size=4)
        self.connection.send_message(b"text", binary=False)
        self.assertEqual(self.server_frames(), [
            Frame(Opcode.BINARY, b"0123", fin=False), Frame(Opcode.CONTINUATION, b"4567", fin=False),
            Frame(Opcode.CONTINUATION, b"89"), Frame(Opcode.TEXT, b"text"),
        ])

    def test_client_masks(self) -> None:
        """
        A client endpoint masks what it sends, with a fresh key each frame.
        """
        sent: list[bytes] = []
        client = WebSocketConnection(sent.append, on_message=lambda *a: None,
                                     on_close=lambda *a: None, client=True)
        client.send_message(b"payload")
        client.send_message(b"payload")
        self.assertEqual([f.payload for f in FrameParser(masked=True).feed(b"".join(sent))],
                         [b"payload", b"payload"])
        self.assertNotEqual(sent[0], sent[1])

    def test_peer_closes(self) -> None:
        """
        A close from the peer is echoed with its code and reported; nothing is sent
        after it.
        """
        self.client(Frame(Opcode.CLOSE, close_payload(1001, "going")))
        self.assertEqual(self.closes, [(1001, "going")])
        self.assertEqual(self.server_frames(), [Frame(Opcode.CLOSE, b"\x03\xe9")])
        self.connection.send_message(b"late")
        self.client(Frame(Opcode.BINARY, b"late"))
        self.assertEqual(len(self.server_frames()), 1)
        self.assertEqual(self.messages, [])

    def test_we_close(self) -> None:
        """
        Our close waits for the peer's; messages that arrive meanwhile are dropped,
        pings are not answered, and the handshake completes with the peer's close.
        """
        self.connection.close(1000, "done")
        self.assertEqual(self.connection.state, WebSocketConnection.CLOSING)
        self.client(Frame(Opcode.BINARY, b"x"), Frame(Opcode.PING, b""))
        self.assertEqual(self.messages, [])
        self.client(Frame(Opcode.CLOSE, close_payload(1000)))
        self.assertEqual(self.closes, [(1000, "")])
        self.assertEqual(self.server_frames(), [Frame(Opcode.CLOSE, close_payload(1000, "done"))])

    def test_close_without_status(self) -> None:
        """
        An empty close frame is reported as 1005 and echoed empty.
        """
        self.client(Frame(Opcode.CLOSE, b""))
        self.assertEqual(self.closes, [(CloseCode.NO_STATUS, "")])
        self.assertEqual(self.server_frames(), [Frame(Opcode.CLOSE, b"")])

    def test_protocol_errors_fail(self) -> None:
        """
        A continuation without a message, a new message inside a fragmented one, bad
        UTF-8 text and an unmasked frame each fail the connection with a close frame
        carrying the right code.
        """
        cases = [
            ([Frame(Opcode.CONTINUATION, b"x")], CloseCode.PROTOCOL_ERROR),
            ([Frame(Opcode.TEXT, b"a", fin=False), Frame(Opcode.TEXT, b"b")], CloseCode.PROTOCOL_ERROR),
            ([Frame(Opcode.TEXT, b"\xff")], CloseCode.INVALID_PAYLOAD),
        ]
        for frames, code in cases:
            self.setUp()
            self.client(*frames)
            self.assertEqual(self.closes[0][0], code)
            self.assertEqual(parse_close_payload(self.server_frames()[-1].payload)[0], code)
        self.setUp()
        self.connection.receive(encode_frame(Frame(Opcode.BINARY, b"x")))
        self.assertEqual(self.closes[0][0], CloseCode.PROTOCOL_ERROR)

    def test_connection_lost(self) -> None:
        """
        Losing the connection before the handshake completes reports 1006, once.
        """
        self.connection.connection_lost()
        self.connection.connection_lost()
        self.assertEqual(self.closes, [(CloseCode.ABNORMAL, "connection lost")])


class _Handler:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.protocol: WebSocketProtocol | None = None

    def websocket_opened(self, protocol: WebSocketProtocol) -> None:
        self.protocol = protocol
        self.events.append(("opened",))

    def message_received(self, payload: bytes, binary: bool) -> None:
        self.events.append(("message", payload, binary))
        assert self.protocol is not None
        self.protocol.send(payload[::-1])

    def websocket_closed(self, code: int | None, reason: str) -> None:
        self.events.append(("closed", code, reason))


class ProtocolTests(SynchronousTestCase):
    """
    L{WebSocketProtocol} on a transport.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.handler = _Handler()
        self.protocol = WebSocketProtocol(self.handler, self.clock, close_timeout=5)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def test_echo_and_peer_close(self) -> None:
        """
        Messages reach the handler; the peer's close is echoed and the server drops
        the TCP connection straight away.
        """
        self.protocol.dataReceived(encode_frame(Frame(Opcode.BINARY, b"abc"), KEY))
        self.protocol.dataReceived(encode_frame(Frame(Opcode.CLOSE, close_payload(1000)), KEY))
        frames = FrameParser(masked=False).feed(self.transport.value())
        self.assertEqual(frames, [Frame(Opcode.BINARY, b"cba"), Frame(Opcode.CLOSE, close_payload(1000))])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.handler.events[-1], ("closed", 1000, ""))

    def test_close_timeout(self) -> None:
        """
        When the peer never answers our close, the connection is dropped after the
        close timeout, and the handler hears of it once.
        """
        self.protocol.close(1000)
        self.clock.advance(4.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(None)
        self.assertEqual([e for e in self.handler.events if e[0] == "closed"],
                         [("closed", CloseCode.ABNORMAL, "connection lost")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_answered(self) -> None:
        """
        When the peer answers our close, the timer is cancelled.
        """
        self.protocol.close(1000)
        self.protocol.dataReceived(encode_frame(Frame(Opcode.CLOSE, close_payload(1000)), KEY))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HandshakeTests(SynchronousTestCase):
    """
    L{handshake_response} checks the opening handshake.
    """

    def headers(self, **overrides: str) -> dict[str, list[str]]:
        base = {
            "upgrade": ["websocket"],
            "connection": ["keep-alive, Upgrade"],
            "sec-websocket-version": ["13"],
            "sec-websocket-key": ["dGhlIHNhbXBsZSBub25jZQ=="],
            "sec-websocket-protocol": ["v5.channel.k8s.io, v4.channel.k8s.io"],
        }
        for key, value in overrides.items():
            base[key.replace("_", "-")] = [value] if value else []
        return base

    def respond(self, method: str = "GET", **overrides: str) -> list[tuple[str, str]]:
        headers = self.headers(**overrides)
        return handshake_response(
            method, lambda name: headers.get(name.lower(), []),
            lambda offered: offered[-1] if offered else None,
        )

    def test_valid(self) -> None:
        """
        A valid request gets Upgrade, Connection, the accept key and the chosen protocol.
        """
        self.assertEqual(self.respond(), [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("Sec-WebSocket-Protocol", "v4.channel.k8s.io"),
        ])
        self.assertNotIn("Sec-WebSocket-Protocol",
                         dict(self.respond(sec_websocket_protocol="")))

    def test_invalid(self) -> None:
        """
        POST, a missing upgrade, another version and a bad key are refused.
        """
        self.assertRaises(HandshakeError, self.respond, "POST")
        self.assertRaises(HandshakeError, self.respond, upgrade="h2c")
        self.assertRaises(HandshakeError, self.respond, connection="keep-alive")
        self.assertRaises(HandshakeError, self.respond, sec_websocket_version="8")
        self.assertRaises(HandshakeError, self.respond, sec_websocket_key="")
        self.assertRaises(HandshakeError, self.respond, sec_websocket_key="c2hvcnQ=")
