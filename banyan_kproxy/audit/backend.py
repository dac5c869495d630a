"""
The batching backend: one `SinkPump` per sink moves spooled events to it in batches.

The batching follows kube-apiserver's buffered webhook backend
(``k8s.io/apiserver/plugin/pkg/audit/buffered``):

- A batch goes out when ``batch_max_size`` events are waiting, or when
  ``batch_max_wait`` has passed since the last batch was taken (a ``LoopingCall``
  with that interval, restarted whenever a full batch leaves early).
- Batch sends are throttled by a token bucket of ``batch_throttle_qps`` with
  ``batch_throttle_burst`` tokens; up to ``batch_throttle_burst`` batches are in
  flight at once.
- A failed batch is retried after ``initial_backoff``, growing ×1.5 per failure
  with up to 20 % jitter (``wait.Backoff{Factor: 1.5, Jitter: 0.2}``), capped at
  `MAX_BACKOFF`.  While backing off, nothing new is sent to that sink.
- With truncation on, a batch never exceeds ``truncate_max_batch_size`` bytes.

Unlike kube-apiserver, a batch is never given up on: it is retried until the sink
takes it, and the events stay in the spool meanwhile.  The in-memory buffer
(``batch_buffer_size`` events per sink) is only a window onto the spool: when a sink
falls further behind than it holds, the pump stops taking new events from commits
and reads them back from the spool files once the sink drains its buffer, so an
outage longer than the buffer loses nothing.

Acknowledgement is by offset: a sink's offset advances over the batches it has
acknowledged in spool order (batches in flight may finish out of order), and is
persisted by the spool.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attr
from attr import frozen
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from banyan_kproxy.audit.event import LIST_OVERHEAD
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.spool import Record, Spool

__all__ = ["BatchPolicy", "SinkPump", "TokenBucket", "MAX_BACKOFF", "MIN_BACKOFF", "SinkRejected"]

#: The longest wait between two attempts at a failing sink.
MAX_BACKOFF = 300.0
#: The shortest, whatever ``initial_backoff`` says (so a zero cannot spin).
MIN_BACKOFF = 0.1


class SinkRejected(Exception):
    """
    A receiver refused a batch.  ``too_large`` (HTTP 413) makes the pump split it.
    """

    def __init__(self, message: str, code: int | None = None, too_large: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.too_large = too_large


@frozen
class BatchPolicy:
    """
    How one sink's events are batched, throttled and retried.

    ``max_wait`` 0 sends whatever is waiting at once; ``throttle_qps`` None turns
    the throttle off; ``max_batch_bytes`` None leaves batch sizes unbounded in bytes.
    """

    max_size: int = 400
    max_wait: float = 300.0
    buffer_size: int = 10000
    throttle_qps: float | None = 4.0
    throttle_burst: int = 4
    initial_backoff: float = 30.0
    max_backoff: float = MAX_BACKOFF
    max_in_flight: int = 4
    max_batch_bytes: int | None = 10 * 1024 * 1024
    jitter: float = 0.2


class TokenBucket:
    """
    ``flowcontrol.NewTokenBucketRateLimiter(qps, burst)`` on an injected clock.
    """

    def __init__(self, qps: float, burst: int, clock: Any) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self.clock = clock
        self.tokens = float(self.burst)
        self.updated = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.qps)
        self.updated = now

    def take(self) -> float:
        """
        Take a token and return 0, or return how long until one is available.
        """
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.qps


@attr.s(auto_attribs=True, eq=False)
class _Batch:
    records: list[Record]
    attempts: int = 0
    done: bool = False

    @property
    def start(self) -> int:
        return self.records[0].offset

    @property
    def end(self) -> int:
        return self.records[-1].end


@attr.s(auto_attribs=True, eq=False)
class SinkPump:
    """
    Feeds one sink (`IAuditSink`) from the spool with kube-apiserver's batching.
    """

    sink: Any
    policy: BatchPolicy
    spool: Spool
    clock: Any
    metrics: AuditMetrics
    random: Callable[[], float] = random.random
    log: Logger = attr.Factory(Logger)

    _queue: deque[Record] = attr.Factory(deque)
    _loaded_upto: int = 0
    _live: bool = False
    _reading: bool = False
    _outstanding: dict[int, _Batch] = attr.Factory(dict)
    _retry: list[_Batch] = attr.Factory(list)
    _in_flight: dict[_Batch, Deferred[None]] = attr.Factory(dict)
    _ack: int = 0
    _due: bool = False
    _flushing: bool = False
    _running: bool = False
    _delay: float | None = None
    _backoff_until: float = 0.0
    _wake_call: Any = None
    _timer: LoopingCall | None = None
    _bucket: TokenBucket | None = None
    _drained: list[Deferred[None]] = attr.Factory(list)

    def __attrs_post_init__(self) -> None:
        name = self.sink.name
        self._sent = self.metrics.sent.labels(sink=name)
        self._retried = self.metrics.retried.labels(sink=name)
        self.metrics.buffered.labels(queue=name).set_function(self.buffered)
        self.metrics.sink_lag.labels(sink=name).set_function(
            lambda: max(0, self.spool.committed_end - self._ack) if self._running else None
        )
        if self.policy.throttle_qps:
            self._bucket = TokenBucket(self.policy.throttle_qps, self.policy.throttle_burst, self.clock)

    @property
    def name(self) -> str:
        """
        The sink's name: its metric label and acknowledgement file.
        """
        return str(self.sink.name)

    @property
    def acknowledged(self) -> int:
        """
        The offset before which the sink has every event.
        """
        return self._ack

    def buffered(self) -> int:
        """
        Events held in memory for this sink (waiting or in flight).
        """
        return len(self._queue) + sum(len(b.records) for b in self._outstanding.values())

    # -- life cycle ---------------------------------------------------------------

    def start(self, offset: int) -> None:
        """
        Begin delivering from ``offset`` (the sink's recorded acknowledgement).
        """
        self._ack = self._loaded_upto = offset
        self._live = offset >= self.spool.committed_end
        self._running = True
        if self.policy.max_wait > 0:
            self._timer = LoopingCall(self._on_timer)
            self._timer.clock = self.clock
            self._timer.start(self.policy.max_wait, now=False).addErrback(
                lambda f: self.log.failure("Audit batch timer for {sink} stopped", f, sink=self.name)
            )
        self._maybe_read()

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Send everything in memory now, ignoring ``batch_max_wait`` and the throttle;
        fire when the sink has it all or after ``timeout`` seconds (then what is
        left stays in the spool for the next start).
        """
        self._flushing = True
        if self._idle():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        self._maybe_send()
        if d.called:
            return d
        timer = self.clock.callLater(timeout, self._give_up, d)

        def cancel_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(cancel_timer)

    def _give_up(self, d: Deferred[None]) -> None:
        if not d.called:
            left = self.buffered()
            self.log.warn(
                "Audit sink {sink}: {n} events not delivered before shutdown; "
                "they stay in the spool for the next start",
                sink=self.name,
                n=left,
            )
            for sending in list(self._in_flight.values()):
                sending.cancel()
            if d in self._drained:
                self._drained.remove(d)
            d.callback(None)

    def stop(self) -> None:
        """
        Stop timers and sending; what is unacknowledged stays in the spool.
        """
        self._running = False
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        for sending in list(self._in_flight.values()):
            sending.cancel()

    def _idle(self) -> bool:
        return not self._queue and not self._outstanding

    def _check_drained(self) -> None:
        if self._drained and self._idle():
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    # -- filling the buffer -----------------------------------------------------------

    def offer(self, records: Sequence[Record]) -> None:
        """
        Newly committed records; taken while this pump is caught up and has room.
        """
        if not self._running or not records:
            return
        if self._live and records[0].offset >= self._loaded_upto:
            room = self.policy.buffer_size - len(self._queue)
            taken = records[:room] if room < len(records) else records
            self._queue.extend(taken)
            if taken:
                self._loaded_upto = taken[-1].end
            if len(taken) < len(records):
                self._live = False
                self.log.info(
                    "Audit sink {sink} is {n} events behind its buffer; reading them back "
                    "from the spool as it catches up",
                    sink=self.name,
                    n=len(records) - len(taken),
                )
        elif self._live:
            self._live = False
        self._maybe_send()
        self._maybe_read()

    def _maybe_read(self) -> None:
        if not self._running or self._live or self._reading:
            return
        if self._loaded_upto >= self.spool.committed_end:
            self._live = True
            return
        room = self.policy.buffer_size - len(self._queue)
        if room < max(1, self.policy.buffer_size // 2):
            return
        self._reading = True
        d = self.spool.read(self._loaded_upto, room)
        d.addCallbacks(self._read_done, self._read_failed)
        d.addErrback(lambda f: self.log.failure("Audit pump {sink} failed", f, sink=self.name))

    def _read_done(self, result: Any) -> None:
        self._reading = False
        if not self._running:
            return
        if result.corrupt:
            self.spool.note_corrupt(result.corrupt, self.name)
        self._queue.extend(result.records)
        if result.next_offset > self._loaded_upto:
            self._loaded_upto = result.next_offset
        if self._loaded_upto >= self.spool.committed_end:
            self._live = True
        if not result.records and result.corrupt:
            # Only damage was read: acknowledge past it so the spool can move on.
            self._advance_ack()
        self._maybe_send()
        self._maybe_read()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        self.log.failure(
            "Audit sink {sink}: reading the spool failed; trying again in 1s", failure, sink=self.name
        )
        self._schedule_wake(1.0)

    # -- sending ------------------------------------------------------------------------

    def _on_timer(self) -> None:
        try:
            if self._queue or self._retry:
                self._due = True
            self._maybe_send()
        except Exception:  # noqa: BLE001 - a LoopingCall stops for good if its callable raises
            self.log.failure("Audit batch timer for {sink} failed", sink=self.name)

    def _wake(self) -> None:
        self._wake_call = None
        try:
            self._maybe_send()
            self._maybe_read()
        except Exception:  # noqa: BLE001 - keep the pump alive
            self.log.failure("Audit pump {sink} failed", sink=self.name)

    def _schedule_wake(self, delay: float) -> None:
        if not self._running:
            return
        when = self.clock.seconds() + delay
        if self._wake_call is not None and self._wake_call.active():
            if self._wake_call.getTime() <= when:
                return
            self._wake_call.cancel()
        self._wake_call = self.clock.callLater(delay, self._wake)

    def _ready_to_form(self) -> bool:
        if self._retry:
            return True
        if not self._queue:
            return False
        return (
            self._flushing
            or self._due
            or self.policy.max_wait <= 0
            or len(self._queue) >= self.policy.max_size
        )

    def _maybe_send(self) -> None:
        while self._running and len(self._in_flight) < self.policy.max_in_flight:
            now = self.clock.seconds()
            if now < self._backoff_until:
                self._schedule_wake(self._backoff_until - now)
                return
            if not self._ready_to_form():
                return
            if self._bucket is not None and not self._flushing:
                wait = self._bucket.take()
                if wait > 0:
                    self._schedule_wake(wait)
                    return
            if self._retry:
                batch = self._retry.pop(0)
                self._retried.inc(len(batch.records))
            else:
                batch = self._form()
                self._outstanding[batch.start] = batch
                self._due = False
                if self._timer is not None and self._timer.running:
                    self._timer.reset()
            self._send(batch)

    def _form(self) -> _Batch:
        records = []
        size = LIST_OVERHEAD
        limit = self.policy.max_batch_bytes
        while self._queue and len(records) < self.policy.max_size:
            record = self._queue[0]
            extra = len(record.data) + 1
            if records and limit is not None and size + extra > limit:
                break
            records.append(self._queue.popleft())
            size += extra
        return _Batch(records)

    def _send(self, batch: _Batch) -> None:
        batch.attempts += 1
        d = maybeDeferred(self.sink.send, [r.data for r in batch.records])
        self._in_flight[batch] = d
        d.addCallbacks(self._sent_ok, self._send_failed, (batch,), None, (batch,))
        d.addErrback(lambda f: self.log.failure("Audit pump {sink} failed", f, sink=self.name))

    def _sent_ok(self, _: object, batch: _Batch) -> None:
        self._in_flight.pop(batch, None)
        batch.done = True
        self._sent.inc(len(batch.records))
        if self._delay is not None and batch.attempts > 1:
            self.log.info("Audit sink {sink} is delivering again", sink=self.name)
        self._delay = None
        self._advance_ack()
        self._maybe_send()
        self._maybe_read()
        self._check_drained()

    def _advance_ack(self) -> None:
        ack = self._ack
        while self._outstanding:
            first = next(iter(self._outstanding.values()))
            if not first.done:
                ack = max(ack, first.start)
                break
            del self._outstanding[first.start]
            ack = first.end
        else:
            if self._queue:
                ack = max(ack, self._queue[0].offset)
            else:
                ack = max(ack, self._loaded_upto)
        if ack > self._ack:
            self._ack = ack
            self.spool.acknowledge(self.name, ack)

    def _send_failed(self, failure: Failure, batch: _Batch) -> None:
        self._in_flight.pop(batch, None)
        if failure.check(CancelledError) and (self._flushing or not self._running):
            # Given up at shutdown: it stays unacknowledged in the spool.
            bisect.insort(self._retry, batch, key=lambda b: b.start)
            return
        error = failure.value
        if isinstance(error, SinkRejected) and error.too_large and len(batch.records) > 1:
            half = len(batch.records) // 2
            first, second = _Batch(batch.records[:half]), _Batch(batch.records[half:])
            del self._outstanding[batch.start]
            self._outstanding[first.start] = first
            self._outstanding[second.start] = second
            self._outstanding = dict(sorted(self._outstanding.items()))
            for part in (first, second):
                bisect.insort(self._retry, part, key=lambda b: b.start)
            self.log.warn(
                "Audit sink {sink} refused a batch of {n} events as too large; splitting it",
                sink=self.name,
                n=len(batch.records),
            )
            self._maybe_send()
            return
        bisect.insort(self._retry, batch, key=lambda b: b.start)
        now = self.clock.seconds()
        if now >= self._backoff_until:
            floor = max(MIN_BACKOFF, self.policy.initial_backoff)
            self._delay = floor if self._delay is None else min(self._delay * 1.5, max(floor, self.policy.max_backoff))
            wait = self._delay * (1.0 + self.random() * self.policy.jitter)
            self._backoff_until = now + wait
            self.log.warn(
                "Audit sink {sink}: sending {n} events failed (attempt {attempt}): {error}; "
                "retrying in {wait:.1f}s; the events stay in the spool",
                sink=self.name,
                n=len(batch.records),
                attempt=batch.attempts,
                error=_describe(error),
                wait=wait,
            )
            self._schedule_wake(wait)


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]
