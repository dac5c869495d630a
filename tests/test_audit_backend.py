"""
Tests for the batching backend (`banyan_kproxy.audit.backend`): kube-apiserver's
webhook batching on an injected clock, retries with backoff, and delivery of every
spooled event through outages longer than the buffer.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.audit.backend import BatchPolicy, SinkPump, SinkRejected, TokenBucket
from banyan_kproxy.audit.event import encode_event
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.spool import SegmentStore, Spool
from banyan_kproxy.audit.testing import MemorySink, sync_executor
from banyan_kproxy.health import Metrics


def event(n: int) -> dict[str, Any]:
    return {"kind": "Event", "auditID": f"id-{n:04d}", "stage": "ResponseComplete"}


class Pipeline:
    """
    A spool in a temporary directory feeding memory sinks on a Clock.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        policy: BatchPolicy,
        sinks: list[MemorySink] | None = None,
        directory: str | None = None,
        random_values: list[float] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.case = case
        self.directory = directory or os.path.abspath(case.mktemp())
        self.clock = clock or Clock()
        self.metrics = AuditMetrics.create(Metrics())
        self.store = SegmentStore(self.directory, 4096)
        self.store.open()
        case.addCleanup(self.store.close)
        self.spool = Spool(
            store=self.store,
            executor=sync_executor,
            clock=self.clock,
            max_bytes=1 << 22,
            max_pending=100000,
            encode=functools.partial(encode_event, max_size=None),
            metrics=self.metrics,
        )
        self.sinks = sinks if sinks is not None else [MemorySink(name="webhook")]
        values = list(random_values or [])
        self.pumps = []
        for sink in self.sinks:
            pump = SinkPump(
                sink, policy, self.spool, self.clock, self.metrics,
                random=(lambda: values.pop(0) if values else 0.0),
            )
            self.spool.subscribe(pump)
            self.pumps.append(pump)
        case.successResultOf(self.spool.recover())
        for pump in self.pumps:
            pump.start(self.spool.ack_offset(pump.name))

    def emit(self, first: int, count: int) -> None:
        for n in range(first, first + count):
            self.spool.accept(event(n))
        self.clock.advance(0)

    def ids(self, batches: list[list[dict[str, Any]]]) -> list[list[str]]:
        return [[e["auditID"][3:] for e in batch] for batch in batches]

    def sent(self, sink: str = "webhook") -> float:
        return self.metrics.sent.labels(sink=sink).get()


SEED = BatchPolicy(
    max_size=400, max_wait=300.0, buffer_size=10000, throttle_qps=4, throttle_burst=4,
    initial_backoff=30.0, max_in_flight=4,
)


class BatchingTests(SynchronousTestCase):
    """
    Batches have kube-apiserver's size and timing.
    """

    def test_full_batch_leaves_at_once(self) -> None:
        """
        batch_max_size events make a batch at once; the rest waits for batch_max_wait.
        """
        p = Pipeline(self, SEED)
        p.emit(0, 1000)
        sink = p.sinks[0]
        self.assertEqual([len(b) for b in sink.batches], [400, 400])
        p.clock.advance(299)
        self.assertEqual([len(b) for b in sink.batches], [400, 400])
        p.clock.advance(1)
        self.assertEqual([len(b) for b in sink.batches], [400, 400, 200])
        self.assertEqual([e["auditID"] for e in sink.events], [f"id-{n:04d}" for n in range(1000)])
        self.assertEqual(p.sent(), 1000)

    def test_partial_batch_after_max_wait(self) -> None:
        """
        A few events leave together when batch_max_wait has passed since the last batch.
        """
        p = Pipeline(self, SEED)
        p.clock.advance(100)
        p.emit(0, 3)
        p.clock.advance(199.9)
        self.assertEqual(p.sinks[0].batches, [])
        p.clock.advance(0.1)
        self.assertEqual(p.ids(p.sinks[0].batches), [["0000", "0001", "0002"]])
        p.clock.advance(300)
        self.assertEqual(len(p.sinks[0].batches), 1)  # nothing new: nothing sent

    def test_timer_restarts_after_full_batch(self) -> None:
        """
        The wait for a partial batch counts from the last batch, as kube-apiserver's
        collection loop does.
        """
        p = Pipeline(self, SEED)
        p.clock.advance(250)
        p.emit(0, 401)  # one full batch now, one event left
        p.clock.advance(50)
        self.assertEqual([len(b) for b in p.sinks[0].batches], [400])
        p.clock.advance(250)
        self.assertEqual([len(b) for b in p.sinks[0].batches], [400, 1])

    def test_throttle(self) -> None:
        """
        Batches beyond the burst leave at batch_throttle_qps.
        """
        policy = BatchPolicy(max_size=10, max_wait=300.0, throttle_qps=2, throttle_burst=2, max_in_flight=2)
        p = Pipeline(self, policy)
        p.emit(0, 60)
        self.assertEqual(len(p.sinks[0].batches), 2)
        p.clock.advance(0.49)
        self.assertEqual(len(p.sinks[0].batches), 2)
        p.clock.advance(0.01)
        self.assertEqual(len(p.sinks[0].batches), 3)
        p.clock.pump([0.5] * 3)
        self.assertEqual(len(p.sinks[0].batches), 6)
        self.assertEqual(p.sent(), 60)

    def test_max_batch_bytes(self) -> None:
        """
        With a byte limit a batch is cut before it would exceed it.
        """
        one = len(encode_event(event(0), None)) + 1
        policy = BatchPolicy(max_size=100, max_wait=1.0, throttle_qps=None, max_batch_bytes=80 + 5 * one)
        p = Pipeline(self, policy)
        p.emit(0, 12)
        p.clock.advance(1)
        p.clock.advance(1)
        p.clock.advance(1)
        self.assertEqual([len(b) for b in p.sinks[0].batches], [5, 5, 2])

    def test_token_bucket(self) -> None:
        """
        The bucket starts full and refills at qps up to burst.
        """
        clock = Clock()
        bucket = TokenBucket(4, 2, clock)
        self.assertEqual([bucket.take(), bucket.take()], [0.0, 0.0])
        self.assertAlmostEqual(bucket.take(), 0.25)
        clock.advance(10)
        self.assertEqual([bucket.take(), bucket.take()], [0.0, 0.0])
        self.assertGreater(bucket.take(), 0)


class RetryTests(SynchronousTestCase):
    """
    Failed batches are retried with kube-apiserver's backoff and never given up.
    """

    def test_backoff_grows(self) -> None:
        """
        Retries wait initial_backoff, then ×1.5 each time, plus up to 20 % jitter;
        nothing new is sent while backing off; the batch is retried until it goes.
        """
        sink = MemorySink(name="webhook", failing=True)
        policy = BatchPolicy(max_size=5, max_wait=300.0, throttle_qps=None, initial_backoff=30.0,
                             max_in_flight=1)
        p = Pipeline(self, policy, [sink], random_values=[0.0, 1.0, 0.5, 0.0])
        p.emit(0, 5)
        times = []
        previous = len(sink.attempts)
        for _ in range(2000):
            p.clock.advance(0.5)
            if len(sink.attempts) != previous:
                times.append(p.clock.seconds())
                previous = len(sink.attempts)
            if len(times) == 4:
                break
        # 30, then 45 × 1.2 = 54, then 67.5 × 1.1 = 74.25, then 101.25
        self.assertEqual(times, [30.0, 84.0, 158.5, 260.0])
        p.emit(5, 5)  # a full batch is waiting, but the sink is backing off
        self.assertEqual(len(sink.attempts), 5)
        sink.failing = False
        p.clock.advance(152)
        self.assertEqual(p.ids(sink.batches), [["0000", "0001", "0002", "0003", "0004"],
                                               ["0005", "0006", "0007", "0008", "0009"]])
        self.assertEqual(p.metrics.retried.labels(sink="webhook").get(), 25)
        self.flushLoggedErrors()

    def test_backoff_capped(self) -> None:
        """
        The wait between attempts stops growing at MAX_BACKOFF, and a zero
        initial_backoff cannot spin.
        """
        sink = MemorySink(name="webhook", failing=True)
        policy = BatchPolicy(max_size=1, max_wait=0, throttle_qps=None, initial_backoff=0.0,
                             max_backoff=1.0, max_in_flight=1, jitter=0.0)
        p = Pipeline(self, policy, [sink])
        p.emit(0, 1)
        p.clock.pump([0.05] * 1200)
        # 0.1, 0.15, 0.225, ... up to 1.0: about 57 attempts in a minute, not thousands.
        self.assertTrue(50 < len(sink.attempts) < 70, len(sink.attempts))

    def test_out_of_order_acknowledgement(self) -> None:
        """
        With batches in flight together, the acknowledged offset only passes
        batches whose predecessors are acknowledged too.
        """
        sink = MemorySink(name="webhook", manual=True)
        policy = BatchPolicy(max_size=2, max_wait=300.0, throttle_qps=None, max_in_flight=3)
        p = Pipeline(self, policy, [sink])
        p.emit(0, 6)
        pump = p.pumps[0]
        self.assertEqual(len(sink.waiting), 3)
        first_batch, second_batch, third_batch = sink.waiting[0][1], sink.waiting[1][1], sink.waiting[2][1]
        del first_batch, third_batch
        sink.waiting.insert(0, sink.waiting.pop(1))
        sink.succeed_next()  # the second batch
        self.assertEqual(pump.acknowledged, 0)
        sink.succeed_next()  # the first batch
        self.assertTrue(second_batch.called)
        self.assertEqual(pump.acknowledged, p.spool.read(0, 100).result.records[4].offset)
        sink.succeed_next()
        self.assertEqual(pump.acknowledged, p.spool.committed_end)

    def test_too_large_splits(self) -> None:
        """
        A batch the receiver refuses as too large (413) is split and retried at once.
        """
        sink = MemorySink(name="webhook", manual=True)
        policy = BatchPolicy(max_size=4, max_wait=300.0, throttle_qps=None, max_in_flight=4)
        p = Pipeline(self, policy, [sink])
        p.emit(0, 4)
        sink.fail_next(SinkRejected("413", code=413, too_large=True))
        self.assertEqual([len(b) for b, _ in sink.waiting], [2, 2])
        sink.succeed_next()
        sink.succeed_next()
        self.assertEqual(p.ids(sink.batches), [["0000", "0001"], ["0002", "0003"]])
        self.assertEqual(p.pumps[0].acknowledged, p.spool.committed_end)
        self.flushLoggedErrors()


class OutageTests(SynchronousTestCase):
    """
    An outage longer than the buffer holds loses nothing.
    """

    def test_longer_than_buffer(self) -> None:
        """
        With the receiver down while ten times the buffer's worth of events arrive,
        every event is delivered once it is back, in order, exactly once, and the
        spool is emptied.
        """
        sink = MemorySink(name="webhook", failing=True)
        policy = BatchPolicy(max_size=7, max_wait=1.0, buffer_size=20, throttle_qps=None,
                             initial_backoff=1.0, max_in_flight=2, jitter=0.0)
        p = Pipeline(self, policy, [sink])
        for start in range(0, 200, 10):
            p.emit(start, 10)
            p.clock.advance(1)
        self.assertEqual(sink.batches, [])
        # The buffer, plus the batches taken from it that are waiting for a retry.
        self.assertLessEqual(p.pumps[0].buffered(), 20 + 2 * 7)
        self.assertEqual(p.metrics.spooled._only.get(), 200)
        sink.failing = False
        p.clock.pump([1.0] * 60)
        ids = [e["auditID"] for e in sink.events]
        self.assertEqual(ids, [f"id-{n:04d}" for n in range(200)])
        self.assertEqual(p.pumps[0].acknowledged, p.spool.committed_end)
        self.assertEqual(p.metrics.dropped.labels(reason="spool_full").get(), 0)
        self.assertEqual(
            sorted(n for n in os.listdir(p.directory) if n.endswith(".seg"))[:-1], []
        )
        self.flushLoggedErrors()

    def test_each_sink_gets_everything(self) -> None:
        """
        A sink that is down does not hold back the others, and gets every event later.
        """
        down = MemorySink(name="webhook", failing=True)
        up = MemorySink(name="log")
        policy = BatchPolicy(max_size=10, max_wait=0, buffer_size=15, throttle_qps=None,
                             initial_backoff=1.0, max_in_flight=1, jitter=0.0)
        p = Pipeline(self, policy, [down, up])
        p.emit(0, 50)
        self.assertEqual(len(up.events), 50)
        self.assertEqual(down.events, [])
        down.failing = False
        p.clock.pump([1.0] * 10)
        self.assertEqual([e["auditID"] for e in down.events], [f"id-{n:04d}" for n in range(50)])
        self.assertEqual(p.metrics.dropped.labels(reason="corrupt").get(), 0)
        self.flushLoggedErrors()

    def test_restart_resumes_from_acknowledged(self) -> None:
        """
        After a restart a sink gets what it had not acknowledged, and nothing it had.
        """
        sink = MemorySink(name="webhook")
        policy = BatchPolicy(max_size=10, max_wait=0, buffer_size=100, throttle_qps=None, max_in_flight=1)
        p = Pipeline(self, policy, [sink])
        p.emit(0, 10)
        sink.failing = True
        p.emit(10, 5)
        p.store.close()  # a crash: no orderly stop
        self.flushLoggedErrors()
        again = MemorySink(name="webhook")
        Pipeline(self, policy, [again], directory=p.directory)
        self.assertEqual([e["auditID"] for e in again.events], [f"id-{n:04d}" for n in range(10, 15)])


class DrainTests(SynchronousTestCase):
    """
    Stopping flushes what is in memory, bounded in time.
    """

    def test_drain_sends_partial_batches(self) -> None:
        """
        drain sends what waits for batch_max_wait and for the throttle at once.
        """
        policy = BatchPolicy(max_size=10, max_wait=300.0, throttle_qps=1, throttle_burst=1, max_in_flight=1)
        p = Pipeline(self, policy)
        p.emit(0, 25)
        self.assertEqual(len(p.sinks[0].batches), 1)
        d = p.pumps[0].drain(5.0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([len(b) for b in p.sinks[0].batches], [10, 10, 5])

    def test_drain_gives_up(self) -> None:
        """
        A sink that does not answer is abandoned after the timeout; its events stay
        unacknowledged in the spool.
        """
        sink = MemorySink(name="webhook", manual=True)
        policy = BatchPolicy(max_size=10, max_wait=0, throttle_qps=None, max_in_flight=1)
        p = Pipeline(self, policy, [sink])
        p.emit(0, 3)
        d = p.pumps[0].drain(5.0)
        self.assertNoResult(d)
        p.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(p.pumps[0].acknowledged, 0)
        self.assertTrue(sink.waiting[0][1].called)  # cancelled
        p.pumps[0].stop()
        self.flushLoggedErrors()
