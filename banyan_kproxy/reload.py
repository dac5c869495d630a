"""
SIGHUP (``systemctl reload``): re-read what can change without a restart.

`add_sighup_reload` (called by ``tap.makeService`` whatever the roles) adds one
``reload`` service that re-reads every role's TLS certificate (each `ServerTLS`
watched by a `CertificateReloader`: the proxy's, the gateway's).

`SighupService` installs a SIGHUP handler while it runs.  The handler calls each of
its ``actions`` in the reactor thread, then chains to the handler that was installed
before it (the audit service installs one that reopens its log files), so every part
that reloads on SIGHUP does so whatever order the parts started in.  Without any
handler SIGHUP would end the process: the connect role, with no certificate, still
gets one.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from attr import define, field
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.logger import Logger

from banyan_kproxy.tls import CertificateReloader

__all__ = ["SighupService", "add_sighup_reload"]


def add_sighup_reload(parent: MultiService, reactor: Any) -> SighupService:
    """
    Add a ``reload`` child to ``parent`` that re-reads, on SIGHUP, the certificate of
    every `CertificateReloader` in it (at any depth).  Add it last: it then starts
    after the audit service and chains to its handler (which reopens the audit log).
    """
    certificates = []
    pending: list[Any] = [parent]
    while pending:
        for service in pending.pop(0):
            if isinstance(service, CertificateReloader):
                certificates.append(service.server_tls)
            if IServiceCollection.providedBy(service):
                pending.append(service)
    reload = SighupService("reload", [tls.reload for tls in certificates], reactor)
    reload.setServiceParent(parent)
    return reload


@define(eq=False)
class SighupService(Service):
    """
    While running, SIGHUP calls every one of ``actions`` in the reactor thread.

    An action that raises is logged and the others still run.
    """

    name: str  # type: ignore[assignment]
    actions: Sequence[Callable[[], object]]
    reactor: Any
    log = Logger()
    _previous: Any = field(init=False, default=None)
    _handler: Any = field(init=False, default=None)

    def startService(self) -> None:
        """
        Install the SIGHUP handler, remembering the one it replaces.
        """
        Service.startService(self)
        previous = signal.getsignal(signal.SIGHUP)

        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)
            if callable(previous):
                previous(signum, frame)

        self._previous = previous
        self._handler = on_sighup
        signal.signal(signal.SIGHUP, on_sighup)

    def stopService(self) -> Any:
        """
        Put back the handler it replaced, unless another has been installed since.
        """
        if self._handler is not None and signal.getsignal(signal.SIGHUP) is self._handler:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
        self._handler = None
        return Service.stopService(self)

    def reload(self) -> None:
        """
        Run every action now (what SIGHUP does).
        """
        self.log.info("SIGHUP: reloading ({name})", name=self.name)
        for action in self.actions:
            try:
                action()
            except Exception:  # noqa: BLE001 - one failed reload must not stop the others
                self.log.failure("Reloading on SIGHUP failed ({name})", name=self.name)
