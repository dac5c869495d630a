"""
What every benchmark scenario returns, and how ``make bench`` prints and saves it.

A scenario is a function that sets up what it measures on loopback, measures it, stops
everything it started, and returns a list of `Measurement`.  Each measurement names
the target it was taken against (``direct``, ``banyan-kproxy``, ``haproxy`` ...) and,
where it makes sense, the target it is compared with (``baseline``): the report
prints ``value / baseline value`` for the same scenario and metric, taken in the same
run.  Benchmarks never pass or fail; `Goal` only says by how much a target is met or
missed.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Sequence

import attr

# Names shared by the scenario modules (httpbench.py, streams.py, micro.py) and the
# goals in bench.py: a goal finds its measurement by (scenario, target, metric), so a
# module that measures something a goal is about must use these exact strings.
# Scenario names.
SCENARIO_SMALL_GET = "small GET (10-pod list), concurrency {concurrency}"  # .format(concurrency=16)
SCENARIO_LARGE_LIST = "20 MB list"
SCENARIO_WATCHES = "10,000 idle watches"
SCENARIO_TUNNEL = "upgrade tunnel, 1 GB"
SCENARIO_TOKEN = "token verification"
SCENARIO_AUDIT = "audit pipeline"
SCENARIO_STARTUP = "start-up and idle"

# Target names.
DIRECT = "direct"
KPROXY = "banyan-kproxy"
KPROXY_2 = "banyan-kproxy x2 (reuse_port)"
HAPROXY = "haproxy"
HAPROXY_2 = "haproxy x2 (nbthread 2)"

# Metric names.  HTTP scenarios (httpbench.py):
METRIC_RPS = "requests/s"  # unit "req/s"
METRIC_P50 = "latency p50"  # unit "ms"
METRIC_P99 = "latency p99"  # unit "ms"
METRIC_ADDED_P50 = "added latency p50"  # proxied p50 minus direct p50, unit "ms"
METRIC_ADDED_P99 = "added latency p99"  # unit "ms"
METRIC_CPU_PER_REQUEST = "CPU per request"  # the target's processes (direct: nginx), unit "µs"
METRIC_THROUGHPUT = "throughput"  # unit "MB/s" (20 MB list)
METRIC_STARTUP = "start-up to ready"  # unit "s"
METRIC_IDLE_RSS = "idle RSS"  # unit "MiB"
# Watches (streams.py), scenario SCENARIO_WATCHES:
METRIC_WATCH_RSS = "RSS with all watches open"  # whole daemon, unit "MB" (goal: < 500)
METRIC_WATCH_RSS_PER = "RSS per watch"  # unit "KiB"
METRIC_FANOUT_P50 = "event fan-out p50"  # unit "ms"
METRIC_FANOUT_P99 = "event fan-out p99"  # unit "ms"
METRIC_FANOUT_MAX = "event fan-out max"  # unit "ms"
# Tunnel (streams.py), scenario SCENARIO_TUNNEL, unit "MB/s", baseline DIRECT:
METRIC_UPLOAD = "upload"
METRIC_DOWNLOAD = "download"
# Token verification (micro.py), scenario SCENARIO_TOKEN, target KPROXY:
METRIC_TOKEN_CACHED_RS256 = "cached check, RS256"  # unit "µs" (goal: < 5)
METRIC_TOKEN_CACHED_ES256 = "cached check, ES256"  # unit "µs"
METRIC_TOKEN_UNCACHED_RS256 = "uncached check, RS256"  # unit "µs"
METRIC_TOKEN_UNCACHED_ES256 = "uncached check, ES256"  # unit "µs"
# Audit (micro.py), scenario SCENARIO_AUDIT:
METRIC_AUDIT_ACCEPTED = "events accepted/s, spool on"  # unit "events/s"


def small_get_scenario(concurrency: int) -> str:
    """
    The scenario name of the small authenticated GET at ``concurrency`` connections.
    """
    return SCENARIO_SMALL_GET.format(concurrency=concurrency)


@attr.s(auto_attribs=True, frozen=True)
class Measurement:
    """
    One number measured in one scenario against one target.

    ``higher_is_better`` decides how the ratio reads (throughput: true; latency,
    memory, time: false).
    """

    scenario: str  # e.g. small_get_scenario(16), SCENARIO_WATCHES
    target: str  # e.g. "direct", "banyan-kproxy", "banyan-kproxy x2", "haproxy"
    metric: str  # e.g. METRIC_RPS ("requests/s"), METRIC_ADDED_P50
    value: float
    unit: str  # e.g. "req/s", "ms", "MB/s", "MiB", "µs"
    baseline: str | None = "direct"  # target to divide by, or None for no ratio
    higher_is_better: bool = True
    note: str = ""
    # The single runs ``value`` summarises (their median), when it is one of several.
    samples: tuple[float, ...] = ()

    def to_json(self) -> dict:
        """
        This measurement as a JSON object.
        """
        return attr.asdict(self)


@attr.s(auto_attribs=True, frozen=True)
class Goal:
    """
    A target from issue 8: ``metric`` of ``target`` in ``scenario`` compared with
    ``threshold`` — an absolute number in ``unit``, or, when ``versus`` is set, a
    fraction of the value ``versus`` reached in the same scenario and metric.
    """

    description: str
    scenario: str
    target: str
    metric: str
    threshold: float
    at_least: bool  # true: value >= threshold; false: value < threshold
    versus: str | None = None

    def evaluate(self, measurements: Sequence[Measurement]) -> tuple[str, str]:
        """
        ``("met" | "missed" | "not measured", detail)``.
        """
        value = _find(measurements, self.scenario, self.target, self.metric)
        if value is None:
            return "not measured", ""
        if self.versus is not None:
            other = _find(measurements, self.scenario, self.versus, self.metric)
            if not other:
                return "not measured", f"no {self.versus} value"
            got = value.value / other.value
            detail = f"{got:.0%} of {self.versus} (goal {'≥' if self.at_least else '<'} {self.threshold:.0%})"
            gap = f"{abs(self.threshold - got) * 100:.0f} points"
        else:
            got = value.value
            detail = f"{got:.3g} {value.unit} (goal {'≥' if self.at_least else '<'} {self.threshold:g})"
            gap = f"{abs(self.threshold - got):.3g} {value.unit}"
        met = got >= self.threshold if self.at_least else got < self.threshold
        if not met:
            if self.at_least:
                factor = f"{self.threshold / got:.2f}× as much needed" if got > 0 else "nothing measured"
                detail += f"; short by {gap}: {factor}"
            else:
                factor = f"must shrink {got / self.threshold:.2f}×" if self.threshold > 0 else ""
                detail += f"; over by {gap}: {factor}"
        return ("met" if met else "missed"), detail


def _find(
    measurements: Sequence[Measurement], scenario: str, target: str, metric: str
) -> Measurement | None:
    for m in measurements:
        if m.scenario == scenario and m.target == target and m.metric == metric:
            return m
    return None


def ratio(measurements: Sequence[Measurement], m: Measurement) -> float | None:
    """
    ``m.value`` divided by its baseline's value in the same scenario and metric.
    """
    if m.baseline is None or m.baseline == m.target:
        return None
    base = _find(measurements, m.scenario, m.baseline, m.metric)
    if base is None or not base.value:
        return None
    return m.value / base.value


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render_table(measurements: Sequence[Measurement]) -> str:
    """
    A Markdown table: one row per measurement, in the order given, with the ratio
    to its baseline.
    """
    lines = [
        "| scenario | target | metric | value | vs. baseline |",
        "|---|---|---|---:|---:|",
    ]
    for m in measurements:
        r = ratio(measurements, m)
        shown = "" if r is None else f"{r:.2f}× {m.baseline}"
        note = f" ({m.note})" if m.note else ""
        lines.append(
            f"| {m.scenario} | {m.target} | {m.metric}{note} | {_number(m.value)} {m.unit} | {shown} |"
        )
    return "\n".join(lines)


def render_matrix(measurements: Sequence[Measurement]) -> str:
    """
    Markdown tables with one column per target: one row per scenario and metric,
    each cell the value and, in parentheses, its ratio to the baseline.  Scenarios
    that follow each other with the same targets share a table; notes follow their
    table.
    """
    targets_of: dict[str, list[str]] = {}
    for m in measurements:
        targets = targets_of.setdefault(m.scenario, [])
        if m.target not in targets:
            targets.append(m.target)
    tables: list[tuple[list[str], list[tuple[str, str]], list[str]]] = []
    seen_rows: set[tuple[str, str]] = set()
    for m in measurements:
        key = (m.scenario, m.metric)
        if key in seen_rows:
            continue
        seen_rows.add(key)
        targets = targets_of[m.scenario]
        if not tables or tables[-1][0] != targets:
            tables.append((targets, [], []))
        tables[-1][1].append(key)
    cells: dict[tuple[str, str, str], Measurement] = {(m.scenario, m.metric, m.target): m for m in measurements}
    out: list[str] = []
    for targets, rows, notes in tables:
        out.append("| scenario | metric | " + " | ".join(targets) + " |")
        out.append("|---|---|" + "---:|" * len(targets))
        row_baselines: dict[str, set[str]] = {}
        for scenario, metric in rows:
            row = []
            for target in targets:
                m = cells.get((scenario, metric, target))
                if m is None:
                    row.append("")
                    continue
                r = ratio(measurements, m)
                text = f"{_number(m.value)} {m.unit}"
                if r is not None and m.baseline is not None:
                    text += f" ({r:.2f}×)"
                    row_baselines.setdefault(metric, set()).add(m.baseline)
                if m.note:
                    if m.note not in notes:
                        notes.append(m.note)
                    text += f" [{notes.index(m.note) + 1}]"
                row.append(text)
            out.append(f"| {scenario} | {metric} | " + " | ".join(row) + " |")
        baselines = set().union(*row_baselines.values()) if row_baselines else set()
        if baselines or notes:
            out.append("")
        if len(baselines) == 1:
            out.append(f"×: ratio to {next(iter(baselines))}, measured in the same run.")
        elif baselines:
            per_row = "; ".join(f"{metric}: {', '.join(sorted(b))}" for metric, b in row_baselines.items())
            out.append(f"×: ratio to the row's baseline, measured in the same run ({per_row}).")
        if notes:
            out.append("")
            out.extend(f"- [{number}] {note}" for number, note in enumerate(notes, 1))
        out.append("")
    return "\n".join(out).rstrip("\n")


def render_goals(goals: Iterable[Goal], measurements: Sequence[Measurement]) -> str:
    """
    A Markdown table of the goals, each met, missed (by how much) or not measured.
    """
    lines = ["| goal | result | measured |", "|---|---|---|"]
    for goal in goals:
        outcome, detail = goal.evaluate(measurements)
        lines.append(f"| {goal.description} | {outcome} | {detail} |")
    return "\n".join(lines)


def write_json(
    path: str, measurements: Sequence[Measurement], goals: Iterable[Goal] = (), extra: dict | None = None
) -> None:
    """
    Save the run: the machine, every measurement with its ratio, and the goals.
    """
    document = {
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": _cpus(),
        },
        "measurements": [
            dict(m.to_json(), ratio=ratio(measurements, m)) for m in measurements
        ],
        "goals": [
            {"description": g.description, "outcome": outcome, "detail": detail}
            for g in goals
            for outcome, detail in [g.evaluate(measurements)]
        ],
    }
    if extra:
        document.update(extra)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path: str) -> tuple[dict, list[Measurement]]:
    """
    A run saved by `write_json`: the whole document and its measurements.
    """
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    fields = {a.name for a in attr.fields(Measurement)}
    measurements = []
    for saved in document.get("measurements", []):
        values = {k: v for k, v in saved.items() if k in fields}
        values["samples"] = tuple(values.get("samples", ()))
        measurements.append(Measurement(**values))
    return document, measurements


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
