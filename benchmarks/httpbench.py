"""
The HTTP scenarios of ``make bench``: small authenticated GETs, a 20 MB list, and
start-up time and idle memory, each measured side by side in one run against

- ``direct``: the nginx "apiserver" itself (with the proxy's credential);
- ``banyan-kproxy``: the real daemon, one process, and ``banyan-kproxy x2``: two
  processes sharing the port with ``reuse_port``;
- ``haproxy``: Debian's HAProxy verifying the same JWT with ``jwt_verify`` and setting
  ``Impersonate-User``, with ``nbthread 1`` and ``nbthread 2``.

(`rig` describes the deployment.)  All targets run at the same time and the
measurements interleave (concurrency outer, target inner), so a noisy neighbour on
the shared machine affects every target of a point alike rather than one of them.

Load generator: ``wrk`` (``-t1`` at one connection, ``-t2`` above), a Lua script
that sets the bearer token and prints requests, duration and the 50th/99th latency
percentiles in microseconds.  Each point gets a short warm-up (connections, pools,
caches), then three runs of 3 s (``--quick``: one of 2 s) taken in rounds across the
targets; the table shows the median, the JSON every run.  "CPU per request" is the
user + system time of the target's processes (direct: nginx) over the requests
served: unlike requests/s it hardly depends on what else the machine is doing.
"Added latency" is the proxied percentile minus the direct percentile at the same
concurrency.  The 20 MB list is fetched by ``curl`` repeatedly on one kept-alive
connection; throughput is the bytes of the list divided by the transfer times
reported by curl for all but the first (warm-up) transfer.

CPU placement: nothing is pinned.  The machine has two cores shared by the load
generator, the proxy and nginx; pinning the proxy to one core would make the
two-process and two-thread targets meaningless, and each target faces the same
competition for CPU from wrk and nginx.  The figures are therefore a whole-machine
cost: a proxy that needs more CPU per request leaves less to wrk and nginx too.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

import attr

import report
from report import (
    DIRECT,
    HAPROXY,
    HAPROXY_2,
    KPROXY,
    KPROXY_2,
    METRIC_ADDED_P50,
    METRIC_ADDED_P99,
    METRIC_CPU_PER_REQUEST,
    METRIC_IDLE_RSS,
    METRIC_P50,
    METRIC_P99,
    METRIC_RPS,
    METRIC_STARTUP,
    METRIC_THROUGHPUT,
    SCENARIO_LARGE_LIST,
    SCENARIO_STARTUP,
    Measurement,
    small_get_scenario,
)
from rig import LARGE_PATH, SMALL_PATH, Rig, Target, find_tool, slug

CONCURRENCY = (1, 16, 128)

_WRK_SCRIPT = """
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%f p99_us=%f non2xx=%d errors=%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""
_WRK_RESULT = re.compile(
    r"BENCH requests=(\d+) duration_us=(\d+) p50_us=([\d.]+) p99_us=([\d.]+) non2xx=(\d+) errors=(\d+)"
)


@attr.s(auto_attribs=True, frozen=True)
class LoadResult:
    """
    What one wrk run measured.
    """

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def note(self) -> str:
        bad = []
        if self.non2xx:
            bad.append(f"{self.non2xx} non-2xx")
        if self.errors:
            bad.append(f"{self.errors} socket errors")
        return ", ".join(bad)


@attr.s(auto_attribs=True)
class Settings:
    """
    How long and how often each point runs.
    """

    duration: float  # seconds of one measured wrk run
    rounds: int  # runs per point, interleaved across targets; the median is reported
    warmup: float
    large_transfers: int  # 20 MB transfers per target and round
    startups: int

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(duration=2.0, rounds=1, warmup=0.5, large_transfers=4, startups=1)
        return cls(duration=3.0, rounds=3, warmup=1.0, large_transfers=4, startups=3)


def wrk(rig: Rig, target: Target, path: str, connections: int, seconds: float) -> LoadResult:
    """
    Run wrk against ``target`` for ``seconds`` with ``connections`` connections.
    """
    script = os.path.join(rig.workdir, f"wrk-{slug(target.name)}.lua")
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_WRK_SCRIPT.format(token=target.token))
    threads = 1 if connections == 1 else 2
    duration = max(1, round(seconds))
    argv = [
        find_tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "-s", script, target.url(path),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    match = _WRK_RESULT.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    requests, duration_us, p50, p99, non2xx, errors = match.groups()
    return LoadResult(
        int(requests), int(duration_us) / 1e6, float(p50) / 1000, float(p99) / 1000, int(non2xx), int(errors)
    )


def small_get(rig: Rig, targets: Sequence[Target], settings: Settings, log: Callable) -> list[Measurement]:
    """
    The 10-pod list at concurrency 1, 16 and 128: requests/s, p50/p99 latency, CPU
    per request, and the latency each proxy adds to direct.  Each point is the
    median of ``settings.rounds`` runs; the rounds go through all targets in turn.
    """
    measurements: list[Measurement] = []
    for connections in CONCURRENCY:
        scenario = small_get_scenario(connections)
        runs: dict[str, list[tuple[LoadResult, list[float]]]] = {t.name: [] for t in targets}
        for round_ in range(settings.rounds):
            for target in targets:
                if round_ == 0:
                    wrk(rig, target, SMALL_PATH, connections, settings.warmup)
                cpu_before = target.cpu_seconds()
                result = wrk(rig, target, SMALL_PATH, connections, settings.duration)
                cpu = [after - before for before, after in zip(cpu_before, target.cpu_seconds(), strict=True)]
                runs[target.name].append((result, cpu))
                log(
                    f"  {scenario}, {target.name}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                    f"p99 {result.p99_ms:.2f} ms, {_cpu_us(result, cpu):.0f} µs CPU/request"
                    f"{' (' + result.note + ')' if result.note else ''}"
                )
        direct = runs[DIRECT]
        for target in targets:
            results = runs[target.name]
            loads = [r for r, _ in results]
            rps = [r.rps for r in loads]
            p50 = [r.p50_ms for r in loads]
            p99 = [r.p99_ms for r in loads]
            cpu_us = [_cpu_us(r, cpu) for r, cpu in results]
            notes = sorted({r.note for r in loads if r.note})
            cpu_note = ""
            shares = [sum(x) for x in zip(*(cpu for _, cpu in results), strict=True)]
            if len(shares) > 1 and sum(shares):
                cpu_note = "CPU split between the processes " + "/".join(f"{c / sum(shares):.0%}" for c in shares)
            measurements += [
                _median(scenario, target.name, METRIC_RPS, rps, "req/s", note="; ".join(notes)),
                _median(scenario, target.name, METRIC_P50, p50, "ms", higher_is_better=False),
                _median(scenario, target.name, METRIC_P99, p99, "ms", higher_is_better=False),
                _median(scenario, target.name, METRIC_CPU_PER_REQUEST, cpu_us, "µs",
                        higher_is_better=False, note=cpu_note),
            ]
            if target.name != DIRECT:
                direct_p50 = statistics.median(r.p50_ms for r, _ in direct)
                direct_p99 = statistics.median(r.p99_ms for r, _ in direct)
                measurements += [
                    Measurement(scenario, target.name, METRIC_ADDED_P50, statistics.median(p50) - direct_p50,
                                "ms", baseline=None, higher_is_better=False),
                    Measurement(scenario, target.name, METRIC_ADDED_P99, statistics.median(p99) - direct_p99,
                                "ms", baseline=None, higher_is_better=False),
                ]
    return measurements


def _cpu_us(result: LoadResult, cpu: Sequence[float]) -> float:
    return sum(cpu) / result.requests * 1e6 if result.requests else 0.0


def _median(
    scenario: str, target: str, metric: str, values: Sequence[float], unit: str, **kwargs: object
) -> Measurement:
    samples = tuple(values) if len(values) > 1 else ()
    return Measurement(scenario, target, metric, statistics.median(values), unit, samples=samples, **kwargs)


def curl_transfers(rig: Rig, target: Target, path: str, count: int) -> list[tuple[int, float]]:
    """
    ``count`` GETs of ``path`` on one kept-alive connection; ``(bytes, seconds)`` each.
    """
    config = os.path.join(rig.workdir, f"curl-{slug(target.name)}.cfg")
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'header = "Authorization: Bearer {target.token}"\n')
        f.write(f'cacert = "{rig.ca_file}"\n')
        f.write('write-out = "%{http_code} %{size_download} %{time_total} %{time_pretransfer}\\n"\n')
        for _ in range(count):
            f.write(f'url = "{target.url(path)}"\noutput = "/dev/null"\n')
    done = subprocess.run(
        [find_tool("curl"), "--silent", "--show-error", "--config", config],
        capture_output=True, text=True, timeout=600, check=False,
    )
    transfers = []
    for line in done.stdout.split("\n"):
        if not line.strip():
            continue
        code, size, total, pretransfer = line.split()
        if code != "200":
            raise RuntimeError(f"{target.name}: {path} answered {code}")
        transfers.append((int(size), float(total) - float(pretransfer)))
    if len(transfers) != count:
        raise RuntimeError(f"curl made {len(transfers)} of {count} transfers: {done.stderr[-500:]}")
    return transfers


def large_list(rig: Rig, targets: Sequence[Target], settings: Settings, log: Callable) -> list[Measurement]:
    """
    The 20 MB list on one connection: MB/s (10^6 bytes per second) over all the
    transfers of all rounds, and the peak RSS of each proxy during them (it must
    stream, not buffer).
    """
    transfers: dict[str, list[tuple[int, float]]] = {t.name: [] for t in targets}
    before = {t.name: t.rss_mib() for t in targets}
    peak_reset = {t.name: t.reset_peak_rss() for t in targets}
    for _ in range(settings.rounds):
        for target in targets:
            done = curl_transfers(rig, target, LARGE_PATH, settings.large_transfers + 1)[1:]
            for size, _ in done:
                if size != rig.large_bytes:
                    raise RuntimeError(f"{target.name}: the list arrived with {size} bytes, not {rig.large_bytes}")
            transfers[target.name] += done
    measurements = []
    for target in targets:
        done = transfers[target.name]
        rate = sum(size for size, _ in done) / sum(t for _, t in done) / 1e6
        log(f"  {SCENARIO_LARGE_LIST}, {target.name}: {rate:,.0f} MB/s")
        measurements.append(Measurement(
            SCENARIO_LARGE_LIST, target.name, METRIC_THROUGHPUT, rate, "MB/s",
            samples=tuple(size / t / 1e6 for size, t in done),
        ))
    for target in targets:
        if target.name != DIRECT:
            note = f"{before[target.name]:.0f} MiB before"
            if not peak_reset[target.name]:
                note += "; the peak since start-up (VmHWM could not be reset)"
            measurements.append(Measurement(
                SCENARIO_LARGE_LIST, target.name, "peak RSS", target.rss_mib("VmHWM"), "MiB",
                baseline=None, higher_is_better=False, note=note,
            ))
    return measurements


def startup(rig: Rig, settings: Settings, log: Callable) -> list[Measurement]:
    """
    Process start to first ``/ready`` 200 (banyan-kproxy) or first proxied 200
    (HAProxy), and the resident memory just after; median of ``startups`` starts.
    """
    results: dict[str, tuple[list[float], list[float]]] = {KPROXY: ([], []), HAPROXY: ([], [])}
    for _ in range(settings.startups):
        for name in (KPROXY, HAPROXY):
            target = rig.start_kproxy(1, name + " start-up") if name == KPROXY else rig.start_haproxy(
                1, name + " start-up"
            )
            try:
                ready_at = time.monotonic()
                elapsed = ready_at - target.children[0].started_at
                time.sleep(0.5)  # let start-up garbage settle
                results[name][0].append(elapsed)
                results[name][1].append(target.rss_mib())
            finally:
                rig.stop(target)
    measurements = []
    for name, (times, rss) in results.items():
        log(f"  {SCENARIO_STARTUP}, {name}: {statistics.median(times):.2f} s, {statistics.median(rss):.1f} MiB")
        baseline = None if name == HAPROXY else HAPROXY
        measurements += [
            Measurement(SCENARIO_STARTUP, name, METRIC_STARTUP, statistics.median(times), "s",
                        baseline=baseline, higher_is_better=False),
            Measurement(SCENARIO_STARTUP, name, METRIC_IDLE_RSS, statistics.median(rss), "MiB",
                        baseline=baseline, higher_is_better=False),
        ]
    return measurements


#: The scenarios of this module, as ``--only`` names them.
SCENARIOS = ("small-get", "large-list", "startup")


def run(
    workdir: str, quick: bool, only: Iterable[str] = SCENARIOS, log: Callable[[str], None] = print
) -> list[Measurement]:
    """
    Set up the rig in ``workdir``, measure the chosen scenarios, stop everything.
    """
    only = set(only)
    settings = Settings.for_run(quick)
    rig = Rig(workdir)
    measurements: list[Measurement] = []
    try:
        log("setting up nginx, banyan-kproxy and HAProxy ...")
        rig.setup()
        assert rig.direct is not None
        targets = [rig.direct]
        if only & {"small-get", "large-list"}:
            targets.append(rig.start_kproxy(1, KPROXY))
            targets.append(rig.start_haproxy(1, HAPROXY))
        if "small-get" in only:
            targets.insert(2, rig.start_kproxy(2, KPROXY_2))
            targets.append(rig.start_haproxy(2, HAPROXY_2))
        for target in targets:
            rig.check_target(target)
        if "small-get" in only:
            measurements += small_get(rig, targets, settings, log)
        if "large-list" in only:
            single = [t for t in targets if t.name in (DIRECT, KPROXY, HAPROXY)]
            measurements += large_list(rig, single, settings, log)
        for target in targets[1:]:
            rig.stop(target)
        if "startup" in only:
            measurements += startup(rig, settings, log)
    finally:
        rig.close()
    return measurements


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as directory:
        print(report.render_table(run(directory, quick=True)))
