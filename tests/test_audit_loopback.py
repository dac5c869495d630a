"""
The audit pipeline against a real HTTP receiver on loopback: a ``twisted.web`` Site
on 127.0.0.1:0 in this process, reached over real TCP by the webhook sink, while
batching time runs on an injected Clock.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.server import NOT_DONE_YET, Site

from banyan_kproxy.audit.backend import BatchPolicy, SinkPump
from banyan_kproxy.audit.event import encode_event
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.sinks import WebhookSink, WebhookTarget
from banyan_kproxy.audit.spool import SegmentStore, Spool
from banyan_kproxy.audit.testing import WebhookReceiver, sync_executor
from banyan_kproxy.health import Metrics
from banyan_kproxy.proxy.upstream import quiet_pool


async def settle(seconds: float = 0.02) -> None:
    """
    Let real network I/O happen for a moment.
    """
    await deferLater(reactor, seconds, lambda: None)


async def until(condition: Any, what: str, timeout: float = 10.0) -> None:
    """
    Wait (in real time, bounded) until ``condition()`` holds.
    """
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await settle(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class LoopbackPipeline:
    """
    Spool and pump on a Clock, webhook sink on the real reactor, receiver on loopback.
    """

    def __init__(self, case: TestCase, policy: BatchPolicy, receiver: WebhookReceiver | None = None) -> None:
        self.case = case
        self.clock = Clock()
        self.receiver = receiver or WebhookReceiver(self.clock)
        self.site = Site(self.receiver)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        case.addCleanup(self.stop_listening)
        self.pool = quiet_pool(reactor)
        case.addCleanup(self.pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=self.pool))
        target = WebhookTarget(f"http://127.0.0.1:{self.number}/audit", "webhook.yaml")
        self.sink = WebhookSink(target, http, reactor)
        self.directory = os.path.abspath(case.mktemp())
        self.metrics = AuditMetrics.create(Metrics())
        self.store = SegmentStore(self.directory, 4096)
        self.store.open()
        case.addCleanup(self.store.close)
        self.spool = Spool(
            store=self.store, executor=sync_executor, clock=self.clock, max_bytes=1 << 24,
            max_pending=100000, encode=functools.partial(encode_event, max_size=100 * 1024),
            metrics=self.metrics,
        )
        self.pump = SinkPump(self.sink, policy, self.spool, self.clock, self.metrics, random=lambda: 0.0)
        self.spool.subscribe(self.pump)
        case.addCleanup(self.pump.stop)
        self.spool.recover()
        self.pump.start(self.spool.ack_offset(self.pump.name))

    def stop_listening(self) -> Deferred[Any]:
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None  # type: ignore[return-value]

    def listen_again(self) -> None:
        self.port = reactor.listenTCP(self.number, self.site, interface="127.0.0.1")

    def emit(self, first: int, count: int) -> None:
        for n in range(first, first + count):
            self.spool.accept({"kind": "Event", "apiVersion": "audit.k8s.io/v1", "auditID": f"id-{n:04d}",
                               "stage": "ResponseComplete", "verb": "get"})
        self.clock.advance(0)


class LoopbackBatchTests(TestCase):
    """
    A real receiver gets batches of the configured size at the configured times.
    """

    timeout = 60

    async def _sizes_and_timing(self) -> None:
        policy = BatchPolicy(max_size=5, max_wait=30.0, buffer_size=100, throttle_qps=1, throttle_burst=1,
                             initial_backoff=1.0, max_in_flight=1)
        p = LoopbackPipeline(self, policy)
        p.emit(0, 12)
        await until(lambda: len(p.receiver.batches) == 1, "the first batch")
        await settle(0.1)
        self.assertEqual(len(p.receiver.batches), 1)  # the second waits for a throttle token
        p.clock.advance(1)
        await until(lambda: len(p.receiver.batches) == 2, "the second batch")
        p.clock.advance(29.9)
        await settle(0.1)
        self.assertEqual(len(p.receiver.batches), 2)  # two left: they wait for batch_max_wait
        p.clock.advance(0.1)
        await until(lambda: len(p.receiver.batches) == 3, "the third batch")
        self.assertEqual([len(b) for b in p.receiver.batches], [5, 5, 2])
        self.assertEqual(p.receiver.times, [0.0, 1.0, 31.0])
        self.assertEqual([e["auditID"] for e in p.receiver.events], [f"id-{n:04d}" for n in range(12)])
        _, headers = p.receiver.requests[0]
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        await until(lambda: p.pump.acknowledged == p.spool.committed_end, "the acknowledgement")

    def test_sizes_and_timing(self) -> None:
        """
        Twelve events with batch_max_size 5, qps 1 and batch_max_wait 30s arrive as
        5 at once, 5 a second later (throttle), and 2 at 31s (max wait since the
        last batch).
        """
        return Deferred.fromCoroutine(self._sizes_and_timing())

    async def _outage(self) -> None:
        policy = BatchPolicy(max_size=10, max_wait=1.0, buffer_size=20, throttle_qps=None,
                             initial_backoff=1.0, max_backoff=4.0, max_in_flight=2)
        p = LoopbackPipeline(self, policy)
        p.emit(0, 30)
        await until(lambda: len(p.receiver.events) == 30, "the first events")
        p.receiver.status = 503  # up, but refusing
        for start in range(30, 130, 10):
            p.emit(start, 10)
            p.clock.advance(1)
            await settle(0.01)
        await p.stop_listening()  # down: connections refused
        for start in range(130, 300, 10):
            p.emit(start, 10)
            p.clock.advance(1)
            await settle(0.01)
        self.assertEqual(len(p.receiver.events), 30)
        self.assertGreater(p.receiver.refused, 0)
        self.assertLessEqual(p.pump.buffered(), 20 + 2 * 10)  # the rest is only in the spool
        p.receiver.status = 200
        p.listen_again()
        for _ in range(400):
            if len(p.receiver.unique()) == 300:
                break
            p.clock.advance(1)
            await settle(0.02)
        self.assertEqual(sorted(k[0] for k in p.receiver.unique()), [f"id-{n:04d}" for n in range(300)])
        await until(lambda: p.pump.acknowledged == p.spool.committed_end, "the acknowledgement")
        self.assertEqual(p.metrics.dropped.labels(reason="spool_full").get(), 0)
        self.assertGreater(p.metrics.retried.labels(sink="webhook").get(), 0)
        self.flushLoggedErrors()

    def test_receiver_down_longer_than_buffer(self) -> None:
        """
        A receiver that refuses, then is gone, for ten times what the buffer holds,
        gets every event once it is back.
        """
        return Deferred.fromCoroutine(self._outage())

    async def _lost_answer(self) -> None:
        receiver = WebhookReceiver()
        original = receiver.render_POST
        hang_ups = [2]

        def take_then_hang_up(request: Any) -> Any:
            original(request)
            if hang_ups[0]:
                hang_ups[0] -= 1
                request.channel.transport.abortConnection()
                return NOT_DONE_YET
            return b"{}"

        receiver.render_POST = take_then_hang_up  # type: ignore[method-assign]
        policy = BatchPolicy(max_size=4, max_wait=1.0, throttle_qps=None, initial_backoff=1.0, max_in_flight=1)
        p = LoopbackPipeline(self, policy, receiver)
        receiver.clock = p.clock
        p.emit(0, 4)
        # The sink tries a lost answer once more at once, on a new connection ...
        await until(lambda: len(receiver.batches) == 2, "the first two deliveries")
        await settle(0.1)
        self.assertEqual(len(receiver.batches), 2)
        self.assertEqual(p.pump.acknowledged, 0)
        # ... and when that answer is lost too, the pump retries after the backoff.
        p.clock.advance(1)
        await until(lambda: p.pump.acknowledged == p.spool.committed_end, "the acknowledgement")
        self.assertEqual(len(receiver.batches), 3)
        self.assertEqual(receiver.batches[0], receiver.batches[1])
        self.assertEqual(receiver.batches[0], receiver.batches[2])
        self.assertEqual(len(receiver.unique()), 4)
        self.assertEqual(p.metrics.retried.labels(sink="webhook").get(), 4)
        self.flushLoggedErrors()

    def test_at_least_once(self) -> None:
        """
        A batch the receiver kept but whose answer was lost is sent again,
        byte-for-byte the same events: delivery is at least once, and (auditID,
        stage) tells the repeat apart.
        """
        return Deferred.fromCoroutine(self._lost_answer())
