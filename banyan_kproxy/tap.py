"""
twistd entry point: ``twistd -n banyan-kproxy --config FILE``.

``makeService`` reads the INI file and builds a ``MultiService`` with one named child
per running part: for ``[proxy]`` ``proxy``, ``health``, ``oidc``, ``certificates``,
``upstream`` (and ``audit``); for ``[gateway]`` and ``[connect]`` their listeners;
and always ``reload`` (SIGHUP).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.python import usage

from banyan_kproxy.config import ConfigError, load_config
from banyan_kproxy.services import fail_startup

DEFAULT_CONFIG = "/etc/banyan-kproxy/kproxy.ini"


class Options(usage.Options):
    """
    Command-line options: only where the configuration file is.
    """

    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The INI configuration file."],
    ]


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build the daemon's services from the configuration file.

    Configuration problems are printed, one per line, and end the process with exit
    status 2 (raising ``UsageError`` would exit 0 on Twisted 22.4).
    """
    daemon = reactor is None  # twistd calls without one; tests pass theirs
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from banyan_kproxy.audit import AuditConfigError
    from banyan_kproxy.health import Metrics
    from banyan_kproxy.proxy.service import add_proxy_role
    from banyan_kproxy.proxy.upstream import CredentialError
    from banyan_kproxy.tls import TLSConfigError

    try:
        config = load_config(options["config"])
    except ConfigError as e:
        raise fail_startup("configuration error:\n  " + "\n  ".join(e.problems), code=2)
    parent = MultiService()
    metrics = Metrics()
    try:
        if config.proxy is not None:
            add_proxy_role(parent, config, reactor, metrics)
        if config.gateway is not None:
            from banyan_kproxy.gateway.service import add_gateway_role

            add_gateway_role(parent, config, reactor, metrics)
        if config.connect is not None:
            from banyan_kproxy.connect.service import add_connect_role

            add_connect_role(parent, config, reactor, metrics)
    except (TLSConfigError, CredentialError) as e:
        raise fail_startup(f"{config.path}: {e}", code=2)
    except AuditConfigError as e:
        raise fail_startup(str(e), code=2)
    # systemctl reload (SIGHUP) re-reads every role's certificate; without a handler
    # SIGHUP would end the daemon.
    from banyan_kproxy.reload import add_sighup_reload

    add_sighup_reload(parent, reactor)
    if daemon:
        tune_garbage_collector()
    return parent


#: Allocations (less deallocations) between two youngest-generation collections;
#: CPython's default is 700.  Measured under load (benchmarks/, /proc schedstat):
#: 5,000 took CPU per request at 128 connections from 393 to 368 µs and p99 from
#: 109 to 82 ms; 20,000 saved little more CPU but held about 5 MiB more garbage
#: after a 500-connection load phase, which the leak check (benchmarks/load.py)
#: cannot tell from a leak.
GC_YOUNG_THRESHOLD = 5_000


def tune_garbage_collector() -> None:
    """
    Make the cyclic garbage collector cheaper for a long-running proxy.

    Everything built so far (modules, configuration, services) lives as long as the
    process: ``gc.freeze()`` moves it out of the collector's sight, so a full
    collection no longer walks it.  Each request allocates hundreds of objects that
    die with it; with CPython's default threshold (700) a young collection ran
    every few requests, and opening thousands of watches spent a fifth of the
    reactor's time in the collector.  Cycles are still collected, only in larger
    batches (see `GC_YOUNG_THRESHOLD` for the trade against memory).
    """
    import gc

    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
