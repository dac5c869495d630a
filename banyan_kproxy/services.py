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
    Binds with ``listen()`` when the application starts; stops listening on stop.
    """

    log = Logger()

    def __init__(self, name: str, description: str, listen: Callable[[], IListeningPort]) -> None:
        self.name = name
        self.description = description
        self._listen = listen
        self.port: IListeningPort | None = None

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
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


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
