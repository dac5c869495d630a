"""
A disk that refuses audit spool writes (full: ``ENOSPC``; failing: ``EIO``) is loud
and does not hold anything up (`banyan_kproxy.audit.spool`).

In memory: a `SegmentStore` whose ``write(2)`` fails like a full disk (after writing
part of the group, as a real one does), on a ``Clock``.  As a process: the real
daemon with its spool on a 512 KiB tmpfs that the test fills and empties again
(mounting needs root, which CI has; elsewhere that test is skipped and the memory
tests stand for it).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent

from banyan_kproxy.audit.event import encode_event
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.spool import FULL_LOG_INTERVAL, SegmentStore, Spool
from banyan_kproxy.audit.testing import sync_executor
from banyan_kproxy.health import Metrics
from banyan_kproxy.testing.stack import READER_ROLE, LoopbackStack
from banyan_kproxy.tls import https_policy
from tests.test_proxy import LogCapture


def event(n: int) -> dict[str, Any]:
    return {"kind": "Event", "auditID": f"id-{n}", "stage": "ResponseComplete", "pad": "x" * 100}


class FullDiskStore(SegmentStore):
    """
    A segment store on a disk that can be made to refuse writes: while ``error`` is
    set, each ``write(2)`` writes ``partial`` bytes and then fails with it; with
    ``truncate_error`` the cut after a failed write fails too.
    """

    error: OSError | None = None
    partial = 7
    truncate_error: OSError | None = None
    writes = 0

    def _write(self, fd: int, data: memoryview) -> int:
        self.writes += 1
        if self.error is None:
            return super()._write(fd, data)
        if self.partial and len(data) > self.partial:
            super()._write(fd, data[: self.partial])
        raise self.error

    def _truncate(self, fd: int, size: int) -> None:
        if self.truncate_error is not None:
            raise self.truncate_error
        super()._truncate(fd, size)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EIO = OSError(errno.EIO, os.strerror(errno.EIO))


class Harness:
    """
    A spool on a `FullDiskStore` in a temporary directory, with its metrics.
    """

    def __init__(self, case: SynchronousTestCase, max_pending: int = 100, directory: str | None = None) -> None:
        self.directory = directory or os.path.abspath(case.mktemp())
        self.clock = Clock()
        self.registry = Metrics()
        self.store = FullDiskStore(self.directory, 4096)
        self.store.open()
        case.addCleanup(self.store.close)
        self.encoded: list[str] = []

        def encode(e: dict[str, Any]) -> bytes:
            self.encoded.append(e["auditID"])
            return encode_event(e, max_size=None)

        self.spool = Spool(
            store=self.store,
            executor=sync_executor,
            clock=self.clock,
            max_bytes=1 << 20,
            max_pending=max_pending,
            encode=encode,
            metrics=AuditMetrics.create(self.registry),
            write_errors=self.registry.counter("write_errors_total", "", ("error",)),
            write_failing=self.registry.gauge("write_failing", ""),
        )
        self.delivered: list[str] = []
        reader = type("Reader", (), {"name": "webhook", "offer": lambda _, records: self.delivered.extend(
            json.loads(r.data)["auditID"] for r in records)})()
        self.spool.subscribe(reader)
        self.spool.recover()

    def metric(self, line: str) -> bool:
        return line in self.registry.render().decode().splitlines()

    def on_disk(self) -> list[str]:
        store = SegmentStore(self.directory, 4096)
        segments = store.segments()
        if not segments:
            return []
        read = store.read(segments[0][0], segments[-1][0] + segments[-1][1], segments, 1 << 20)
        return [json.loads(r.data)["auditID"] for r in read.records]


class DiskFullTests(SynchronousTestCase):
    """
    The spool while its disk refuses writes.
    """

    def test_loud_not_blocking_and_resumes(self) -> None:
        """
        A full disk: accepting never blocks; one critical line names the directory
        and the errno, the metrics count it; nothing half-written stays on disk;
        retries every second are quiet until a minute has passed; when space
        returns everything held is written in order (encoded once) with one line
        saying so.
        """
        h = Harness(self)
        logs = LogCapture(self)
        h.spool.accept(event(0))
        h.clock.advance(0)
        self.assertEqual(h.delivered, ["id-0"])
        size_before = os.path.getsize(os.path.join(h.directory, "00000000000000000000.seg"))

        h.store.error = ENOSPC
        for n in range(1, 4):
            h.spool.accept(event(n))
        h.clock.advance(0)
        self.assertEqual(h.delivered, ["id-0"])
        self.assertEqual(h.spool.write_error, "No space left on device (ENOSPC)")
        self.assertEqual(
            os.path.getsize(os.path.join(h.directory, "00000000000000000000.seg")), size_before
        )
        text = logs.text()
        self.assertEqual(text.count("AUDIT SPOOL CANNOT BE WRITTEN"), 1)
        self.assertIn(
            f"AUDIT SPOOL CANNOT BE WRITTEN: {h.directory}: No space left on device (ENOSPC); "
            "audit events are held in memory (at most batch_buffer_size=100, then DROPPED) and "
            "the write is tried again every 1s; requests are not held up",
            text,
        )
        self.assertTrue(h.metric('write_errors_total{error="ENOSPC"} 1'))
        self.assertTrue(h.metric("write_failing 1"))
        self.assertTrue(h.metric('kproxy_audit_events_buffered{queue="spool"} 3'))

        for n in range(4, 10):
            h.spool.accept(event(n))
            h.clock.advance(1)
        self.assertEqual(h.delivered, ["id-0"])
        self.assertEqual(logs.text().count("AUDIT SPOOL"), 1)
        h.clock.advance(FULL_LOG_INTERVAL)
        self.assertIn(
            f"AUDIT SPOOL STILL CANNOT BE WRITTEN after 66s: {h.directory}: No space left on "
            "device (ENOSPC); 9 audit events held in memory, 0 DROPPED so far",
            logs.text(),
        )
        self.assertEqual(logs.text().count("AUDIT SPOOL STILL"), 1)

        h.store.error = None
        h.clock.advance(1)
        self.assertEqual(h.delivered, [f"id-{n}" for n in range(10)])
        self.assertEqual(h.on_disk(), [f"id-{n}" for n in range(10)])
        self.assertEqual(sorted(h.encoded), sorted(f"id-{n}" for n in range(10)))
        self.assertIsNone(h.spool.write_error)
        self.assertTrue(h.metric("write_failing 0"))
        self.assertIn(
            f"Audit spool {h.directory} can be written again after 67s (No space left on device "
            "(ENOSPC)); the audit events held in memory are written, 0 were dropped",
            logs.text(),
        )
        self.assertTrue(h.metric("kproxy_audit_events_spooled_total 10"))

    def test_backlog_full_drops_counted(self) -> None:
        """
        Once batch_buffer_size events are held, newer ones are dropped, counted as
        spool_error and logged; the ones held are kept and written later.
        """
        h = Harness(self, max_pending=5)
        logs = LogCapture(self)
        h.store.error = EIO
        for n in range(8):
            h.spool.accept(event(n))
            h.clock.advance(0)
        self.assertTrue(h.metric('kproxy_audit_events_dropped_total{reason="spool_error"} 3'))
        self.assertIn(
            f"Audit events are DROPPED: the audit spool {h.directory} cannot be written "
            "(Input/output error (EIO)) and the 5 events held in memory are as many as "
            "batch_buffer_size allows",
            logs.text(),
        )
        h.store.error = None
        h.clock.advance(1)
        self.assertEqual(h.delivered, [f"id-{n}" for n in range(5)])
        self.assertIn("3 were dropped", logs.text())

    def test_failed_cut_seals_the_segment(self) -> None:
        """
        When even cutting the torn bytes off fails, the next group goes to a new
        segment: every accepted event reads back after a restart, the torn bytes
        are one damaged record.
        """
        h = Harness(self)
        h.spool.accept(event(0))
        h.clock.advance(0)
        h.store.error, h.store.truncate_error = EIO, EIO
        h.spool.accept(event(1))
        h.clock.advance(0)
        h.store.error = h.store.truncate_error = None
        h.clock.advance(1)
        h.spool.accept(event(2))
        h.clock.advance(0)
        self.assertEqual(h.delivered, ["id-0", "id-1", "id-2"])
        self.assertEqual(len(h.store.segments()), 2)
        self.assertEqual(h.on_disk(), ["id-0", "id-1", "id-2"])
        store = SegmentStore(h.directory, 4096)
        segments = store.segments()
        read = store.read(0, segments[-1][0] + segments[-1][1], segments, 100)
        self.assertEqual(read.corrupt, 1)

    def test_failed_segment_open_keeps_a_valid_descriptor(self) -> None:
        """
        A new segment that cannot be created (the directory's disk is full) leaves
        the store writing to a descriptor it owns, never a closed one the process
        may hand to a socket; the next try makes the segment.
        """
        h = Harness(self)
        for n in range(40):  # fills the first 4 KiB segment
            h.spool.accept(event(n))
        h.clock.advance(0)
        fd = h.store._fd
        real_open = os.open
        refusals = [ENOSPC]

        def refusing_open(path: str, *args: Any, **kwargs: Any) -> int:
            if refusals and path.endswith(".seg"):
                raise refusals.pop()
            return real_open(path, *args, **kwargs)

        self.patch(os, "open", refusing_open)
        h.spool.accept(event(40))
        h.clock.advance(0)
        self.assertEqual(h.spool.write_error, "No space left on device (ENOSPC)")
        self.assertIs(h.store._fd, fd)
        os.fstat(fd)  # still open
        h.clock.advance(1)
        self.assertEqual(h.delivered[-1], "id-40")
        self.assertEqual(len(h.store.segments()), 2)

    def test_stop_while_failing(self) -> None:
        """
        Stopping while the disk fails tries once more, then counts what is held as
        dropped (spool_error) with one line, without retrying in a loop.
        """
        h = Harness(self)
        logs = LogCapture(self)
        h.store.error = ENOSPC
        for n in range(3):
            h.spool.accept(event(n))
        h.clock.advance(0)
        writes = h.store.writes
        self.successResultOf(h.spool.flush())
        self.assertEqual(h.store.writes, writes + 1)
        self.successResultOf(h.spool.close())
        self.assertTrue(h.metric('kproxy_audit_events_dropped_total{reason="spool_error"} 3'))
        self.assertIn(
            f"Audit service stopped with 3 events not yet written to the spool ({h.directory}: "
            "No space left on device (ENOSPC)): DROPPED",
            logs.text(),
        )

    def test_acknowledgement_write_fails(self) -> None:
        """
        An acknowledgement that cannot be written is counted and logged once a
        minute at most, and written with the next one.
        """
        h = Harness(self)
        logs = LogCapture(self)
        h.spool.accept(event(0))
        h.clock.advance(0)
        real_open = open
        refusing = [True]

        def refusing_open(path: Any, *args: Any, **kwargs: Any) -> Any:
            if refusing[0] and str(path).endswith(".ack.tmp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_open(path, *args, **kwargs)

        import builtins

        self.patch(builtins, "open", refusing_open)
        h.spool.acknowledge("webhook", 10)
        h.spool.acknowledge("webhook", 20)
        self.assertTrue(h.metric('write_errors_total{error="ENOSPC"} 2'))
        self.assertEqual(logs.text().count("the acknowledgement of webhook cannot be written"), 1)
        refusing[0] = False
        h.spool.acknowledge("webhook", 30)
        with real_open(os.path.join(h.directory, "webhook.ack")) as f:
            self.assertEqual(f.read(), "30\n")
        self.assertNotIn("webhook.ack.tmp", os.listdir(h.directory))


def _mount_tmpfs(directory: str, size: str) -> None:
    """
    Mount a tmpfs of ``size`` on ``directory``, or skip (it needs root).
    """
    if os.geteuid() != 0:
        raise SkipTest("mounting a tmpfs for a full spool disk needs root (the memory tests cover it)")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", directory],
        capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs here ({result.stderr.strip()}); the memory tests cover it")


def _fill(directory: str) -> str:
    """
    Write a file in ``directory`` until its filesystem is full; returns its path.
    """
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(100000):
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return path


class DaemonDiskFullTests(TestCase):
    """
    The real daemon with its spool on a filesystem that fills up and empties again.
    """

    timeout = 180

    def test_full_disk(self) -> Deferred[None]:
        """
        With the spool's filesystem full, requests still get their 200; the log has
        the loud line naming the directory and ENOSPC, /metrics counts the failed
        writes and the held events; once space is freed the held events are
        spooled and reach the webhook without a restart.
        """
        return Deferred.fromCoroutine(self._full_disk())

    async def _full_disk(self) -> None:
        from tests.test_audit_process import Receiver

        directory = os.path.abspath(self.mktemp())
        spool_dir = os.path.join(directory, "spool")
        os.makedirs(spool_dir)
        _mount_tmpfs(spool_dir, "512k")
        self.addCleanup(subprocess.run, ["umount", "-l", spool_dir], timeout=30)
        receiver = Receiver(self, directory)
        stack = LoopbackStack(
            reactor,
            os.path.join(directory, "stack"),
            extra_ini=(
                "\n[audit]\n"
                f"webhook_config_file = {receiver.kubeconfig}\n"
                f"spool_dir = {spool_dir}\n"
                "batch_max_wait = 100ms\ninitial_backoff = 200ms\n"
            ),
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(stack.stop()))
        await stack.start()
        stack.standin.add_pod("web")
        token = stack.token("reader@example.com", roles=[READER_ROLE])
        agent = Agent(reactor, contextFactory=https_policy(stack.ca_file))

        async def request(n: int) -> str:
            response = await treq.get(
                stack.proxy_url + f"/api/v1/namespaces/default/pods/web?n={n}",
                headers={"Authorization": f"Bearer {token}"}, agent=agent, timeout=10,
            )
            body = json.loads(await treq.content(response))
            self.assertEqual((response.code, body["metadata"]["name"]), (200, "web"))
            return response.headers.getRawHeaders(b"audit-id")[0].decode()

        async def metrics() -> str:
            response = await treq.get(stack.health_url + "/metrics", timeout=10, persistent=False)
            return (await treq.text_content(response))

        await request(0)
        filler = _fill(spool_dir)
        ids = [await request(n) for n in range(1, 31)]  # ~30 KiB of events: more than any free page

        async def until_metric(line: str, what: str) -> str:
            for _ in range(250):
                text = await metrics()
                if line in text.splitlines():
                    return text
                await deferLater(reactor, 0.04, lambda: None)
            self.fail(f"timed out waiting for {what}: {line!r} not in\n{text}")

        text = await until_metric("kproxy_audit_spool_write_failing 1", "the spool to report failing writes")
        errors = [
            line for line in text.splitlines()
            if line.startswith('kproxy_audit_spool_write_errors_total{error="ENOSPC"} ')
        ]
        self.assertTrue(errors and float(errors[0].split()[1]) >= 1, text)
        held = [line for line in text.splitlines() if line.startswith('kproxy_audit_events_buffered{queue="spool"} ')]
        self.assertTrue(held and float(held[0].split()[1]) >= 1, text)
        self.assertIn(f"AUDIT SPOOL CANNOT BE WRITTEN: {spool_dir}: No space left on device (ENOSPC)",
                      stack.daemon_output)
        delivered = {audit_id for audit_id, _ in receiver.resource.unique()}
        self.assertFalse(set(ids) <= delivered)

        os.unlink(filler)
        await until_metric("kproxy_audit_spool_write_failing 0", "the spool to be written again")
        for _ in range(500):
            delivered = {audit_id for audit_id, stage in receiver.resource.unique() if stage == "ResponseComplete"}
            if set(ids) <= delivered:
                break
            await deferLater(reactor, 0.04, lambda: None)
        self.assertEqual(set(ids) - delivered, set())
        self.assertIn(f"Audit spool {spool_dir} can be written again after", stack.daemon_output)
        self.assertIn("the audit events held in memory are written, 0 were dropped", stack.daemon_output)
        self.assertNotIn('kproxy_audit_events_dropped_total{reason="spool_error"}', await metrics())
