"""
``make bench``: every benchmark scenario in one run, a Markdown table of the results
with ratios to the baseline measured in the same run, the issue's performance goals
(met, or missed by how much), and a JSON file of it all.

    python benchmarks/bench.py [--quick] [--only SCENARIO ...] [--json PATH] [--workdir DIR]
    python benchmarks/bench.py --render benchmarks/results/latest.json   # print a saved run again

Scenarios (``--only``): ``small-get``, ``large-list``, ``startup`` (httpbench.py:
nginx as the apiserver, banyan-kproxy and HAProxy in front of it), ``streams``
(streams.py: idle watches and an upgrade tunnel) and ``micro`` (micro.py: token
verification and the audit pipeline); ``http`` stands for the first three.  A
scenario module that is missing or fails is reported and the run goes on.

The JSON (default ``benchmarks/results/latest.json``, with the printed Markdown
beside it as ``latest.md``) is not committed: figures from a shared two-core machine
are noisy and machine-specific.  The README's "Performance" section holds the table
that is.

Benchmarks never pass or fail: the exit status is 0 unless the harness itself broke
(a scenario module raised).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import report  # noqa: E402
from report import (  # noqa: E402
    DIRECT,
    HAPROXY_2,
    KPROXY,
    KPROXY_2,
    METRIC_ADDED_P50,
    METRIC_DOWNLOAD,
    METRIC_RPS,
    METRIC_THROUGHPUT,
    METRIC_TOKEN_CACHED_RS256,
    METRIC_UPLOAD,
    METRIC_WATCH_RSS,
    SCENARIO_LARGE_LIST,
    SCENARIO_TOKEN,
    SCENARIO_TUNNEL,
    SCENARIO_WATCHES,
    Goal,
    Measurement,
    small_get_scenario,
)

HTTP_SCENARIOS = ("small-get", "large-list", "startup")
ALL_SCENARIOS = (*HTTP_SCENARIOS, "streams", "micro")

#: Issue 8 point 3: the targets, measured on the same machine in one run.
GOALS = (
    *(
        Goal(
            f"small GET at {c} connections: two processes reach ≥ 50 % of HAProxy with two threads",
            small_get_scenario(c), KPROXY_2, METRIC_RPS, 0.5, at_least=True, versus=HAPROXY_2,
        )
        for c in (16, 128)
    ),
    Goal(
        "added p50 latency at concurrency 1 under 1 ms",
        small_get_scenario(1), KPROXY, METRIC_ADDED_P50, 1.0, at_least=False,
    ),
    Goal(
        "20 MB list throughput ≥ 70 % of direct",
        SCENARIO_LARGE_LIST, KPROXY, METRIC_THROUGHPUT, 0.7, at_least=True, versus=DIRECT,
    ),
    Goal(
        "upgrade tunnel upload ≥ 70 % of direct",
        SCENARIO_TUNNEL, KPROXY, METRIC_UPLOAD, 0.7, at_least=True, versus=DIRECT,
    ),
    Goal(
        "upgrade tunnel download ≥ 70 % of direct",
        SCENARIO_TUNNEL, KPROXY, METRIC_DOWNLOAD, 0.7, at_least=True, versus=DIRECT,
    ),
    Goal(
        "10,000 idle watches in under 500 MB (daemon RSS)",
        SCENARIO_WATCHES, KPROXY, METRIC_WATCH_RSS, 500, at_least=False,
    ),
    Goal(
        "cached token check under 5 µs",
        SCENARIO_TOKEN, KPROXY, METRIC_TOKEN_CACHED_RS256, 5, at_least=False,
    ),
)


def _expand(only: list[str] | None) -> list[str]:
    if not only:
        return list(ALL_SCENARIOS)
    chosen: list[str] = []
    for name in only:
        for scenario in HTTP_SCENARIOS if name == "http" else (name,):
            if scenario not in chosen:
                chosen.append(scenario)
    return chosen


def _module_scenarios(name: str, workdir: str, quick: bool, log: Callable[[str], None]) -> list[Measurement]:
    """
    ``run(workdir, quick)`` of the scenario module ``name`` (streams, micro).
    """
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        log(f"benchmarks/{name}.py is not there yet: its scenarios are skipped")
        return []
    return list(module.run(workdir, quick))


def _commit() -> str:
    """
    The checkout's commit (``+ changes`` when the tree differs from it), for the record.
    """
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        # `git diff` only reads (status may rewrite the index).
        dirty = subprocess.run(
            ["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=10
        ).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    if not head:
        return "unknown commit"
    return f"commit {head}" + (" + changes" if dirty else "")


def render(
    measurements: list[Measurement], *, quick: bool, date: str, commit: str, load: float,
    failures: list[str], long: bool = False,
) -> str:
    """
    The Markdown report: the results tables, the goals, and what failed.
    """
    lines = [
        f"### Results{' (quick)' if quick else ''}",
        "",
        f"{date}, {commit}, {report._cpus()} CPUs, load average {load:.2f} before the run.",
        "",
        report.render_matrix(measurements),
    ]
    if long:
        lines += ["", report.render_table(measurements)]
    lines += ["", "### Goals", "", report.render_goals(GOALS, measurements)]
    if quick:
        lines += ["", "A quick run uses smaller sizes (fewer watches, a shorter tunnel): goals about the full",
                  "sizes are then not measured."]
    if failures:
        lines += ["", "### Failed", ""]
        lines += ["- " + failure.strip().splitlines()[-1] for failure in failures]
    return "\n".join(lines) + "\n"


def render_saved(path: str, long: bool = False) -> str:
    """
    The Markdown report of a run saved by `main` (``--render``), with today's renderers.
    """
    document, measurements = report.read_json(path)
    return render(
        measurements, quick=document.get("quick", False), date=document.get("taken_at", "")[:10],
        commit=document.get("commit", "unknown commit"), load=(document.get("load_average_before") or [0])[0],
        failures=document.get("failures", []), long=long,
    )


def main(argv: list[str] | None = None) -> int:
    """
    Run the chosen scenarios and report them; the exit status is 1 if a scenario
    module failed.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 2 s a point, smaller sizes)")
    parser.add_argument(
        "--only", nargs="+", metavar="SCENARIO", choices=[*ALL_SCENARIOS, "http"],
        help=f"run only these: {', '.join(ALL_SCENARIOS)} (http = the first three)",
    )
    parser.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"), help="where to write JSON")
    parser.add_argument("--workdir", help="keep certificates, configurations and logs here (default: a temp dir)")
    parser.add_argument("--long", action="store_true", help="also print one row per measurement")
    parser.add_argument("--render", metavar="JSON", help="only print the report of a saved run")
    options = parser.parse_args(argv)
    if options.render:
        print(render_saved(options.render, options.long), end="")
        return 0
    chosen = _expand(options.only)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    load_before = os.getloadavg()
    log(f"load average before: {load_before[0]:.2f} on {report._cpus()} CPUs; scenarios: {', '.join(chosen)}")
    measurements: list[Measurement] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as temporary:
        workdir = options.workdir or temporary
        os.makedirs(workdir, exist_ok=True)
        http_scenarios = [s for s in chosen if s in HTTP_SCENARIOS]
        if http_scenarios:
            try:
                import httpbench

                measurements += httpbench.run(os.path.join(workdir, "http"), options.quick, http_scenarios, log)
            except Exception:  # noqa: BLE001 - report and go on with the other modules
                failures.append("http: " + traceback.format_exc())
                log(failures[-1])
        for name in ("streams", "micro"):
            if name not in chosen:
                continue
            log(f"running {name} ...")
            directory = os.path.join(workdir, name)
            os.makedirs(directory, exist_ok=True)
            try:
                measurements += _module_scenarios(name, directory, options.quick, log)
            except Exception:  # noqa: BLE001 - report and go on with the other modules
                failures.append(f"{name}: " + traceback.format_exc())
                log(failures[-1])

    commit = _commit()
    text = render(
        measurements, quick=options.quick, date=time.strftime("%Y-%m-%d"), commit=commit,
        load=load_before[0], failures=failures, long=options.long,
    )
    print(text, end="")
    os.makedirs(os.path.dirname(os.path.abspath(options.json)), exist_ok=True)
    with open(os.path.splitext(options.json)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    report.write_json(
        options.json, measurements, GOALS,
        extra={
            "quick": options.quick,
            "scenarios": chosen,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "seconds": round(time.monotonic() - started, 1),
            "failures": failures,
            "commit": commit,
        },
    )
    log(f"wrote {options.json} and its .md ({time.monotonic() - started:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
