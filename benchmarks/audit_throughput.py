"""
How many audit events a second the pipeline sustains.  A program, not a test.

Three measurements, each reported with a baseline measured in the same run:

1. Request-path cost: ``auditor.begin`` + ``record.response_complete`` per event,
   against building a bare dict of the same fields (the least any auditing costs).
2. Acceptance: the audit service alone in a child process
   (``python -m banyan_kproxy.audit.testing``), fed as fast as its reactor allows;
   events accepted (written and fsync'd to the spool) per second, against one
   thread writing the same JSON lines to a file with one fsync per 400 lines.
3. Delivery: the same child delivering to a webhook receiver on loopback in this
   process with ``batch_max_size`` 400: events delivered per second, unthrottled
   and with the seed's throttle (``batch_throttle_qps`` 4, burst 4: at most 1600
   events/s by construction).

Run: ``PYTHONPATH=. python benchmarks/audit_throughput.py [--seconds 5]``.  `measure`
returns the same figures as ``report.Measurement``s for ``benchmarks/micro.py`` (and
so for ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
# The benchmarks folder too: `report` is imported as bench.py imports it.
if os.path.join(HERE, "benchmarks") not in sys.path:
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))

import report  # noqa: E402

#: The baselines' target names.
BARE_DICT = "bare dict of the same fields"
RAW_APPEND = "one thread appending, fsync per 400"
#: Metric names besides report.METRIC_AUDIT_ACCEPTED.
METRIC_REQUEST_PATH = "request-path cost per event"
METRIC_DELIVERED = "events delivered/s to a loopback webhook"
METRIC_DELIVERED_THROTTLED = "events delivered/s, seed throttle (qps 4, burst 4)"
METRIC_ACCEPTED_THROTTLED = "events accepted/s, spool on, seed throttle"


def request_path(n: int) -> tuple[float, float]:
    """
    Microseconds per event for the proxy's audit calls, and for the baseline.
    """
    from banyan_kproxy.audit import Auditor
    from banyan_kproxy.audit.metrics import AuditMetrics
    from banyan_kproxy.audit.policy import DEFAULT_POLICY
    from banyan_kproxy.identity import Identity

    events: list[dict] = []
    auditor = Auditor(DEFAULT_POLICY, events.append, AuditMetrics.create())
    user = Identity("banyan:alice@example.com", ("banyan:any-employee-personal-device", "system:authenticated"))
    start = time.perf_counter()
    for i in range(n):
        record = auditor.begin(
            audit_id="0f9e3b1c-8a4d-4c52-9d0e-3f1b2a6c7d8e", method="GET",
            uri="/api/v1/namespaces/default/pods?limit=500", source_ips=["192.0.2.7"],
            user_agent="kubectl/v1.31.0 (linux/amd64) kubernetes/abc", received_at=1714564800.0 + i,
            user=user,
        )
        record.response_complete(200, 1714564800.01 + i)
    audited = (time.perf_counter() - start) / n * 1e6
    events.clear()
    start = time.perf_counter()
    for i in range(n):
        events.append({
            "auditID": "0f9e3b1c-8a4d-4c52-9d0e-3f1b2a6c7d8e", "verb": "list",
            "requestURI": "/api/v1/namespaces/default/pods?limit=500", "user": user.user,
            "groups": list(user.groups), "sourceIPs": ["192.0.2.7"], "code": 200, "t": 1714564800.0 + i,
        })
    baseline = (time.perf_counter() - start) / n * 1e6
    return audited, baseline


def raw_append(seconds: float, directory: str) -> float:
    """
    Baseline: JSON lines with a CRC, one fsync per 400 lines, in one thread.
    """
    line = json.dumps({
        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
        "auditID": "0f9e3b1c-8a4d-4c52-9d0e-3f1b2a6c7d8e", "stage": "ResponseComplete",
        "requestURI": "/api/v1/namespaces/load/pods/p-1", "verb": "get",
        "user": {"username": "banyan:load@example.com", "groups": ["banyan:load", "system:authenticated"]},
        "sourceIPs": ["127.0.0.1"], "userAgent": "audit-load-driver",
        "objectRef": {"resource": "pods", "namespace": "load", "name": "p-1", "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 200},
        "requestReceivedTimestamp": "2024-05-01T12:00:00.000000Z",
        "stageTimestamp": "2024-05-01T12:00:00.000000Z",
    }, separators=(",", ":")).encode()
    path = os.path.join(directory, "raw.seg")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.write(fd, b"".join(b"%08x " % zlib.crc32(line) + line + b"\n" for _ in range(400)))
        os.fsync(fd)
        count += 400
    os.close(fd)
    return count / seconds


_RECEIVER = """
import sys
from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import Site
count = [0]
class Receiver(Resource):
    isLeaf = True
    def render_POST(self, request):
        count[0] += request.content.read().count(b'"auditID"')
        return b"{}"
port = reactor.listenTCP(0, Site(Receiver()), interface="127.0.0.1")
print(port.getHost().port, flush=True)
task.LoopingCall(lambda: print(count[0], flush=True)).start(0.1)
reactor.run()
"""


def pipeline(seconds: float, directory: str, qps: float, burst: int) -> tuple[float, float]:
    """
    (accepted/s, delivered/s) of the audit service in a child process, delivering
    to a receiver (twisted.web, counting events) in another.
    """
    import subprocess
    import threading

    env = dict(os.environ, PYTHONPATH=HERE)
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, env=env)
    assert receiver.stdout is not None
    port = int(receiver.stdout.readline())
    delivered = [0]

    def count() -> None:
        for line in receiver.stdout:  # type: ignore[union-attr]
            delivered[0] = int(line)

    threading.Thread(target=count, daemon=True).start()
    kubeconfig = os.path.join(directory, f"webhook-{qps}.yaml")
    with open(kubeconfig, "w") as f:
        f.write(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: r\n  cluster:\n"
            f"    server: http://127.0.0.1:{port}/\n"
            "contexts:\n- name: r\n  context: {cluster: r}\ncurrent-context: r\n"
        )
    settings = {
        "run": "bench",
        "rate": 200000,
        "audit": {
            "webhook_config_file": kubeconfig,
            "spool_dir": os.path.join(directory, f"spool-{qps}"),
            "spool_max_bytes": 2 << 30,
            "batch_max_size": 400,
            "batch_max_wait": 0.05,
            "batch_buffer_size": 10000,
            "batch_throttle_qps": qps,
            "batch_throttle_burst": burst,
        },
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "banyan_kproxy.audit.testing", json.dumps(settings)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )
    assert child.stdout is not None
    samples: list[tuple[float, int, int]] = []
    started = threading.Event()

    def read() -> None:
        for line in child.stdout:  # type: ignore[union-attr]
            if line.startswith(b"spooled "):
                samples.append((time.monotonic(), int(line.split()[1]), delivered[0]))
            elif line.startswith(b"started"):
                started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        # The clock starts once the child runs (its imports take a while on a busy
        # machine); then one second of warm-up.
        if not started.wait(60):
            raise RuntimeError("the audit child did not start within 60 s")
        began = time.monotonic()
        time.sleep(1.0 + seconds)
    finally:
        child.kill()
        child.wait()
        receiver.kill()
        receiver.wait()
    warm = [s for s in samples if s[0] >= began + 1.0]
    if len(warm) < 2:
        raise RuntimeError(
            f"the audit child reported {len(warm)} samples after its warm-up second in {seconds:g}s: "
            "too short a run for this machine's fsync"
        )
    first, last = warm[0], warm[-1]
    span = last[0] - first[0]
    return (last[1] - first[1]) / span, (last[2] - first[2]) / span


def measure(seconds: float = 5.0, events: int = 50000, directory: str | None = None) -> list[report.Measurement]:
    """
    All of the above as measurements of `report.SCENARIO_AUDIT`, each with the
    baseline measured in this run where there is one.
    """
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as scratch:
            return measure(seconds, events, scratch)
    M = report.Measurement
    scenario = report.SCENARIO_AUDIT
    audited, bare = request_path(events)
    baseline = raw_append(seconds, directory)
    accepted, delivered = pipeline(seconds, directory, qps=1000.0, burst=8)
    accepted_throttled, delivered_throttled = pipeline(seconds, directory, qps=4.0, burst=4)
    return [
        M(scenario, report.KPROXY, METRIC_REQUEST_PATH, audited, "µs", baseline=BARE_DICT,
          higher_is_better=False, note="auditor.begin + response_complete"),
        M(scenario, BARE_DICT, METRIC_REQUEST_PATH, bare, "µs", baseline=None, higher_is_better=False),
        M(scenario, report.KPROXY, report.METRIC_AUDIT_ACCEPTED, accepted, "events/s",
          baseline=RAW_APPEND, note="fsync'd spool, webhook sink unthrottled"),
        M(scenario, RAW_APPEND, report.METRIC_AUDIT_ACCEPTED, baseline, "events/s", baseline=None,
          note="CRC'd JSON lines"),
        M(scenario, report.KPROXY, METRIC_DELIVERED, delivered, "events/s", baseline=None,
          note="batches of 400"),
        M(scenario, report.KPROXY, METRIC_ACCEPTED_THROTTLED, accepted_throttled, "events/s",
          baseline=None),
        M(scenario, report.KPROXY, METRIC_DELIVERED_THROTTLED, delivered_throttled, "events/s",
          baseline=None, note="ceiling 1,600 by construction"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--events", type=int, default=50000)
    args = parser.parse_args()
    found = {(m.target, m.metric): m.value for m in measure(args.seconds, args.events)}
    audited = found[report.KPROXY, METRIC_REQUEST_PATH]
    bare = found[BARE_DICT, METRIC_REQUEST_PATH]
    baseline = found[RAW_APPEND, report.METRIC_AUDIT_ACCEPTED]
    accepted = found[report.KPROXY, report.METRIC_AUDIT_ACCEPTED]
    print(f"request path: {audited:.1f} us/event for begin+response_complete "
          f"(baseline bare dict {bare:.2f} us; ratio {audited / bare:.1f}x)")
    print(f"baseline: one thread appending CRC'd JSON lines, fsync per 400: {baseline:,.0f} events/s")
    print(f"pipeline, unthrottled webhook: accepted {accepted:,.0f} events/s "
          f"({accepted / baseline:.2f} of baseline), "
          f"delivered {found[report.KPROXY, METRIC_DELIVERED]:,.0f} events/s")
    print(f"pipeline, seed throttle (qps 4, burst 4, 400/batch): accepted "
          f"{found[report.KPROXY, METRIC_ACCEPTED_THROTTLED]:,.0f} events/s, "
          f"delivered {found[report.KPROXY, METRIC_DELIVERED_THROTTLED]:,.0f} events/s (ceiling 1,600)")
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
