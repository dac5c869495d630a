"""
The load program (``benchmarks/load.py``) in its short form, as CI runs it: 100
concurrent connections through the real daemon mixing GETs, watches and exec
tunnels, checked for errors and for leaked descriptors and memory; and its verdict
logic, which must fail on what it is there to catch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from banyan_kproxy.testing.stack import LoopbackStack, repository_file


def _load_module() -> ModuleType:
    """
    ``benchmarks/load.py`` of this checkout (``benchmarks`` is not a package).
    """
    path = repository_file("benchmarks", "load.py")
    if path is None:
        raise FileNotFoundError("benchmarks/load.py is not in this checkout")
    module = sys.modules.get("kproxy_load")
    if module is None:
        spec = importlib.util.spec_from_file_location("kproxy_load", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["kproxy_load"] = module
        spec.loader.exec_module(module)
    return module


load = _load_module()
log = Logger()


class ShortLoadTests(TestCase):
    """
    The short load: a warm-up, then two phases of 100 connections for 8 s.
    """

    # The run takes about 30 s on 2 cores; the bound is only against a hang.
    timeout = 240

    def test_short_load(self) -> Deferred[None]:
        """
        Through the real daemon: no error of any kind in any phase; every watch saw
        every pod event (consecutive resourceVersions) up to the emitter's last;
        WebSocket and SPDY exec tunnels echoed their random bytes byte for byte and
        the reader's exec got 403; the daemon counted the same responses per status
        code as the clients received.  Afterwards no client connection, open stream,
        tunnel or request in flight; the daemon's upstream sockets are exactly the
        stand-in's idle keep-alive connections, and once those are closed its
        descriptors equal the baseline's; RSS did not grow over the repeated phase
        by more than the margin.
        """

        async def run() -> None:
            settings = load.Settings.short()
            runner = load.LoadRun(reactor, settings, os.path.abspath(self.mktemp()),
                                  say=lambda line: log.info("{line}", line=line))
            outcome = await runner.run()
            log.info("{report}", report=load.format_report(outcome))
            base = runner.baseline
            for phase in [base, *runner.phases]:
                self.assertEqual(phase.errors, {}, "\n".join([phase.name, *phase.samples]))
                self.assertEqual(phase.daemon_by_code, phase.responses_by_code, phase.name)
                watches = phase.watches
                self.assertEqual(watches["short"], 0, phase.name)
                self.assertEqual(watches["count"], round(phase.connections * settings.watch_share))
                self.assertGreater(watches["events_min"], 0, phase.name)
                self.assertEqual(phase.gauges, dict.fromkeys(
                    ("kproxy_open_streams", "kproxy_open_tunnels", "kproxy_requests_in_flight"), 0.0))
                self.assertEqual(phase.fds_pooled.clients, 0, phase.name)
                self.assertEqual(phase.standin_connections["busy"], 0, phase.name)
                self.assertEqual(phase.standin_connections["upgraded"], 0, phase.name)
                self.assertEqual(phase.fds_pooled.upstream, phase.standin_connections["idle"], phase.name)
                self.assertIsNone(phase.not_dropped, phase.name)
            for phase in runner.phases:
                for op in ("exec-websocket", "exec-spdy", "exec-forbidden", "get-pod", "bad-token",
                           "forbidden", "pod-log", "watch-start"):
                    self.assertGreater(phase.ops.get(op, 0), 0, f"{phase.name}: no {op}")
                self.assertGreater(phase.exec_bytes, 0)
                self.assertEqual(phase.fds, base.fds, phase.name)
            first, second = runner.phases
            self.assertLessEqual(second.rss_kib - first.rss_kib, settings.rss_margin_mib * 1024)
            self.assertEqual((outcome["failures"], outcome["ok"]), ([], True))

        return ensureDeferred(run())


class WatchHeadTests(TestCase):
    """
    A watch through the proxy behaves as one straight to the apiserver.
    """

    timeout = 60

    def test_head_before_first_event(self) -> Deferred[None]:
        """
        A watch's response head reaches the client while the stream is open and
        before any event (the apiserver flushes it at once; a client such as
        client-go's ``Watch()`` waits for it), and the event that follows arrives
        on it.
        """

        async def run() -> None:
            stack = LoopbackStack(reactor, os.path.abspath(self.mktemp()))
            await stack.start()
            self.addCleanup(lambda: ensureDeferred(stack.stop()))
            stack.standin.add_pod("web-1")
            worker = load._Worker(reactor, {
                "proxy_port": stack.proxy_port, "ca_file": stack.ca_file, "op_timeout": 30,
            })
            connection = load._HTTP(worker)
            await connection.open()
            self.addCleanup(connection.close)
            token = stack.token("admin@example.com", ["all-admins-corporate-device"])
            rv = stack.standin.resource_version
            response = await worker.timed(connection.send(
                f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}&timeoutSeconds=60",
                token), 30)
            self.assertEqual(response.code, 200)
            lines: list[bytes] = []
            got: Deferred[None] = Deferred()

            class Reader(Protocol):
                def dataReceived(self, data: bytes) -> None:
                    lines.append(data)
                    if b"\n" in data and not got.called:
                        got.callback(None)

            response.deliverBody(Reader())
            self.assertEqual(lines, [])
            stack.standin.add_pod("web-2")
            await worker.timed(got, 30)
            self.assertIn(b'"name": "web-2"', b"".join(lines))

        return ensureDeferred(run())


def _census(**changes: Any) -> Any:
    base = load.FdCensus(14, 2, 0, 0, 0, 0, 0, (("pipe", 7), ("files in /dev", 1)))
    return attr.evolve(base, **changes)


def _phase(name: str, **changes: Any) -> Any:
    clean = load.PhaseReport(
        name=name, connections=100, seconds=8.0, ops={"get-pod": 10}, latency_ms={}, errors={},
        samples=[], watches={"count": 20, "short": 0, "events_min": 5}, exec_bytes=10,
        events_emitted=80, responses_by_code={"200": 10}, daemon_by_code={"200": 10},
        upstream_errors={}, cpu_seconds={}, load_average=(1.0, 1.0), settled_seconds=0.5,
        fds_pooled=_census(total=20, upstream=6), standin_connections={"idle": 6, "busy": 0, "upgraded": 0},
        gauges={"kproxy_open_streams": 0.0, "kproxy_open_tunnels": 0.0, "kproxy_requests_in_flight": 0.0},
        fds=_census(), not_dropped=None, rss_kib=70000,
    )
    return attr.evolve(clean, **changes)


class VerdictTests(SynchronousTestCase):
    """
    `LoadRun.check` fails a run for each kind of problem it looks for.
    """

    def verdict(self, *phases: Any) -> list[str]:
        runner = load.LoadRun(None, load.Settings.short(), "unused")
        runner.baseline = _phase("warm-up", rss_kib=60000)
        runner.phases = list(phases) or [_phase("phase 1"), _phase("phase 2")]
        return runner.check()

    def test_clean(self) -> None:
        """
        A clean run passes.
        """
        self.assertEqual(self.verdict(), [])

    def test_problems(self) -> None:
        """
        Errors, a watch that missed events, an open tunnel, a leaked descriptor, an
        upstream connection that is not idle, a pool that was not dropped, and RSS
        growth over the margin each fail the run, saying which.
        """
        cases = [
            (_phase("phase 2", errors={"timeout": 1}), "phase 2: 1 errors {'timeout': 1}"),
            (_phase("phase 2", watches={"count": 20, "short": 2, "events_min": 5}),
             "phase 2: 2 watches missed the last event"),
            (_phase("phase 2", gauges={"kproxy_open_tunnels": 1.0}),
             "phase 2: kproxy_open_tunnels is 1.0 after the load, not 0"),
            (_phase("phase 2", fds=_census(total=15, other_sockets=1)), "phase 2: descriptors"),
            (_phase("phase 2", fds_pooled=_census(total=20, upstream=6, clients=1)),
             "phase 2: 1 client connections still open"),
            (_phase("phase 2", standin_connections={"idle": 5, "busy": 0, "upgraded": 1}),
             "phase 2: 6 upstream sockets in the daemon, the stand-in has"),
            (_phase("phase 2", not_dropped="the daemon still has 1 upstream connection"),
             "phase 2: the servers closed their idle connections and the daemon still has"),
            (_phase("phase 2", rss_kib=70000 + 4097),
             "phase 2: RSS grew by 4097 KiB over phase 1 (margin 4096 KiB)"),
        ]
        for phase, expected in cases:
            failures = self.verdict(_phase("phase 1"), phase)
            self.assertEqual(len(failures), 1, failures)
            self.assertTrue(failures[0].startswith(expected), failures)
