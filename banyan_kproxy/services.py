"""
Small ``twisted.application`` services shared by every role.

A listener binds in ``privilegedStartService`` so that a port that cannot be bound
stops ``twistd`` before the reactor runs, with one readable line and a non-zero exit,
instead of leaving a half-started daemon that systemd reports as running.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger


class StartupError(SystemExit):
    """
    The daemon cannot start; the message has already been printed.
    """


def fail_startup(message: str, code: int = 1) -> StartupError:
    """
    Print ``message`` as one line on standard error and return the exit to raise.

    The process's real standard error is used: once twistd has started logging,
    ``sys.stderr`` is redirected into the log.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"banyan-kproxy: {message}\n")
    stream.flush()
    return StartupError(code)


class ListeningService(Service):
    """
    Binds with ``listen()`` when the application starts; stops listening on stop,
    then runs ``drain()`` (if given), which fires once the connections it had are
    dealt with (`banyan_kproxy.proxy.drain`).  `when_stopped` lets other services
    (the audit service) stop only after that.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        description: str,
        listen: Callable[[], IListeningPort],
        drain: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        self.name = name
        self.description = description
        self._listen = listen
        self._drain = drain
        self.port: IListeningPort | None = None
        self._stopping = False
        self._stop_waiters: list[Deferred[None]] = []

    def privilegedStartService(self) -> None:
        try:
            self.port = self._listen()
        except CannotListenError as e:
            raise fail_startup(f"cannot listen for {self.description}: {e}")
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        Service.startService(self)
        address = self.port.getHost()  # type: ignore[union-attr]
        self.log.info(
            "{description} listening on {host}:{port}",
            description=self.description,
            host=address.host,
            port=address.port,
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        self._stopping = True
        stopped: Deferred[Any] = succeed(None) if port is None else maybeDeferred(port.stopListening)
        if self._drain is not None:
            drain = self._drain
            stopped.addCallback(lambda _: drain())
            stopped.addErrback(
                lambda f: self.log.failure("Draining {description} failed", f, description=self.description)
            )
        stopped.addBoth(self._stopped)
        return stopped

    def _stopped(self, result: object) -> object:
        self._stopping = False
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return result

    def when_stopped(self) -> Deferred[None]:
        """
        Fires once this service is stopped: at once unless it is running or its
        stop (listening, then the drain) is still going on.
        """
        if not self.running and not self._stopping:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        return waiter


class CallbackService(Service):
    """
    Calls ``start()`` and ``stop()`` of some object when the application does.
    """

    def __init__(self, name: str, start: Callable[[], Any], stop: Callable[[], Any]) -> None:
        self.name = name
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        Service.startService(self)
        self._start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return maybeDeferred(self._stop)
