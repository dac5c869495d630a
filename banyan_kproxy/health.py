"""
Health and metrics: ``/live``, ``/ready`` and ``/metrics`` over plain HTTP.

`Metrics` is a small Prometheus registry (counters, gauges, histograms, with
labels) rendered in the text exposition format 0.0.4, so the daemon needs no
client library.  Updating a metric costs a dict lookup and an add; callers on the
hot path keep the child from ``labels(...)`` and call ``inc`` on it.
`HealthResource` is the ``twisted.web`` resource for ``health_listen``; it adds
``process_*`` metrics read from ``/proc/self`` at scrape time.
"""

from __future__ import annotations

import math
import os
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from twisted.web.server import Site
from twisted.logger import Logger
from twisted.web.resource import Resource

__all__ = [
    "Metrics",
    "Counter",
    "Gauge",
    "Histogram",
    "HealthResource",
    "ReadinessWarning",
    "add_process_metrics",
    "DEFAULT_BUCKETS",
    "CONTENT_TYPE",
]

log = Logger()

#: The ``Content-Type`` of the Prometheus text exposition format.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Histogram buckets (seconds) suited to request latencies, as the Go and Python clients use.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Number = int | float


def _value(v: Number) -> str:
    """
    A sample value as Prometheus writes it (``+Inf``, ``-Inf``, ``NaN``).
    """
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    """
    What counters, gauges and histograms share: name, help, label names, children.
    """

    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        labelnames = tuple(labelnames)
        for label in labelnames:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for metric {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"repeated label name for metric {name}")
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self._children: dict[tuple[str, ...], Any] = {}
        if not labelnames:
            self._only = self._children[()] = self._new_child()

    def _new_child(self) -> Any:
        raise NotImplementedError()

    def labels(self, *values: Any, **kv: Any) -> Any:
        """
        The child for these label values (positional in label order, or by name),
        created on first use.  Keep it for hot paths.
        """
        if kv:
            if values:
                raise ValueError("give label values by position or by name, not both")
            try:
                key = tuple(str(kv[n]) for n in self.labelnames)
            except KeyError as e:
                raise ValueError(f"{self.name} needs labels {self.labelnames}, got {sorted(kv)}") from e
            if len(kv) != len(self.labelnames):
                raise ValueError(f"{self.name} needs labels {self.labelnames}, got {sorted(kv)}")
        else:
            key = tuple(str(v) for v in values)
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} needs labels {self.labelnames}, got {len(key)} values")
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _unlabelled(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels(...)")
        return self._only

    def render(self) -> Iterator[str]:
        """
        The metric's lines in the text exposition format.
        """
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, child in list(self._children.items()):
            yield from self._samples(key, child)

    def _samples(self, key: tuple[str, ...], child: Any) -> Iterator[str]:
        try:
            value = child.get()
        except Exception:
            log.failure("Computing metric {name} failed", name=self.name)
            return
        if value is not None:
            yield f"{self.name}{_labels(self.labelnames, key)} {_value(value)}"


class _FunctionChild:
    """
    A time series whose value a function computes at scrape time.
    """

    __slots__ = ("function",)

    def __init__(self, function: Callable[[], Number | None]) -> None:
        self.function = function

    def inc(self, n: Number = 1) -> None:
        """
        Refuse: the value is computed, not counted.
        """
        raise TypeError("this metric is computed at scrape time")

    def get(self) -> Number | None:
        """
        The value now.
        """
        return self.function()


class _CounterChild:
    """
    One counter time series.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Number = 0

    def inc(self, n: Number = 1) -> None:
        """
        Add ``n`` (not negative).
        """
        if n < 0:
            raise ValueError("a counter only goes up")
        self.value += n

    def get(self) -> Number:
        """
        The current value.
        """
        return self.value


class Counter(_Metric):
    """
    A value that only goes up (requests served, errors).  Name it ``..._total``.
    """

    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, n: Number = 1) -> None:
        """
        Add ``n`` to a counter without labels.
        """
        self._unlabelled().inc(n)


class _GaugeChild:
    """
    One gauge time series, set directly or computed by a function at scrape time.
    """

    __slots__ = ("value", "function")

    def __init__(self) -> None:
        self.value: Number = 0
        self.function: Callable[[], Number | None] | None = None

    def set(self, value: Number) -> None:
        """
        Set the value.
        """
        self.value = value

    def inc(self, n: Number = 1) -> None:
        """
        Add ``n``.
        """
        self.value += n

    def dec(self, n: Number = 1) -> None:
        """
        Subtract ``n``.
        """
        self.value -= n

    def set_function(self, function: Callable[[], Number | None]) -> None:
        """
        Compute the value with ``function`` at every scrape (None leaves the sample out).
        """
        self.function = function

    def get(self) -> Number | None:
        """
        The current value.
        """
        if self.function is not None:
            return self.function()
        return self.value


class Gauge(_Metric):
    """
    A value that goes up and down (open connections, queue length, expiry times).
    """

    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, value: Number) -> None:
        """
        Set a gauge without labels.
        """
        self._unlabelled().set(value)

    def inc(self, n: Number = 1) -> None:
        """
        Add ``n`` to a gauge without labels.
        """
        self._unlabelled().inc(n)

    def dec(self, n: Number = 1) -> None:
        """
        Subtract ``n`` from a gauge without labels.
        """
        self._unlabelled().dec(n)

    def set_function(self, function: Callable[[], Number | None]) -> None:
        """
        Compute a gauge without labels with ``function`` at every scrape.
        """
        self._unlabelled().set_function(function)


class _HistogramChild:
    """
    One histogram: a count per bucket (not cumulative; cumulated when rendered), sum, count.
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum: Number = 0
        self.count = 0

    def observe(self, value: Number) -> None:
        """
        Record one observation.
        """
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Histogram(_Metric):
    """
    Observations (latencies, sizes) counted into ``le`` buckets, with their sum and count.
    """

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if len(set(bounds)) != len(bounds):
            raise ValueError(f"repeated bucket bound for histogram {name}")
        self._bounds = bounds
        labelnames = tuple(labelnames)
        if "le" in labelnames:
            raise ValueError(f"histogram {name} cannot have a label named le")
        super().__init__(name, help, labelnames)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def observe(self, value: Number) -> None:
        """
        Record one observation in a histogram without labels.
        """
        self._unlabelled().observe(value)

    def _samples(self, key: tuple[str, ...], child: _HistogramChild) -> Iterator[str]:
        names = self.labelnames
        cumulative = 0
        les = [_value(b) for b in self._bounds] + ["+Inf"]
        for le, count in zip(les, list(child.counts), strict=True):
            cumulative += count
            bucket_labels = _labels(names, key, f'le="{le}"')
            yield f"{self.name}_bucket{bucket_labels} {cumulative}"
        yield f"{self.name}_sum{_labels(names, key)} {_value(child.sum)}"
        yield f"{self.name}_count{_labels(names, key)} {child.count}"


class Metrics:
    """
    A registry of metrics, rendered together in registration order.
    """

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        function: Callable[[], Number | None] | None = None,
    ) -> Counter:
        """
        Register and return a new `Counter`; ``function`` (only without labels)
        computes its value at every scrape instead of ``inc``.
        """
        counter = Counter(name, help, labelnames)
        if function is not None:
            counter._unlabelled()
            counter._only = counter._children[()] = _FunctionChild(function)
        return self._add(counter)

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        function: Callable[[], Number | None] | None = None,
    ) -> Gauge:
        """
        Register and return a new `Gauge`; ``function`` (only without labels)
        computes its value at every scrape.
        """
        gauge = Gauge(name, help, labelnames)
        if function is not None:
            gauge.set_function(function)
        return self._add(gauge)

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """
        Register and return a new `Histogram` with these bucket upper bounds
        (``+Inf`` is always added).
        """
        return self._add(Histogram(name, help, labelnames, buckets))

    def render(self) -> bytes:
        """
        Every metric in the Prometheus text exposition format 0.0.4.
        """
        lines: list[str] = []
        for metric in list(self._metrics.values()):
            lines.extend(metric.render())
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _proc_stat_fields() -> list[str]:
    with open("/proc/self/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return data[data.rindex(")") + 2 :].split()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _resident_memory_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _cpu_seconds() -> float:
    fields = _proc_stat_fields()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


def _start_time_seconds() -> float:
    # starttime is field 22 of stat(5), in clock ticks since boot.
    ticks = int(_proc_stat_fields()[19])
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def _max_fds() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def add_process_metrics(metrics: Metrics) -> None:
    """
    Register the standard ``process_*`` gauges, read from ``/proc`` at scrape time.
    """
    metrics.gauge("process_open_fds", "Number of open file descriptors.", function=_open_fds)
    metrics.gauge("process_max_fds", "Maximum number of open file descriptors.", function=_max_fds)
    metrics.gauge(
        "process_resident_memory_bytes", "Resident memory size in bytes.", function=_resident_memory_bytes
    )
    metrics.counter(
        "process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", function=_cpu_seconds
    )
    try:
        start = _start_time_seconds()
    except (OSError, ValueError, IndexError):
        start = time.time()
    metrics.gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        function=lambda: start,
    )


class _Leaf(Resource):
    """
    A resource at one exact path: GET and HEAD only, 404 for anything below it.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        """
        Answer, or 404 when the path goes on below this resource.
        """
        if request.postpath and request.postpath != [b""]:
            return _not_found(request)
        return self.answer(request)

    def answer(self, request: Any) -> bytes:
        """
        The response body (subclasses set code and headers on ``request``).
        """
        raise NotImplementedError()


def _plain(request: Any, code: int, body: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return body.encode("utf-8")


def _not_found(request: Any) -> bytes:
    return _plain(request, 404, "not found\n")


class _Live(_Leaf):
    """
    ``/live``: the process is up and its reactor answers.
    """

    def answer(self, request: Any) -> bytes:
        """
        200 ``ok``.
        """
        return _plain(request, 200, "ok\n")


class ReadinessWarning(str):
    """
    A readiness finding that does not fail ``/ready``: the daemon still serves, but
    degraded (e.g. it keeps using signing keys it can no longer refresh).  A readiness
    check returns these among its problems; plain strings are problems.
    """


class _Ready(_Leaf):
    """
    ``/ready``: 200 when the readiness check finds no problem, else 503 listing them;
    warnings follow as ``warning: ...`` lines either way.
    """

    def __init__(self, readiness: Callable[[], list[str]]) -> None:
        super().__init__()
        self._readiness = readiness

    def answer(self, request: Any) -> bytes:
        """
        ``ok``, or the problems one per line with a 503; then any warnings.
        """
        try:
            findings = list(self._readiness())
        except Exception as e:
            log.failure("The readiness check failed")
            findings = [f"readiness check failed: {e}"]
        problems = [f for f in findings if not isinstance(f, ReadinessWarning)]
        lines = problems or ["ok"]
        lines += ["warning: " + f for f in findings if isinstance(f, ReadinessWarning)]
        body = "".join(line.replace("\n", " ") + "\n" for line in lines)
        return _plain(request, 503 if problems else 200, body)


class _MetricsPage(_Leaf):
    """
    ``/metrics``: the registries in the Prometheus text format.
    """

    def __init__(self, registries: Sequence[Metrics]) -> None:
        super().__init__()
        self._registries = registries

    def answer(self, request: Any) -> bytes:
        """
        Every metric, rendered now.
        """
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        request.setHeader(b"Cache-Control", b"no-store")
        return b"".join(r.render() for r in self._registries)


class HealthResource(Resource):
    """
    The root of the health listener: ``/live``, ``/ready``, ``/metrics``; 404 elsewhere.

    ``readiness`` returns the reasons the daemon cannot serve yet (an empty list
    when it can), and `ReadinessWarning` entries for what degrades it without
    stopping it.  ``process_*`` metrics are added to what ``metrics`` holds.
    """

    def __init__(self, metrics: Metrics, readiness: Callable[[], list[str]]) -> None:
        super().__init__()
        process = Metrics()
        add_process_metrics(process)
        self.putChild(b"live", _Live())
        self.putChild(b"ready", _Ready(readiness))
        self.putChild(b"metrics", _MetricsPage((metrics, process)))

    def getChild(self, path: bytes, request: Any) -> Resource:
        """
        404 for anything that is not one of the three pages.
        """
        return _NotFound()

    def render(self, request: Any) -> bytes:
        """
        404 for ``/`` itself.
        """
        return _not_found(request)


class _NotFound(Resource):
    """
    A plain-text 404 for any method.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        """
        404.
        """
        return _not_found(request)


class QuietSite(Site):
    """
    A ``Site`` without the per-request access log line: the daemon logs what matters
    (rejections, upstream failures) itself, and access lines for every request (or
    every load-balancer probe of ``/ready``) would drown it.
    """

    def log(self, request: Any) -> None:
        pass
