"""
Tests for the durable spool (`banyan_kproxy.audit.spool`): group commits, what
"accepted" means, recovery after a crash, the size bound and segment clean-up.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.audit.event import encode_event
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.spool import SegmentStore, Spool, SpoolLocked
from banyan_kproxy.audit.testing import ManualExecutor, sync_executor
from banyan_kproxy.health import Metrics


class Reader:
    """
    Collects what the spool hands out after each commit.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.records: list[Any] = []

    def offer(self, records: Any) -> None:
        self.records.extend(records)


def event(n: int, pad: int = 0) -> dict[str, Any]:
    return {"kind": "Event", "auditID": f"id-{n}", "stage": "ResponseComplete", "pad": "x" * pad}


class SpoolHarness:
    """
    A spool in a temporary directory on a Clock.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        directory: str | None = None,
        executor: Any = sync_executor,
        max_bytes: int = 1 << 20,
        segment_bytes: int = 4096,
        max_pending: int = 1000,
        readers: tuple[str, ...] = ("a",),
    ) -> None:
        self.directory = directory or os.path.abspath(case.mktemp())
        self.clock = Clock()
        self.registry = Metrics()
        self.metrics = AuditMetrics.create(self.registry)
        self.store = SegmentStore(self.directory, segment_bytes)
        self.store.open()
        self.spool = Spool(
            store=self.store,
            executor=executor,
            clock=self.clock,
            max_bytes=max_bytes,
            max_pending=max_pending,
            encode=functools.partial(encode_event, max_size=None),
            metrics=self.metrics,
        )
        self.readers = [Reader(name) for name in readers]
        for reader in self.readers:
            self.spool.subscribe(reader)
        case.addCleanup(self.store.close)

    def counter(self, name: str, **labels: str) -> float:
        metric = getattr(self.metrics, name)
        return (metric.labels(**labels) if labels else metric._only).get()

    def files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory) if n.endswith(".seg"))


class AcceptanceTests(SynchronousTestCase):
    """
    An event is accepted once its group is written and fsync'd, not before.
    """

    def test_accepted_after_commit(self) -> None:
        """
        Events wait in memory until the group commit has run; then they are
        counted as spooled and handed to the readers, in order, with offsets.
        """
        executor = ManualExecutor()
        h = SpoolHarness(self, executor=executor)
        h.spool.recover()
        executor.run_one()
        for n in range(3):
            h.spool.accept(event(n))
        h.clock.advance(0)
        self.assertEqual(len(executor.calls), 1)  # one group commit for the three
        self.assertEqual((h.counter("spooled"), h.readers[0].records), (0, []))
        self.assertEqual(h.metrics.buffered.labels(queue="spool").get(), 0)  # taken into the group
        h.spool.accept(event(3))  # arrives during the commit: next group
        executor.run_one()
        self.assertEqual(h.counter("spooled"), 3)
        self.assertEqual([json.loads(r.data)["auditID"] for r in h.readers[0].records], ["id-0", "id-1", "id-2"])
        offsets = [(r.offset, r.end) for r in h.readers[0].records]
        self.assertEqual(offsets[0][0], 0)
        self.assertEqual([o[0] for o in offsets[1:]], [o[1] for o in offsets[:-1]])
        h.clock.advance(0)
        executor.run_one()
        self.assertEqual(h.counter("spooled"), 4)
        self.assertEqual(h.spool.committed_end, h.readers[0].records[-1].end)

    def test_record_format(self) -> None:
        """
        Segments hold one ``crc32 JSON`` line per event, named by their first offset.
        """
        h = SpoolHarness(self)
        h.spool.recover()
        h.spool.accept(event(1))
        h.clock.advance(0)
        self.assertEqual(h.files(), ["00000000000000000000.seg"])
        with open(os.path.join(h.directory, h.files()[0]), "rb") as f:
            line = f.read()
        self.assertRegex(line.decode(), r"^[0-9a-f]{8} \{.*\}\n$")
        self.assertEqual(json.loads(line[9:])["auditID"], "id-1")

    def test_events_before_recovery_wait(self) -> None:
        """
        Events accepted while the spool is still being recovered are committed after.
        """
        executor = ManualExecutor()
        h = SpoolHarness(self, executor=executor)
        h.spool.recover()
        h.spool.accept(event(1))
        h.clock.advance(0)
        self.assertEqual(len(executor.calls), 1)  # only the recovery
        executor.run_one()
        h.clock.advance(0)
        executor.run_one()
        self.assertEqual(h.counter("spooled"), 1)

    def test_write_failure_retried(self) -> None:
        """
        A group commit that fails (disk error) is not accepted and is tried again
        after a second, with the events that arrived meanwhile.
        """
        failures = [OSError(5, "Input/output error")]

        def flaky(function: Any, *args: Any) -> Any:
            if failures and function.__name__ == "_encode_and_append":
                return fail(failures.pop())
            return sync_executor(function, *args)

        h = SpoolHarness(self, executor=flaky)
        h.spool.recover()
        h.spool.accept(event(1))
        h.clock.advance(0)
        self.assertEqual(h.counter("spooled"), 0)
        self.assertEqual(h.spool.write_error, "Input/output error (EIO)")
        h.spool.accept(event(2))
        h.clock.advance(0.5)
        self.assertEqual(h.counter("spooled"), 0)
        h.clock.advance(0.5)
        self.assertEqual([json.loads(r.data)["auditID"] for r in h.readers[0].records], ["id-1", "id-2"])
        self.assertIsNone(h.spool.write_error)

    def test_backlog_bounded(self) -> None:
        """
        When more events wait for the disk than the buffer holds, new ones are
        dropped and counted; the request path never waits.
        """
        executor = ManualExecutor()
        h = SpoolHarness(self, executor=executor, max_pending=5)
        for n in range(8):
            h.spool.accept(event(n))
        self.assertEqual(h.counter("dropped", reason="backlog"), 3)
        self.assertEqual(h.metrics.buffered.labels(queue="spool").get(), 5)


class RecoveryTests(SynchronousTestCase):
    """
    After a crash the spool resumes from what was written.
    """

    def test_torn_tail_cut(self) -> None:
        """
        A record torn by a crash is cut off at start; whole records are kept and
        new ones follow them.
        """
        h = SpoolHarness(self)
        h.spool.recover()
        for n in range(3):
            h.spool.accept(event(n))
        h.clock.advance(0)
        end = h.spool.committed_end
        h.store.close()
        path = os.path.join(h.directory, h.files()[-1])
        with open(path, "ab") as f:
            f.write(b'0badc0de {"kind":"Event","audit')
        again = SpoolHarness(self, directory=h.directory)
        recovered = self.successResultOf(again.spool.recover())
        self.assertEqual(recovered.cut_bytes, len(b'0badc0de {"kind":"Event","audit'))
        self.assertEqual(again.spool.committed_end, end)
        self.assertEqual(os.path.getsize(path), end)
        again.spool.accept(event(3))
        again.clock.advance(0)
        self.assertEqual(again.readers[0].records[0].offset, end)
        read = self.successResultOf(again.spool.read(0, 100))
        self.assertEqual([json.loads(r.data)["auditID"] for r in read.records], ["id-0", "id-1", "id-2", "id-3"])

    def test_acks_survive(self) -> None:
        """
        Acknowledged offsets are written to disk and read back at start.
        """
        h = SpoolHarness(self, readers=("a", "b"))
        h.spool.recover()
        for n in range(4):
            h.spool.accept(event(n))
        h.clock.advance(0)
        h.spool.acknowledge("a", h.readers[0].records[2].offset)
        self.successResultOf(h.spool.close())
        again = SpoolHarness(self, directory=h.directory, readers=("a", "b", "new"))
        self.successResultOf(again.spool.recover())
        self.assertEqual(again.spool.ack_offset("a"), h.readers[0].records[2].offset)
        self.assertEqual(again.spool.ack_offset("b"), 0)
        self.assertEqual(again.spool.ack_offset("new"), 0)

    def test_locked(self) -> None:
        """
        A second process cannot use a spool directory in use; the message says who has it.
        """
        h = SpoolHarness(self)
        error = self.assertRaises(SpoolLocked, SegmentStore(h.directory, 4096).open)
        self.assertIn(f"is in use by another process (pid {os.getpid()})", str(error))

    def test_corrupt_record_skipped(self) -> None:
        """
        A damaged record in a sealed segment is skipped and counted; the rest is read.
        """
        h = SpoolHarness(self, segment_bytes=200)
        h.spool.recover()
        for n in range(6):
            h.spool.accept(event(n, pad=50))
            h.clock.advance(0)
        self.assertGreater(len(h.files()), 2)
        victim = h.readers[0].records[1]
        path = os.path.join(h.directory, h.files()[0])
        with open(path, "r+b") as f:
            base = int(h.files()[0][:-4])
            f.seek(victim.offset - base + 20)
            f.write(b"X")
        read = self.successResultOf(h.spool.read(0, 100))
        self.assertEqual(read.corrupt, 1)
        self.assertEqual(
            [json.loads(r.data)["auditID"] for r in read.records], ["id-0", "id-2", "id-3", "id-4", "id-5"]
        )
        self.assertEqual(read.next_offset, h.spool.committed_end)


class BoundTests(SynchronousTestCase):
    """
    The spool stays within spool_max_bytes and frees what every sink acknowledged.
    """

    def test_segments_deleted_when_all_acknowledged(self) -> None:
        """
        A segment is deleted only when every sink has acknowledged past its end.
        """
        h = SpoolHarness(self, segment_bytes=300, readers=("a", "b"))
        h.spool.recover()
        for n in range(10):
            h.spool.accept(event(n, pad=60))
            h.clock.advance(0)
        before = h.files()
        self.assertGreater(len(before), 3)
        end = h.spool.committed_end
        h.spool.acknowledge("a", end)
        self.assertEqual(h.files(), before)
        h.spool.acknowledge("b", h.readers[1].records[5].offset)
        remaining = h.files()
        self.assertLess(len(remaining), len(before))
        self.assertLessEqual(int(remaining[0][:-4]), h.readers[1].records[5].offset)
        h.spool.acknowledge("b", end)
        self.assertEqual(h.files(), before[-1:])  # the segment being written stays
        self.assertEqual(h.metrics.spool_bytes._only.get(), end - int(before[-1][:-4]))

    def test_full_spool(self) -> None:
        """
        A full spool refuses new events loudly (log line and metric) without
        blocking, and takes events again once sinks caught up.
        """
        h = SpoolHarness(self, max_bytes=2000, segment_bytes=400)
        h.spool.recover()
        logged: list[dict[str, Any]] = []
        h.spool.log.observer = logged.append  # type: ignore[attr-defined]
        for n in range(40):
            h.spool.accept(event(n, pad=40))
            h.clock.advance(0)
        accepted = len(h.readers[0].records)
        self.assertLess(accepted, 40)
        self.assertLessEqual(h.spool.used_bytes, 2000)
        self.assertEqual(h.counter("dropped", reason="spool_full"), 40 - accepted)
        self.assertEqual(h.counter("spooled"), accepted)
        self.assertEqual(h.metrics.spool_full._only.get(), 1)
        critical = [e for e in logged if e["log_level"].name == "critical"]
        self.assertEqual(len(critical), 1)
        self.assertIn("AUDIT SPOOL FULL", critical[0]["log_format"])
        self.assertIn("a is", critical[0]["lags"])
        h.clock.advance(61)
        h.spool.accept(event(100, pad=40))
        h.clock.advance(0)
        self.assertEqual(len([e for e in logged if e["log_level"].name == "critical"]), 2)
        h.spool.acknowledge("a", h.spool.committed_end)
        h.spool.accept(event(101, pad=40))
        h.clock.advance(0)
        self.assertEqual(json.loads(h.readers[0].records[-1].data)["auditID"], "id-101")
        self.assertEqual(h.metrics.spool_full._only.get(), 0)
        self.assertIn("has room again", logged[-1]["log_format"])
