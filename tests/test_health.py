"""
Tests for `banyan_kproxy.health`: the Prometheus registry and the health resource.
"""

from __future__ import annotations

import re
import time

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.health import CONTENT_TYPE, HealthResource, Metrics, ReadinessWarning


class MetricsTests(SynchronousTestCase):
    """
    The registry renders the Prometheus text exposition format 0.0.4 exactly.
    """

    def test_counter_with_labels(self) -> None:
        """
        A labelled counter renders HELP, TYPE and one sample per label set in creation order.
        """
        metrics = Metrics()
        requests = metrics.counter("kproxy_requests_total", "Requests served.", ["code", "verb"])
        requests.labels(code="200", verb="get").inc()
        requests.labels(code=403, verb="list").inc(2)
        requests.labels("200", "get").inc()
        self.assertEqual(
            metrics.render(),
            b"# HELP kproxy_requests_total Requests served.\n"
            b"# TYPE kproxy_requests_total counter\n"
            b'kproxy_requests_total{code="200",verb="get"} 2\n'
            b'kproxy_requests_total{code="403",verb="list"} 2\n',
        )

    def test_counter_without_labels(self) -> None:
        """
        A counter without labels starts at 0 and counts what ``inc`` adds.
        """
        metrics = Metrics()
        errors = metrics.counter("kproxy_errors_total", "Errors.")
        self.assertIn(b"\nkproxy_errors_total 0\n", metrics.render())
        errors.inc()
        errors.inc(0.5)
        self.assertIn(b"\nkproxy_errors_total 1.5\n", metrics.render())

    def test_counter_only_goes_up(self) -> None:
        """
        A negative increment is refused and the value is unchanged.
        """
        metrics = Metrics()
        errors = metrics.counter("errors_total", "Errors.")
        self.assertRaises(ValueError, errors.inc, -1)
        self.assertIn(b"\nerrors_total 0\n", metrics.render())

    def test_gauge(self) -> None:
        """
        A gauge shows the result of set, inc and dec.
        """
        metrics = Metrics()
        connections = metrics.gauge("kproxy_open_connections", "Open connections.")
        connections.set(5)
        connections.inc()
        connections.dec(3)
        self.assertEqual(
            metrics.render(),
            b"# HELP kproxy_open_connections Open connections.\n"
            b"# TYPE kproxy_open_connections gauge\n"
            b"kproxy_open_connections 3\n",
        )

    def test_gauge_function(self) -> None:
        """
        A gauge given a function shows its value at the time of each render.
        """
        metrics = Metrics()
        queue = [1, 2]
        metrics.gauge("audit_queue_length", "Events waiting.", function=lambda: len(queue))
        self.assertIn(b"\naudit_queue_length 2\n", metrics.render())
        queue.append(3)
        self.assertIn(b"\naudit_queue_length 3\n", metrics.render())

    def test_labelled_gauge_function(self) -> None:
        """
        A child of a labelled gauge can be computed by a function at render time.
        """
        metrics = Metrics()
        expiry = metrics.gauge("tls_not_after_seconds", "Certificate expiry.", ["listener"])
        expiry.labels(listener="proxy").set_function(lambda: 1700000000)
        self.assertIn(b'\ntls_not_after_seconds{listener="proxy"} 1700000000\n', metrics.render())

    def test_failing_function_leaves_sample_out(self) -> None:
        """
        A gauge function that raises is logged and its sample is left out; the rest renders.
        """
        metrics = Metrics()
        metrics.gauge("broken", "Broken.", function=lambda: 1 / 0)
        metrics.gauge("fine", "Fine.").set(1)
        self.assertEqual(
            metrics.render(),
            b"# HELP broken Broken.\n# TYPE broken gauge\n# HELP fine Fine.\n# TYPE fine gauge\nfine 1\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_histogram(self) -> None:
        """
        Histogram buckets are cumulative with ``+Inf``; a value equal to a bound counts in it.
        """
        metrics = Metrics()
        latency = metrics.histogram("latency_seconds", "Latency.", buckets=(1, 0.1, 0.5))
        for value in (0.05, 0.1, 0.3, 2, 0.5):
            latency.observe(value)
        self.assertEqual(
            metrics.render(),
            b"# HELP latency_seconds Latency.\n"
            b"# TYPE latency_seconds histogram\n"
            b'latency_seconds_bucket{le="0.1"} 2\n'
            b'latency_seconds_bucket{le="0.5"} 4\n'
            b'latency_seconds_bucket{le="1.0"} 4\n'
            b'latency_seconds_bucket{le="+Inf"} 5\n'
            b"latency_seconds_sum 2.95\n"
            b"latency_seconds_count 5\n",
        )

    def test_histogram_with_labels(self) -> None:
        """
        A labelled histogram puts ``le`` after its own labels on every bucket line.
        """
        metrics = Metrics()
        latency = metrics.histogram("upstream_seconds", "Upstream.", ["verb"], buckets=(1,))
        latency.labels(verb="get").observe(3)
        self.assertEqual(
            metrics.render(),
            b"# HELP upstream_seconds Upstream.\n"
            b"# TYPE upstream_seconds histogram\n"
            b'upstream_seconds_bucket{verb="get",le="1.0"} 0\n'
            b'upstream_seconds_bucket{verb="get",le="+Inf"} 1\n'
            b'upstream_seconds_sum{verb="get"} 3\n'
            b'upstream_seconds_count{verb="get"} 1\n',
        )

    def test_label_and_help_escaping(self) -> None:
        """
        Backslash, double quote and newline are escaped in label values; backslash
        and newline in help text.
        """
        metrics = Metrics()
        counter = metrics.counter("escaped_total", 'Help with \\ and "quotes"\nand a newline.', ["v"])
        counter.labels(v='a\\b"c\nd').inc()
        self.assertEqual(
            metrics.render(),
            b'# HELP escaped_total Help with \\\\ and "quotes"\\nand a newline.\n'
            b"# TYPE escaped_total counter\n"
            b'escaped_total{v="a\\\\b\\"c\\nd"} 1\n',
        )

    def test_registration_errors(self) -> None:
        """
        Duplicate names, invalid names, an ``le`` histogram label and wrong label sets are refused.
        """
        metrics = Metrics()
        counter = metrics.counter("a_total", "A.", ["code"])
        self.assertRaises(ValueError, metrics.counter, "a_total", "Again.")
        self.assertRaises(ValueError, metrics.gauge, "bad-name", "Bad.")
        self.assertRaises(ValueError, metrics.gauge, "g", "G.", ["bad-label"])
        self.assertRaises(ValueError, metrics.histogram, "h", "H.", ["le"])
        self.assertRaises(ValueError, counter.labels, verb="get")
        self.assertRaises(ValueError, counter.labels, "1", "2")
        self.assertRaises(ValueError, counter.inc)

    def test_empty_registry(self) -> None:
        """
        An empty registry renders nothing.
        """
        self.assertEqual(Metrics().render(), b"")


class HealthResourceTests(SynchronousTestCase):
    """
    ``/live``, ``/ready`` and ``/metrics`` through treq's in-memory client.
    """

    def setUp(self) -> None:
        self.problems: list[str] = []
        self.metrics = Metrics()
        self.metrics.counter("kproxy_requests_total", "Requests served.").inc(7)
        self.treq = StubTreq(HealthResource(self.metrics, lambda: self.problems))

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[bytes, list[bytes]], bytes]:
        """
        Request ``path``; return status code, headers and body.
        """
        response = self.successResultOf(self.treq.request(method, "http://health.invalid" + path))
        body = self.successResultOf(self.treq.content(response))
        return response.code, dict(response.headers.getAllRawHeaders()), body

    def test_live(self) -> None:
        """
        ``/live`` answers 200 ``ok``.
        """
        code, headers, body = self.get("/live")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertEqual(headers[b"Content-Type"], [b"text/plain; charset=utf-8"])

    def test_ready_flips(self) -> None:
        """
        ``/ready`` answers 503 with one reason per line while there are problems, then 200 ``ok``.
        """
        self.problems[:] = ["JWKS not fetched yet", "upstream unreachable"]
        self.assertEqual(self.get("/ready")[::2], (503, b"JWKS not fetched yet\nupstream unreachable\n"))
        self.problems[:] = []
        self.assertEqual(self.get("/ready")[::2], (200, b"ok\n"))

    def test_ready_warnings(self) -> None:
        """
        ``ReadinessWarning`` entries do not fail ``/ready``: alone they give 200 with
        ``ok`` and a ``warning:`` line each; with problems, the 503 lists both.
        """
        self.problems[:] = [ReadinessWarning("oidc: keys are stale")]
        self.assertEqual(self.get("/ready")[::2], (200, b"ok\nwarning: oidc: keys are stale\n"))
        self.problems.insert(0, "upstream unreachable")
        self.assertEqual(
            self.get("/ready")[::2],
            (503, b"upstream unreachable\nwarning: oidc: keys are stale\n"),
        )

    def test_ready_check_raises(self) -> None:
        """
        A readiness check that raises makes ``/ready`` answer 503 saying so, and is logged.
        """
        treq = StubTreq(HealthResource(Metrics(), lambda: [][1]))
        response = self.successResultOf(treq.get("http://health.invalid/ready"))
        self.assertEqual(response.code, 503)
        self.assertEqual(
            self.successResultOf(treq.content(response)),
            b"readiness check failed: list index out of range\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(IndexError)), 1)

    def test_metrics(self) -> None:
        """
        ``/metrics`` serves the registry and the process metrics with the 0.0.4 content type.
        """
        code, headers, body = self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [CONTENT_TYPE])
        self.assertEqual(CONTENT_TYPE, b"text/plain; version=0.0.4; charset=utf-8")
        self.assertTrue(
            body.startswith(
                b"# HELP kproxy_requests_total Requests served.\n"
                b"# TYPE kproxy_requests_total counter\n"
                b"kproxy_requests_total 7\n"
            ),
            body,
        )

    def test_process_metrics(self) -> None:
        """
        The process metrics are computed at scrape time and plausible.
        """
        body = self.get("/metrics")[2].decode()
        values = dict(re.findall(r"^(process_\w+) (\S+)$", body, re.M))
        self.assertGreater(int(values["process_open_fds"]), 2)
        self.assertGreater(int(values["process_resident_memory_bytes"]), 1 << 20)
        start = float(values["process_start_time_seconds"])
        self.assertTrue(time.time() - 86400 * 30 < start <= time.time() + 1, start)
        self.assertGreater(float(values["process_cpu_seconds_total"]), 0)

    def test_head(self) -> None:
        """
        HEAD is answered like GET without a body.
        """
        code, headers, body = self.get("/live", "HEAD")
        self.assertEqual((code, body), (200, b""))

    def test_other_methods(self) -> None:
        """
        Other methods are refused: 405 with ``Allow`` for POST, 501 for the ones twisted.web does not know.
        """
        code, headers, _ = self.get("/live", "POST")
        self.assertEqual(code, 405)
        self.assertEqual(sorted(headers[b"Allow"][0].split(b", ")), [b"GET", b"HEAD"])
        self.assertEqual(self.get("/metrics", "DELETE")[0], 501)

    def test_not_found(self) -> None:
        """
        Any other path, the root and paths below the pages answer 404.
        """
        for path in ("/", "/healthz", "/live/more", "/metrics/x"):
            self.assertEqual(self.get(path)[::2], (404, b"not found\n"), path)
