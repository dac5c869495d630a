"""
``[proxy] reuse_port = true``: two real daemon processes (``twistd -n banyan-kproxy``)
share one listening port, as several instances of ``banyan-kproxy@.service`` do.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent

from banyan_kproxy.testing.stack import READER_ROLE, LoopbackStack
from banyan_kproxy.tls import https_policy

_SERVED = re.compile(r'^kproxy_requests_total\{method="GET",code="200"\} (\S+)$', re.MULTILINE)


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def served(health_port: int) -> int:
    """
    How many GETs answered 200 one daemon's ``/metrics`` counts.
    """
    response = await treq.get(f"http://127.0.0.1:{health_port}/metrics", timeout=5, persistent=False)
    match = _SERVED.search(await treq.text_content(response))
    return int(float(match.group(1))) if match else 0


class ReusePortTests(TestCase):
    """
    Two daemon processes on one port, both serving.
    """

    timeout = 120

    def test_two_processes_one_port(self) -> Deferred[None]:
        """
        Both processes listen on the same port and each serves some of 40 new
        connections (the kernel spreads them; all 40 on one side would happen with
        probability 2**-39); with one stopped by its PID the other serves everything.
        """

        async def run() -> None:
            port = free_port()
            directory = os.path.abspath(self.mktemp())
            stack = LoopbackStack(
                reactor, directory, proxy_listen=f"127.0.0.1:{port}", reuse_port=True
            )
            self.addCleanup(lambda: Deferred.fromCoroutine(stack.stop()))
            await stack.start()
            self.assertEqual(stack.proxy_port, port)

            second, process = stack.spawn_daemon(os.path.join(directory, "daemon-2.log"))

            def kill_second() -> None:
                if not second.ended.called:
                    os.kill(process.pid, signal.SIGKILL)

            self.addCleanup(kill_second)
            second.listening.addTimeout(30, reactor)
            await second.listening
            self.assertEqual(second.ports["the proxy"], port)
            health = [stack.health_port, second.ports["health and metrics"]]
            self.assertNotEqual(health[0], health[1])
            for _ in range(300):
                response = await treq.get(
                    f"http://127.0.0.1:{health[1]}/ready", timeout=5, persistent=False
                )
                await treq.content(response)
                if response.code == 200:
                    break
                await deferLater(reactor, 0.1, lambda: None)
            self.assertEqual(response.code, 200, second.output.decode())

            token = stack.token("myuser@example.com", [READER_ROLE])
            agent = Agent(reactor, contextFactory=https_policy(stack.ca_file))

            async def get_pods() -> int:
                # A fresh connection each time: the kernel picks a process per connection.
                response: Any = await treq.get(
                    stack.proxy_url + "/api/v1/namespaces/default/pods",
                    headers={"Authorization": f"Bearer {token}", "Connection": "close"},
                    agent=agent,
                    timeout=10,
                )
                await treq.content(response)
                return int(response.code)

            codes = [await get_pods() for _ in range(40)]
            self.assertEqual(codes, [200] * 40)
            counts = [await served(p) for p in health]
            self.assertEqual(sum(counts), 40, counts)
            self.assertGreater(min(counts), 0, counts)

            # An orderly stop (twistd ends by re-raising SIGTERM on newer Twisted,
            # with status 0 on 22.4; systemd counts both as a clean stop).
            os.kill(process.pid, signal.SIGTERM)
            second.ended.addTimeout(20, reactor)
            await second.ended
            self.assertIn("Server Shut Down.", second.output.decode())
            self.assertEqual([await get_pods() for _ in range(10)], [200] * 10)
            self.assertEqual(await served(health[0]), counts[0] + 10)
            pid = stack.daemon_pid
            await stack.stop()
            self.assertIn("Server Shut Down.", stack.daemon_output)
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)

        return Deferred.fromCoroutine(run())
