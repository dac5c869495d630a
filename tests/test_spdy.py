"""
Tests for L{banyan_kproxy.testing.spdy}: SPDY/3.1 frames, header compression with the
SPDY/3 dictionary, sessions, and flow control windows.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.testing.spdy import (
    DEFAULT_WINDOW,
    DICTIONARY,
    FLAG_FIN,
    MAX_DATA_CHUNK,
    DataFrame,
    FrameDecoder,
    GoAway,
    GoAwayStatus,
    HeaderCompressor,
    HeaderDecompressor,
    HeadersFrame,
    Ping,
    RstStatus,
    RstStream,
    Setting,
    Settings,
    SpdyProtocol,
    SpdyProtocolError,
    SpdySession,
    SpdyStream,
    SynReply,
    SynStream,
    UnknownControl,
    WindowUpdate,
    decode_header_block,
    encode_frame,
    encode_header_block,
)


class DictionaryTests(SynchronousTestCase):
    """
    The SPDY/3 header compression dictionary.
    """

    def test_bytes(self) -> None:
        """
        It is the draft's 1423 bytes: length-prefixed words from "options" to
        "origin", then the status lines, dates and media types, ending "enq=0.".
        """
        self.assertEqual(len(DICTIONARY), 1423)
        self.assertEqual(
            hashlib.sha256(DICTIONARY).hexdigest(),
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02",
        )
        self.assertTrue(DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head"))
        self.assertIn(b"\x00\x00\x00\x06200 OK\x00\x00\x00\x07version", DICTIONARY)
        self.assertTrue(DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0."))

    def test_zlib_header_names_the_dictionary(self) -> None:
        """
        A compressed block starts with a zlib header whose FDICT bit is set and whose
        DICTID is the dictionary's Adler-32, as a peer checks.
        """
        block = HeaderCompressor().compress((("streamtype", "error"),))
        cmf, flg = block[0], block[1]
        self.assertEqual(cmf & 0x0F, 8)
        self.assertTrue(flg & 0x20)
        self.assertEqual(struct.unpack("!I", block[2:6])[0], zlib.adler32(DICTIONARY))

    def test_needs_the_dictionary(self) -> None:
        """
        A plain zlib decompressor without the dictionary cannot read a block; one
        given it can.
        """
        block = HeaderCompressor().compress((("port", "80"),))
        self.assertRaises(zlib.error, zlib.decompressobj().decompress, block)
        raw = zlib.decompressobj(zdict=DICTIONARY).decompress(block)
        self.assertEqual(decode_header_block(raw), (("port", "80"),))


class HeaderBlockTests(SynchronousTestCase):
    """
    Name/value blocks and their compression.
    """

    def test_block_layout(self) -> None:
        """
        A 32-bit count, then each name and value after a 32-bit length; repeated
        names become one entry with NUL-separated values; names go lower case.
        """
        raw = encode_header_block((("StreamType", "data"), ("x", "1"), ("x", "2")))
        self.assertEqual(
            raw,
            struct.pack("!I", 2) + struct.pack("!I", 10) + b"streamtype" + struct.pack("!I", 4)
            + b"data" + struct.pack("!I", 1) + b"x" + struct.pack("!I", 3) + b"1\x002",
        )
        self.assertEqual(decode_header_block(raw),
                         (("streamtype", "data"), ("x", "1"), ("x", "2")))

    def test_malformed(self) -> None:
        """
        Truncated blocks, empty names and upper-case names are protocol errors.
        """
        good = encode_header_block((("a", "b"),))
        for bad in (good[:-1], good[:6], struct.pack("!II", 1, 0),
                    encode_header_block((("a", "b"),)).replace(b"a", b"A")):
            self.assertRaises(SpdyProtocolError, decode_header_block, bad)

    def test_shared_stream(self) -> None:
        """
        One compressor serves a whole connection: later blocks refer back to earlier
        ones (and get smaller), and one decompressor reads them in order.
        """
        compressor, decompressor = HeaderCompressor(), HeaderDecompressor()
        headers = (("streamtype", "data"), ("port", "8080"), ("requestid", "0"))
        blocks = [compressor.compress(headers) for _ in range(3)]
        self.assertLess(len(blocks[2]), len(blocks[0]))
        for block in blocks:
            self.assertEqual(decompressor.decompress(block), headers)
        self.assertRaises(SpdyProtocolError, HeaderDecompressor().decompress, blocks[1])


class FrameTests(SynchronousTestCase):
    """
    Every frame type encodes to the draft's layout and decodes back.
    """

    def round_trip(self, *frames: object) -> list[object]:
        compressor = HeaderCompressor()
        data = b"".join(encode_frame(f, compressor) for f in frames)  # type: ignore[arg-type]
        return FrameDecoder().feed(data)  # type: ignore[return-value]

    def test_round_trip(self) -> None:
        """
        Data, SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS and
        WINDOW_UPDATE frames survive encoding and decoding, in one stream.
        """
        frames = [
            SynStream(1, (("streamtype", "error"), ("port", "80")), associated_to=0,
                      priority=3, slot=0, flags=0),
            SynReply(1, (), FLAG_FIN),
            DataFrame(1, b"hello", FLAG_FIN),
            DataFrame(3, b""),
            RstStream(5, RstStatus.CANCEL),
            Settings(((0, Setting.INITIAL_WINDOW_SIZE, 1 << 20), (1, Setting.MAX_CONCURRENT_STREAMS, 100))),
            Ping(7),
            GoAway(9, GoAwayStatus.PROTOCOL_ERROR),
            HeadersFrame(1, (("a", "b"),)),
            WindowUpdate(1, 12345),
            UnknownControl(10, 0, b"credential"),
        ]
        self.assertEqual(self.round_trip(*frames), frames)

    def test_layouts(self) -> None:
        """
        Control frames carry the control bit, version 3, type, flags and length; data
        frames the stream id, flags and length.
        """
        self.assertEqual(encode_frame(DataFrame(5, b"ab", FLAG_FIN)),
                         bytes.fromhex("00000005" "01000002") + b"ab")
        self.assertEqual(encode_frame(Ping(1)), bytes.fromhex("80030006" "00000004" "00000001"))
        self.assertEqual(encode_frame(RstStream(3, RstStatus.CANCEL)),
                         bytes.fromhex("80030003" "00000008" "00000003" "00000005"))
        self.assertEqual(encode_frame(WindowUpdate(3, 0x1000)),
                         bytes.fromhex("80030009" "00000008" "00000003" "00001000"))
        self.assertEqual(encode_frame(GoAway(7)),
                         bytes.fromhex("80030007" "00000008" "00000007" "00000000"))
        syn = encode_frame(SynStream(1, (("a", "b"),), priority=2), HeaderCompressor())
        self.assertEqual(syn[:4], bytes.fromhex("80030001"))
        self.assertEqual(syn[8:18], bytes.fromhex("00000001" "00000000" "40" "00"))

    def test_split_anywhere(self) -> None:
        """
        Fed a byte at a time, the decoder yields the same frames.
        """
        compressor = HeaderCompressor()
        frames = [SynStream(1, (("streamtype", "stdin"),)), DataFrame(1, os.urandom(100)), Ping(2)]
        data = b"".join(encode_frame(f, compressor) for f in frames)
        decoder = FrameDecoder()
        out = []
        for byte in data:
            out.extend(decoder.feed(bytes([byte])))
        self.assertEqual(out, frames)

    def test_bad_version(self) -> None:
        """
        A SPDY/2 control frame is a protocol error.
        """
        self.assertRaises(SpdyProtocolError, FrameDecoder().feed,
                          bytes.fromhex("80020006" "00000004" "00000001"))

    def test_too_large(self) -> None:
        """
        A frame longer than the limit is refused before it is buffered.
        """
        self.assertRaises(SpdyProtocolError, FrameDecoder(max_frame_size=10).feed,
                          bytes.fromhex("00000001" "0000000b"))


class _Pair:
    """
    A client and a server session wired together, delivering on demand.
    """

    def __init__(self, **server_options: object) -> None:
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.server_streams: list[SpdyStream] = []
        self.errors: list[str] = []
        self.pings: list[int] = []
        self.goaways: list[GoAway] = []
        self.server = SpdySession(self.to_client.append, on_stream=self.server_streams.append,
                                  on_error=self.errors.append, on_goaway=self.goaways.append,
                                  **server_options)  # type: ignore[arg-type]
        self.client = SpdySession(self.to_server.append, client=True,
                                  on_ping=self.pings.append, on_goaway=self.goaways.append)
        self.server.record_frames = self.client.record_frames = True

    def flush(self) -> None:
        while self.to_server or self.to_client:
            data, self.to_server[:] = b"".join(self.to_server), []
            self.server.receive(data)
            data, self.to_client[:] = b"".join(self.to_client), []
            self.client.receive(data)


class SessionTests(SynchronousTestCase):
    """
    Two L{SpdySession}s talking.
    """

    def test_stream_lifecycle(self) -> None:
        """
        The client opens odd streams with headers; the server replies, data flows
        both ways, FIN half-closes each side and a closed stream is forgotten.
        """
        pair = _Pair()
        stream = pair.client.open_stream({"streamtype": "data", "port": "80"})
        received: list[bytes] = []
        stream.on_data = received.append
        pair.flush()
        [server_stream] = pair.server_streams
        self.assertEqual((server_stream.id, server_stream.header("streamType"),
                          server_stream.header("port")), (1, "data", "80"))
        served: list[bytes] = []
        ended: list[bool] = []
        server_stream.on_data = served.append
        server_stream.on_end = lambda: ended.append(True)
        server_stream.reply()
        server_stream.write(b"to client")
        stream.write(b"to server")
        stream.close()
        pair.flush()
        self.assertEqual((received, served, ended), ([b"to client"], [b"to server"], [True]))
        self.assertIn(1, pair.server.streams)
        server_stream.close()
        pair.flush()
        self.assertNotIn(1, pair.server.streams)
        self.assertTrue(stream.remote_closed)
        self.assertEqual(pair.client.open_stream({}).id, 3)

    def test_large_write_is_chunked(self) -> None:
        """
        A large write goes out as data frames of at most MAX_DATA_CHUNK bytes and
        arrives whole.
        """
        pair = _Pair()
        stream = pair.client.open_stream({})
        pair.flush()
        server_stream = pair.server_streams[0]
        server_stream.reply()
        payload = os.urandom(5 * MAX_DATA_CHUNK + 7)
        received: list[bytes] = []
        stream.on_data = received.append
        server_stream.write(payload)
        pair.flush()
        self.assertEqual(b"".join(received), payload)
        sizes = [len(f.data) for f in pair.client.frames_received if isinstance(f, DataFrame)]
        self.assertEqual(max(sizes), MAX_DATA_CHUNK)

    def test_reset(self) -> None:
        """
        RST_STREAM ends a stream at once on both sides: the peer hears its status and
        later data is dropped.
        """
        pair = _Pair()
        stream = pair.client.open_stream({})
        pair.flush()
        server_stream = pair.server_streams[0]
        statuses: list[int] = []
        data: list[bytes] = []
        server_stream.on_reset = statuses.append
        server_stream.on_data = data.append
        stream.reset()
        stream.write(b"ignored")
        pair.flush()
        self.assertEqual(statuses, [RstStatus.CANCEL])
        self.assertEqual(data, [])
        self.assertEqual(pair.server.streams, {})

    def test_ping(self) -> None:
        """
        The server echoes the client's PING; the client sees its own id come back.
        """
        pair = _Pair()
        ping_id = pair.client.ping()
        pair.flush()
        self.assertEqual((ping_id, pair.pings), (1, [1]))
        self.assertIn(Ping(1), pair.server.frames_received)

    def test_goaway(self) -> None:
        """
        After GOAWAY the server refuses new streams with REFUSED_STREAM, and the
        client hears the last stream id the server accepted.
        """
        pair = _Pair()
        pair.client.open_stream({})
        pair.flush()
        pair.server.go_away()
        late = pair.client.open_stream({})
        statuses: list[int] = []
        late.on_reset = statuses.append
        pair.flush()
        self.assertEqual(pair.goaways, [GoAway(1, GoAwayStatus.OK)])
        self.assertEqual(statuses, [RstStatus.REFUSED_STREAM])
        self.assertEqual(len(pair.server_streams), 1)

    def test_protocol_errors(self) -> None:
        """
        A stream id of the wrong parity, or one that does not increase, gets GOAWAY
        PROTOCOL_ERROR and is reported.
        """
        for frames in ([SynStream(2)], [SynStream(3), SynStream(1)]):
            pair = _Pair()
            compressor = HeaderCompressor()
            pair.server.receive(b"".join(encode_frame(f, compressor) for f in frames))
            self.assertEqual(len(pair.errors), 1)
            self.assertTrue(pair.server.failed)
            decoded = FrameDecoder().feed(b"".join(pair.to_client))
            self.assertEqual(decoded[-1], GoAway(frames[0].stream_id if len(frames) > 1 else 0,
                                                 GoAwayStatus.PROTOCOL_ERROR))


class FlowControlTests(SynchronousTestCase):
    """
    Send and receive windows.
    """

    def open(self, **server_options: object) -> tuple[_Pair, SpdyStream, SpdyStream, list[bytes]]:
        pair = _Pair(**server_options)
        stream = pair.client.open_stream({})
        pair.flush()
        server_stream = pair.server_streams[0]
        server_stream.reply()
        received: list[bytes] = []
        stream.on_data = received.append
        pair.flush()
        return pair, stream, server_stream, received

    def test_window_honoured(self) -> None:
        """
        A session honouring the peer's window sends 64 KiB, holds the rest back, and
        sends more (and then the FIN) as WINDOW_UPDATEs arrive.
        """
        pair, stream, server_stream, received = self.open(honour_peer_window=True)
        drained: list[bool] = []
        server_stream.on_drained = lambda: drained.append(True)
        payload = os.urandom(DEFAULT_WINDOW + 1000)
        server_stream.write(payload)
        server_stream.close()
        sent = b"".join(f.data for f in FrameDecoder().feed(b"".join(pair.to_client))
                        if isinstance(f, DataFrame))
        self.assertEqual(len(sent), DEFAULT_WINDOW)
        self.assertEqual((server_stream.send_window, server_stream.pending), (0, 1000))
        self.assertFalse(server_stream.local_closed)
        pair.to_client.clear()
        pair.server.receive(encode_frame(WindowUpdate(1, 600)))
        self.assertEqual(server_stream.pending, 400)
        pair.server.receive(encode_frame(WindowUpdate(1, 600)))
        self.assertEqual((server_stream.pending, server_stream.send_window), (0, 200))
        self.assertTrue(server_stream.local_closed)
        self.assertEqual(drained, [True])
        frames = [f for f in FrameDecoder().feed(b"".join(pair.to_client)) if isinstance(f, DataFrame)]
        self.assertEqual([len(f.data) for f in frames], [600, 400])
        self.assertTrue(frames[-1].fin)

    def test_like_spdystream(self) -> None:
        """
        By default the window is not enforced while the peer has never sent a
        WINDOW_UPDATE (kubectl's library never does); once it has, it is.
        """
        pair, stream, server_stream, received = self.open()
        server_stream.write(b"x" * (DEFAULT_WINDOW * 2))
        self.assertEqual((server_stream.pending, server_stream.send_window), (0, -DEFAULT_WINDOW))
        pair.server.receive(encode_frame(WindowUpdate(1, DEFAULT_WINDOW + 10)))
        self.assertTrue(pair.server.honour_peer_window)
        server_stream.write(b"y" * 20)
        self.assertEqual((server_stream.pending, server_stream.send_window), (10, 0))

    def test_initial_window_setting(self) -> None:
        """
        SETTINGS INITIAL_WINDOW_SIZE moves the send window of open streams by the
        difference and applies to new ones.
        """
        pair, stream, server_stream, received = self.open(honour_peer_window=True)
        server_stream.write(b"z" * (DEFAULT_WINDOW + 100))
        self.assertEqual(server_stream.pending, 100)
        pair.server.receive(encode_frame(Settings(((0, Setting.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW + 50),))))
        self.assertEqual((server_stream.pending, server_stream.send_window), (50, 0))
        self.assertEqual(pair.server.peer_initial_window, DEFAULT_WINDOW + 50)

    def test_receive_window_updates(self) -> None:
        """
        The receiver gives the window back with WINDOW_UPDATE once half of it has been
        consumed, so a peer that honours windows never stalls.
        """
        pair, stream, server_stream, received = self.open()
        data: list[bytes] = []
        server_stream.on_data = data.append
        half = DEFAULT_WINDOW // 2
        pair.server.receive(encode_frame(DataFrame(1, b"a" * (half - 1))))
        self.assertEqual(server_stream.recv_window, DEFAULT_WINDOW - half + 1)
        pair.to_client.clear()
        pair.server.receive(encode_frame(DataFrame(1, b"a" * 1)))
        self.assertEqual(FrameDecoder().feed(b"".join(pair.to_client)), [WindowUpdate(1, half)])
        self.assertEqual(server_stream.recv_window, DEFAULT_WINDOW)

    def test_advertised_window(self) -> None:
        """
        A session with a larger receive window announces it in SETTINGS first.
        """
        sent: list[bytes] = []
        SpdySession(sent.append, initial_window=1 << 20)
        self.assertEqual(FrameDecoder().feed(sent[0]),
                         [Settings(((0, Setting.INITIAL_WINDOW_SIZE, 1 << 20),))])

    def test_window_overflow(self) -> None:
        """
        A WINDOW_UPDATE past 2^31-1 resets the stream with FLOW_CONTROL_ERROR; a zero
        delta is a protocol error.
        """
        pair, stream, server_stream, received = self.open()
        pair.to_client.clear()
        pair.server.receive(encode_frame(WindowUpdate(1, 0x7FFFFFFF)))
        self.assertEqual(FrameDecoder().feed(b"".join(pair.to_client)),
                         [RstStream(1, RstStatus.FLOW_CONTROL_ERROR)])
        pair.server.receive(encode_frame(WindowUpdate(1, 0)))
        self.assertEqual(len(pair.errors), 1)


class ProtocolTests(SynchronousTestCase):
    """
    L{SpdyProtocol} on a transport.
    """

    def test_error_closes(self) -> None:
        """
        A protocol error sends GOAWAY and closes the connection; losing the connection
        is reported.
        """
        lost: list[object] = []
        protocol = SpdyProtocol(lambda send, on_error: SpdySession(send, on_error=on_error),
                                lost.append)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(bytes.fromhex("80020006" "00000004" "00000001"))
        self.assertEqual(FrameDecoder().feed(transport.value()),
                         [GoAway(0, GoAwayStatus.PROTOCOL_ERROR)])
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(lost, [None])
