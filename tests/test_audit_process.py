"""
Process-level audit tests: a process killed with SIGKILL mid-stream and started
again delivers every event it had accepted.

Two processes are exercised: the audit service alone, fed at a steady rate by
``python -m banyan_kproxy.audit.testing`` (its audit IDs are sequential, so exactly
which events were accepted before the kill is known), and the real daemon
(``twistd -n banyan-kproxy`` via `LoopbackStack`) with requests through the proxy.
The receiver is a ``twisted.web`` Site on 127.0.0.1 in this process.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import treq
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent
from twisted.web.server import Site

from banyan_kproxy.audit.spool import SegmentStore
from banyan_kproxy.audit.testing import WebhookReceiver
from banyan_kproxy.testing.stack import READER_ROLE, LoopbackStack, repository_file
from banyan_kproxy.tls import https_policy


def source_env() -> dict[str, str]:
    """
    The environment that makes child processes run this checkout's code.
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(repository_file("twisted", "plugins") or ""))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


async def until(condition: Any, what: str, timeout: float) -> None:
    """
    Wait (bounded) until ``condition()`` holds, looking every 20 ms.
    """
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def spooled_ids(directory: str) -> set[tuple[str, str]]:
    """
    (auditID, stage) of every whole record left in a spool directory.
    """
    import json

    store = SegmentStore(directory, 1 << 20)
    segments = store.segments()
    if not segments:
        return set()
    read = store.read(segments[0][0], segments[-1][0] + segments[-1][1], segments, 1 << 30, 1 << 30)
    return {(json.loads(r.data)["auditID"], json.loads(r.data)["stage"]) for r in read.records}


class Receiver:
    """
    A webhook receiver on 127.0.0.1:0 and a kubeconfig pointing at it.
    """

    def __init__(self, case: TestCase, directory: str) -> None:
        self.resource = WebhookReceiver(reactor)
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)
        self.kubeconfig = os.path.join(directory, "webhook.yaml")
        with open(self.kubeconfig, "w") as f:
            f.write(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: r\n  cluster:\n"
                f"    server: http://127.0.0.1:{self.port.getHost().port}/audit\n"
                "contexts:\n- name: r\n  context: {cluster: r}\ncurrent-context: r\n"
            )


class _Driver(protocol.ProcessProtocol):
    """
    The load driver child: its output, the last accepted count it reported, its exit.
    """

    def __init__(self) -> None:
        self.output = b""
        self.spooled = 0
        self.started: Deferred[None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for line in self.output.splitlines():
            if line.startswith(b"spooled "):
                self.spooled = max(self.spooled, int(line.split()[1]))
        if b"started\n" in self.output and not self.started.called:
            self.started.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.started.called:
            self.started.errback(RuntimeError(f"the driver exited early:\n{self.output.decode()}"))
        self.ended.callback(getattr(reason.value, "exitCode", None))


class AuditServiceKillTests(TestCase):
    """
    The audit service alone, killed and restarted.
    """

    timeout = 120

    def spawn(self, settings: dict[str, Any]) -> tuple[_Driver, Any]:
        import json

        driver = _Driver()
        process = reactor.spawnProcess(
            driver,
            sys.executable,
            [sys.executable, "-m", "banyan_kproxy.audit.testing", json.dumps(settings)],
            env=source_env(),
        )

        def kill_if_running() -> Deferred[Any] | None:
            if driver.ended.called:
                return None
            process.signalProcess("KILL")
            return driver.ended

        self.addCleanup(kill_if_running)
        return driver, process

    async def _killed_mid_stream(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        receiver = Receiver(self, directory)
        audit = {
            "webhook_config_file": receiver.kubeconfig,
            "spool_dir": os.path.join(directory, "spool"),
            "spool_max_bytes": 64 << 20,
            "batch_max_wait": 0.2,
            "batch_max_size": 50,
            "batch_buffer_size": 300,
            "batch_throttle_qps": 10.0,
            "batch_throttle_burst": 2,
            "initial_backoff": 0.2,
        }
        # Generating 3000 events/s against a sink throttled to 500/s builds a
        # backlog that lives only in the spool when the process dies.
        first, process = self.spawn({"audit": audit, "run": "r0", "rate": 3000})
        await first.started
        await until(lambda: first.spooled >= 2000 and receiver.resource.batches, "2000 accepted events", 30)
        process.signalProcess(signal.SIGKILL)
        code = await first.ended
        self.assertIsNone(code)  # killed, not exited
        accepted = first.spooled
        delivered_before = len(receiver.resource.unique())
        self.assertGreater(delivered_before, 0)
        self.assertLess(delivered_before, accepted)
        expected = {(f"r0-{n:06d}", "ResponseComplete") for n in range(accepted)}
        on_disk = spooled_ids(audit["spool_dir"])
        missing = expected - on_disk - set(receiver.resource.unique())
        self.assertEqual(len(missing), 0, f"accepted but neither delivered nor spooled: {sorted(missing)[:5]}")

        second, process = self.spawn({"audit": audit, "run": "r1", "rate": 0})
        await second.started
        # Everything accepted, and everything else that reached the disk, arrives.
        await until(lambda: (expected | on_disk) <= set(receiver.resource.unique()), "every accepted event", 60)
        self.assertEqual(len(expected - set(receiver.resource.unique())), 0)
        receiver.resource.unique()  # repeats, if any, are identical
        process.signalProcess("TERM")
        self.assertEqual(await second.ended, 0)
        self.assertNotIn(b"Traceback", second.output)

    def test_killed_mid_stream(self) -> None:
        """
        A process that accepted thousands of events, delivered some and was killed
        with SIGKILL delivers all of the accepted ones after it is started again.
        """
        return Deferred.fromCoroutine(self._killed_mid_stream())


class DaemonKillTests(TestCase):
    """
    The real daemon, with requests through the proxy, killed and restarted.
    """

    timeout = 180

    async def _daemon(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        receiver = Receiver(self, directory)
        spool_dir = os.path.join(directory, "spool")
        stack = LoopbackStack(
            reactor,
            os.path.join(directory, "stack"),
            extra_ini=(
                "\n[audit]\n"
                f"webhook_config_file = {receiver.kubeconfig}\n"
                f"spool_dir = {spool_dir}\n"
                # 20 events/s at most: a backlog builds up in the spool under load.
                "batch_max_wait = 200ms\nbatch_max_size = 10\nbatch_throttle_qps = 2\n"
                "batch_throttle_burst = 1\ninitial_backoff = 200ms\n"
            ),
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(stack.stop()))
        await stack.start()
        if "Audit events to" not in stack.daemon_output:
            raise SkipTest("the daemon does not run the audit service yet (tap wiring pending)")
        token = stack.token("reader@example.com", roles=[READER_ROLE])
        agent = Agent(reactor, contextFactory=https_policy(stack.ca_file))
        seen: list[str] = []
        running = [True]

        async def client() -> None:
            while running[0]:
                try:
                    response = await treq.get(
                        stack.proxy_url + "/api/v1/namespaces/default/pods",
                        headers={"Authorization": f"Bearer {token}"},
                        agent=agent,
                        timeout=5,
                    )
                    await treq.content(response)
                    seen.extend(v.decode() for v in response.headers.getRawHeaders(b"audit-id", []))
                except Exception:  # noqa: BLE001 - the daemon is killed under us
                    await deferLater(reactor, 0.05, lambda: None)

        clients = [Deferred.fromCoroutine(client()) for _ in range(4)]

        async def spooled() -> int:
            response = await treq.get(stack.health_url + "/metrics", timeout=5, persistent=False)
            for line in (await treq.text_content(response)).splitlines():
                if line.startswith("kproxy_audit_events_spooled_total "):
                    return int(float(line.split()[1]))
            return 0

        known = 0
        for _ in range(300):
            known = await spooled()
            if known >= 300:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(known, 300, "the proxy did not emit audit events")
        await stack.kill_daemon()
        running[0] = False
        await gatherResults(clients)
        on_disk = spooled_ids(spool_dir)
        delivered_before = set(receiver.resource.unique())
        self.assertGreaterEqual(len(on_disk | delivered_before), known)
        self.assertTrue(on_disk - delivered_before, "nothing was waiting in the spool at the kill")

        await stack.restart_daemon()
        await until(lambda: on_disk <= set(receiver.resource.unique()), "every spooled event", 60)
        events = receiver.resource.unique()
        ids = {audit_id for audit_id, _ in events}
        # The events carry the Audit-ID the clients saw, and the caller's identity.
        self.assertTrue(set(seen) & ids)
        sample = next(e for e in events.values() if e["stage"] == "ResponseComplete")
        self.assertEqual(sample["user"]["username"], "banyan:reader@example.com")
        self.assertEqual(sample["verb"], "list")

    def test_daemon_killed_mid_stream(self) -> None:
        """
        A daemon proxying a steady stream of requests, killed with SIGKILL and
        started again, delivers every event that was in its spool at the kill.
        """
        return Deferred.fromCoroutine(self._daemon())
