"""
The durable spool: audit events on disk from the moment they are accepted until
every sink has acknowledged them.

Layout of ``spool_dir``::

    lock                          flock'd by the one daemon using the directory
    00000000000000000000.seg      segment files, named by their first offset
    00000000000001048576.seg
    webhook.ack  log.ack  ...     per-sink acknowledgement offsets

Every event has an *offset*: its position in one append-only byte stream cut into
segment files.  A record is ``<crc32 as 8 hex digits> <event JSON>\\n``.  A sink's
``.ack`` file holds the offset up to which it has acknowledged everything; a segment
is deleted once every configured sink has acknowledged past its end.

**Accepted** means: the event's record has been written to a segment and that
segment fsync'd.  Events wait in memory (bounded) until then; the write and fsync of
everything that arrived in the meantime happen as one *group commit* in a thread,
never on the reactor.  Only accepted events count in
``kproxy_audit_events_spooled_total`` and only they are handed to sinks, so nothing a
sink received can be missing from the spool after a crash.

On start the last segment is checked record by record and cut after the last
complete one (a record torn by a crash was never accepted).  Each sink resumes from
its ``.ack`` offset: delivery is **at least once** per sink.  A sink sees an event
again only if the daemon stopped between the sink's acknowledgement and the ``.ack``
file being written, or when a receiver took a batch but its answer was lost; the
repeated event is byte-for-byte the same, so ``auditID`` plus ``stage`` identifies
it.

When the spool holds ``spool_max_bytes``, new events are refused (not accepted):
each refusal is counted in ``kproxy_audit_events_dropped_total{reason="spool_full"}``
and the condition is logged loudly when it starts, every minute while it lasts, and
when it ends.  Requests are never held up.

When the disk refuses a write (``ENOSPC``, ``EDQUOT``, ``EIO``), the group is cut
back off the segment and kept in memory, already encoded and in order, and the
write is tried again every `COMMIT_RETRY_DELAY` seconds until it succeeds: a short
outage loses nothing.  What is held is bounded by ``max_pending`` (events held plus
new ones); beyond it new events are dropped and counted
(``kproxy_audit_events_dropped_total{reason="spool_error"}``), as are the held ones
if the spool is closed first.  Each failed write counts in
``kproxy_audit_spool_write_errors_total{error}``, ``kproxy_audit_spool_write_failing``
is 1 meanwhile, and the log says so when it starts (naming the directory and the
errno), every minute while it lasts, and when it ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attr
from attr import frozen
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from banyan_kproxy.audit.event import EventTooLarge
from banyan_kproxy.audit.metrics import AuditMetrics

__all__ = [
    "Record",
    "SegmentStore",
    "Spool",
    "SpoolLocked",
    "Recovered",
    "ReadResult",
    "Executor",
    "segment_size_for",
    "observe",
]

SEGMENT_SUFFIX = ".seg"
ACK_SUFFIX = ".ack"
LOCK_NAME = "lock"
#: ``crc32hex`` + space + newline around every event.
FRAME_OVERHEAD = 10

#: How long a failed group commit waits before it is tried again.
COMMIT_RETRY_DELAY = 1.0
#: How often a full spool is logged again while it stays full.
FULL_LOG_INTERVAL = 60.0

Executor = Callable[..., "Deferred[Any]"]


def segment_size_for(max_bytes: int) -> int:
    """
    Segment size for a spool bound: a sixteenth of it, between 4 KiB and 64 MiB, so
    deleting acknowledged segments frees space in useful steps.
    """
    return max(4096, min(64 << 20, max_bytes // 16))


@frozen
class Record:
    """
    One spooled event: where it starts, where the next one starts, its JSON.
    """

    offset: int
    end: int
    data: bytes


@frozen
class Recovered:
    """
    What start-up found in the spool directory.
    """

    segments: tuple[tuple[int, int], ...]
    acks: dict[str, int]
    cut_bytes: int


@frozen
class Appended:
    """
    The outcome of one group commit.
    """

    records: tuple[Record, ...]
    refused: int
    too_large: tuple[str, ...]
    unencodable: tuple[str, ...]
    truncated: int
    segments: tuple[tuple[int, int], ...]


@frozen
class ReadResult:
    """
    Records read back from the spool, the offset to continue from, and how many
    damaged records were skipped.
    """

    records: tuple[Record, ...]
    next_offset: int
    corrupt: int


class SpoolLocked(Exception):
    """
    Another process uses the spool directory.
    """


class _WriteFailed(Exception):
    """
    (From the commit thread.) The disk refused a group: the events encoded for it,
    to be written again as they are, and those dropped while encoding.
    """

    def __init__(
        self,
        error: OSError,
        payloads: list[bytes],
        too_large: list[str],
        unencodable: list[str],
        truncated: int,
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.payloads = payloads
        self.too_large = too_large
        self.unencodable = unencodable
        self.truncated = truncated


def describe_os_error(error: OSError) -> tuple[str, str]:
    """
    The errno's symbolic name (``ENOSPC``; ``unknown`` without one) and a
    one-line description naming it.
    """
    name = errno.errorcode.get(error.errno, "unknown") if error.errno is not None else "unknown"
    return name, f"{error.strerror or error} ({name})"


def _frame(data: bytes) -> bytes:
    return b"%08x " % zlib.crc32(data) + data + b"\n"


def _unframe(line: bytes) -> bytes | None:
    """
    The event JSON of one record line (without its newline), or None if damaged.
    """
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    data = line[9:]
    return data if zlib.crc32(data) == crc else None


def _segment_name(base: int) -> str:
    return f"{base:020d}{SEGMENT_SUFFIX}"


class _Encoder(Protocol):
    def __call__(self, event: dict[str, Any]) -> bytes: ...


class SegmentStore:
    """
    Blocking file operations on a spool directory.

    Run only through an executor (``deferToThread``), never on the reactor.  Group
    commits are serialized by `Spool`; reads, deletes and acknowledgement writes may
    run alongside them because they touch only sealed data or other files.
    """

    def __init__(self, directory: str, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._active: list[int] | None = None  # [base, size] of the segment being written
        # The active segment holds bytes past its size that could not be cut off:
        # the next group goes to a new segment.
        self._sealed = False

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def open(self) -> None:
        """
        Create the directory (mode 0700) and lock it for this process.

        @raise SpoolLocked: another process holds the lock.
        @raise OSError: the directory cannot be made or used.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(self._path(LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolLocked(
                    f"spool_dir {self.directory} is in use by another process (pid {holder}); "
                    "give every daemon process its own spool_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def segments(self) -> list[tuple[int, int]]:
        """
        (first offset, size) of every segment file, in order.
        """
        found = []
        for name in os.listdir(self.directory):
            if name.endswith(SEGMENT_SUFFIX) and name[: -len(SEGMENT_SUFFIX)].isdigit():
                base = int(name[: -len(SEGMENT_SUFFIX)])
                found.append((base, os.stat(self._path(name)).st_size))
        return sorted(found)

    def recover(self) -> Recovered:
        """
        Check the last segment, cut it after its last whole record, read the acks.
        """
        segments = self.segments()
        cut = 0
        if segments:
            base, size = segments[-1]
            valid = self._valid_length(base, size)
            if valid < size:
                with open(self._path(_segment_name(base)), "r+b") as f:
                    f.truncate(valid)
                    os.fsync(f.fileno())
                cut = size - valid
                segments[-1] = (base, valid)
            self._open_active(base, valid)
        acks = {}
        for name in os.listdir(self.directory):
            if name.endswith(ACK_SUFFIX):
                try:
                    with open(self._path(name), "rb") as f:
                        acks[name[: -len(ACK_SUFFIX)]] = int(f.read().strip() or b"-1")
                except (OSError, ValueError):
                    continue  # unreadable: that sink starts from the oldest record
        return Recovered(tuple(segments), acks, cut)

    def _valid_length(self, base: int, size: int) -> int:
        valid = 0
        with open(self._path(_segment_name(base)), "rb") as f:
            rest = b""
            position = 0
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    return valid
                rest += chunk
                start = 0
                while True:
                    newline = rest.find(b"\n", start)
                    if newline < 0:
                        break
                    if _unframe(rest[start:newline]) is None:
                        return valid
                    start = newline + 1
                    valid = position + start
                position += start
                rest = rest[start:]

    def _open_active(self, base: int, size: int) -> None:
        fd = os.open(self._path(_segment_name(base)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Only once the new file is open: a failed open must not leave a closed
        # descriptor number here, which the process may reuse for a socket.
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._active = [base, size]
        self._sealed = False

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, payloads: Sequence[bytes], room: int) -> tuple[list[Record], int]:
        """
        Write as many of ``payloads`` as ``room`` bytes allow, in order, then fsync.

        Returns the records written and how many payloads did not fit.  On an error
        (``ENOSPC``, ``EIO``, ...) the segment is cut back to where it was and the
        error raised: nothing of the group counts as written, and the whole group is
        written again by the next try (not just fsync'd again: after a failed fsync
        the kernel may have dropped the dirty pages).  If the cut fails too, the
        segment is sealed at its real size: the torn bytes read back as one damaged
        record and the next group starts a new segment.
        """
        frames = []
        used = 0
        for data in payloads:
            frame = _frame(data)
            if used + len(frame) > room:
                break
            frames.append(frame)
            used += len(frame)
        refused = len(payloads) - len(frames)
        if not frames:
            return [], refused
        if self._active is None or self._active[1] >= self.segment_bytes or self._sealed:
            end = 0 if self._active is None else self._active[0] + self._active[1]
            self._open_active(end, 0)
            self._fsync_directory()
        assert self._active is not None and self._fd is not None
        base, size = self._active
        blob = b"".join(frames)
        try:
            view = memoryview(blob)
            while view:
                written = self._write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            try:
                self._truncate(self._fd, size)
            except OSError:
                try:
                    real = os.fstat(self._fd).st_size
                except OSError:
                    real = size + len(blob)
                self._active[1] = max(size, real)
                self._sealed = True
            raise
        records = []
        offset = base + size
        for frame in frames:
            records.append(Record(offset, offset + len(frame), frame[9:-1]))
            offset += len(frame)
        self._active[1] = size + len(blob)
        return records, refused

    def _write(self, fd: int, data: memoryview) -> int:
        """
        One ``write(2)`` (tests replace it to fail like a full disk).
        """
        return os.write(fd, data)

    def _truncate(self, fd: int, size: int) -> None:
        """
        Cut the segment back to ``size`` bytes after a failed write.
        """
        os.ftruncate(fd, size)

    def active(self) -> tuple[int, int] | None:
        """
        (first offset, size) of the segment being written.
        """
        return None if self._active is None else (self._active[0], self._active[1])

    def read(
        self,
        start: int,
        stop: int,
        segments: Sequence[tuple[int, int]],
        max_records: int,
        max_bytes: int = 8 << 20,
    ) -> ReadResult:
        """
        Records from ``start`` (a record boundary) up to ``stop``, at most
        ``max_records`` of them and about ``max_bytes``; damaged ones are skipped.
        """
        records: list[Record] = []
        corrupt = 0
        position = start
        budget = max_bytes
        for base, size in segments:
            end = base + size
            if end <= position:
                continue
            if len(records) >= max_records or budget <= 0 or max(position, base) >= stop:
                break
            position = max(position, base)
            limit = min(end, stop)
            with open(self._path(_segment_name(base)), "rb") as f:
                f.seek(position - base)
                rest = b""
                while position + len(rest) < limit and len(records) < max_records and budget > 0:
                    chunk = f.read(min(limit - position - len(rest), 1 << 20))
                    if not chunk:
                        break
                    rest += chunk
                    at = 0
                    while len(records) < max_records and budget > 0:
                        newline = rest.find(b"\n", at)
                        if newline < 0:
                            break
                        data = _unframe(rest[at:newline])
                        if data is None:
                            corrupt += 1
                        else:
                            records.append(Record(position + at, position + newline + 1, data))
                            budget -= newline + 1 - at
                        at = newline + 1
                    position += at
                    rest = rest[at:]
                if rest and b"\n" not in rest and position + len(rest) >= limit and limit == end:
                    # Bytes without a newline at the end of a sealed segment: damage.
                    corrupt += 1
                    position = limit
        return ReadResult(tuple(records), position, corrupt)

    def delete(self, bases: Sequence[int]) -> None:
        """
        Remove the segments starting at ``bases``.
        """
        for base in bases:
            try:
                os.unlink(self._path(_segment_name(base)))
            except FileNotFoundError:
                pass

    def write_ack(self, sink: str, offset: int) -> None:
        """
        Record that ``sink`` acknowledged everything before ``offset`` (write and rename).
        """
        path = self._path(sink + ACK_SUFFIX)
        temporary = path + ".tmp"
        try:
            with open(temporary, "wb") as f:
                f.write(b"%d\n" % offset)
            os.replace(temporary, path)
        except OSError:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise

    def close(self) -> None:
        """
        Close the active segment and release the lock.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class ISpoolReader(Protocol):
    """
    What the spool hands committed records to (a `SinkPump`).
    """

    name: str

    def offer(self, records: Sequence[Record]) -> None: ...


@attr.s(auto_attribs=True, eq=False)
class Spool:
    """
    The reactor side of the spool: accepts events, group-commits them, hands
    committed records to the sinks' pumps, and deletes what all sinks acknowledged.

    ``accept`` is the only call on the request path: it appends to a list.
    """

    store: SegmentStore
    executor: Executor
    clock: Any
    max_bytes: int
    max_pending: int
    encode: _Encoder
    metrics: AuditMetrics
    log: Logger = attr.Factory(Logger)
    # kproxy_audit_spool_write_errors_total{error} and kproxy_audit_spool_write_failing
    # (registered by the audit service; None: not counted).
    write_errors: Any = None
    write_failing: Any = None

    _pending: list[dict[str, Any]] = attr.Factory(list)
    # Events encoded for a group the disk refused, written first by the next try.
    _unwritten: list[bytes] = attr.Factory(list)
    _write_error: str | None = None
    _write_error_since: float = 0.0
    _write_error_logged_at: float = 0.0
    _dropped_while_failing: int = 0
    _ack_error_logged_at: float | None = None
    _commit_call: Any = None
    _committing: Deferred[None] | None = None
    _ready: bool = False
    _closed: bool = False
    _segments: list[tuple[int, int]] = attr.Factory(list)
    committed_end: int = 0
    _readers: list[ISpoolReader] = attr.Factory(list)
    _acks: dict[str, int] = attr.Factory(dict)
    _ack_written: dict[str, int] = attr.Factory(dict)
    _ack_writing: dict[str, Deferred[None]] = attr.Factory(dict)
    _deleting: bool = False
    _full_since: float | None = None
    _full_logged_at: float = 0.0
    _dropped_while_full: int = 0
    _backlog_logged_at: float | None = None

    def __attrs_post_init__(self) -> None:
        self.metrics.buffered.labels(queue="spool").set_function(lambda: self.held)
        if self.write_failing is not None:
            self.write_failing.set_function(lambda: 0 if self._write_error is None else 1)
        self.metrics.spool_bytes.set_function(lambda: self.committed_end - self.oldest)

    @property
    def oldest(self) -> int:
        """
        The first offset still on disk.
        """
        return self._segments[0][0] if self._segments else self.committed_end

    @property
    def used_bytes(self) -> int:
        """
        Bytes of records on disk.
        """
        return self.committed_end - self.oldest

    @property
    def held(self) -> int:
        """
        Events in memory waiting for the disk (not yet accepted).
        """
        return len(self._pending) + len(self._unwritten)

    @property
    def write_error(self) -> str | None:
        """
        While writes to the spool fail: the last error, e.g. ``No space left on
        device (ENOSPC)``.
        """
        return self._write_error

    def subscribe(self, reader: ISpoolReader) -> None:
        """
        Hand every future commit to ``reader``; its acknowledgements keep segments alive.
        """
        self._readers.append(reader)

    def ack_offset(self, name: str) -> int:
        """
        Where the sink ``name`` resumes: its recorded offset, or the oldest record.
        """
        return max(self._acks.get(name, self.oldest), self.oldest)

    # -- start ----------------------------------------------------------------

    def recover(self) -> Deferred[Recovered]:
        """
        Read the spool's state in a thread; events accepted meanwhile wait in memory.
        """
        d = self.executor(self.store.recover)

        def recovered(result: Recovered) -> Recovered:
            self._segments = list(result.segments)
            self.committed_end = (
                result.segments[-1][0] + result.segments[-1][1] if result.segments else 0
            )
            self._acks = dict(result.acks)
            self._ack_written = dict(result.acks)
            self._ready = True
            if result.cut_bytes:
                self.log.warn(
                    "Audit spool {directory}: cut {n} bytes of a record torn by a crash "
                    "(it was never accepted)",
                    directory=self.store.directory,
                    n=result.cut_bytes,
                )
            self._schedule_commit()
            return result

        return d.addCallback(recovered)

    # -- accepting --------------------------------------------------------------

    def accept(self, event: dict[str, Any]) -> None:
        """
        Take an event for the next group commit; never blocks, never raises.
        """
        if self._closed:
            self.metrics.drop("stopped")
            self.log.error(
                "Audit event {audit_id} ({stage}) arrived after the audit service stopped: DROPPED",
                audit_id=event.get("auditID"),
                stage=event.get("stage"),
            )
            return
        if self.held >= self.max_pending:
            now = self.clock.seconds()
            failing = self._write_error is not None
            self.metrics.drop("spool_error" if failing else "backlog")
            if failing:
                self._dropped_while_failing += 1
            if self._backlog_logged_at is None or now - self._backlog_logged_at >= FULL_LOG_INTERVAL:
                self._backlog_logged_at = now
                if failing:
                    self.log.critical(
                        "Audit events are DROPPED: the audit spool {directory} cannot be "
                        "written ({error}) and the {n} events held in memory are as many "
                        "as batch_buffer_size allows",
                        directory=self.store.directory,
                        error=self._write_error,
                        n=self.held,
                    )
                else:
                    self.log.error(
                        "Audit events are DROPPED: {n} events are waiting for the spool disk "
                        "({directory}) to finish writing",
                        n=self.held,
                        directory=self.store.directory,
                    )
            return
        self._pending.append(event)
        self._schedule_commit()

    def _schedule_commit(self) -> None:
        if (
            (self._pending or self._unwritten)
            and self._ready
            and self._committing is None
            and self._commit_call is None
        ):
            self._commit_call = self.clock.callLater(0, self._commit)

    def _encode_and_append(self, events: list[dict[str, Any]], room: int, encoded: Sequence[bytes] = ()) -> Appended:
        """
        (In a thread.) Encode a group, write what fits (after ``encoded``, events
        a failed try already encoded), fsync.

        @raise _WriteFailed: the disk refused the write.
        """
        payloads = list(encoded)
        too_large = []
        unencodable = []
        truncated = 0
        for event in events:
            try:
                data = self.encode(event)
            except EventTooLarge:
                too_large.append(str(event.get("auditID")))
                continue
            except Exception:  # noqa: BLE001 - one bad event must not sink the group
                unencodable.append(str(event.get("auditID")))
                continue
            if b'"audit.k8s.io/truncated":"true"' in data:
                truncated += 1
            payloads.append(data)
        try:
            records, refused = self.store.append(payloads, room)
        except OSError as e:
            raise _WriteFailed(e, payloads, too_large, unencodable, truncated) from e
        active = self.store.active()
        return Appended(
            tuple(records), refused, tuple(too_large), tuple(unencodable), truncated,
            (active,) if active is not None else (),
        )

    def _commit(self) -> None:
        self._commit_call = None
        if not (self._pending or self._unwritten) or self._committing is not None:
            return
        group, self._pending = self._pending, []
        encoded, self._unwritten = self._unwritten, []
        room = max(0, self.max_bytes - self.used_bytes)
        done: Deferred[None] = Deferred()
        self._committing = done
        d = self.executor(self._encode_and_append, group, room, encoded)
        d.addCallbacks(self._committed, self._commit_failed, errbackArgs=(group, encoded))
        d.addErrback(lambda f: self.log.failure("Audit spool bookkeeping failed", f))

        def finished(_: object) -> None:
            self._committing = None
            done.callback(None)
            self._schedule_commit()

        d.addBoth(finished)

    def _committed(self, result: Appended) -> None:
        now = self.clock.seconds()
        if self._write_error is not None:
            self._write_recovered(now)
        self._count_encoding_drops(result.too_large, result.unencodable, result.truncated)
        for base, size in result.segments:
            if self._segments and self._segments[-1][0] == base:
                self._segments[-1] = (base, size)
            else:
                self._segments.append((base, size))
        if result.records:
            self.committed_end = result.records[-1].end
            self.metrics.spooled.inc(len(result.records))
        self._note_full(result.refused, now)
        if result.records:
            for reader in list(self._readers):
                reader.offer(result.records)

    def _count_encoding_drops(self, too_large: Sequence[str], unencodable: Sequence[str], truncated: int) -> None:
        if too_large:
            self.metrics.drop("too_large", len(too_large))
            self.log.error(
                "Audit events too large even without request/response objects, DROPPED: {ids}",
                ids=", ".join(too_large),
            )
        if unencodable:
            self.metrics.drop("unencodable", len(unencodable))
            self.log.error(
                "Audit events that cannot be encoded as JSON, DROPPED: {ids}",
                ids=", ".join(unencodable),
            )
        if truncated:
            self.metrics.truncated.inc(truncated)

    def _note_full(self, refused: int, now: float) -> None:
        if refused:
            self.metrics.drop("spool_full", refused)
            self._dropped_while_full += refused
            if self._full_since is None:
                self._full_since = now
                self._full_logged_at = now
                self.metrics.spool_full.set(1)
                self.log.critical(
                    "AUDIT SPOOL FULL: {directory} holds {used} of spool_max_bytes={max} bytes; "
                    "new audit events are DROPPED until the sinks catch up ({lags})",
                    directory=self.store.directory,
                    used=self.used_bytes,
                    max=self.max_bytes,
                    lags=self._describe_lags(),
                )
            elif now - self._full_logged_at >= FULL_LOG_INTERVAL:
                self._full_logged_at = now
                self.log.critical(
                    "AUDIT SPOOL STILL FULL: {dropped} audit events dropped so far ({lags})",
                    dropped=self._dropped_while_full,
                    lags=self._describe_lags(),
                )
        elif self._full_since is not None:
            self.log.warn(
                "Audit spool {directory} has room again after {seconds:.0f}s; "
                "{dropped} audit events were dropped while it was full",
                directory=self.store.directory,
                seconds=now - self._full_since,
                dropped=self._dropped_while_full,
            )
            self._full_since = None
            self._dropped_while_full = 0
            self.metrics.spool_full.set(0)

    def _describe_lags(self) -> str:
        return ", ".join(
            f"{reader.name} is {self.committed_end - self.ack_offset(reader.name)} bytes behind"
            for reader in self._readers
        ) or "no sinks"

    def _commit_failed(self, failure: Failure, group: list[dict[str, Any]], encoded: list[bytes]) -> None:
        """
        The disk refused the group (or something unexpected failed): keep it in
        memory, in order, bounded by ``max_pending``, and try again in a second.
        """
        now = self.clock.seconds()
        error = failure.value
        if isinstance(error, _WriteFailed):
            self._count_encoding_drops(error.too_large, error.unencodable, error.truncated)
            self._unwritten = error.payloads + self._unwritten
            self._note_write_error(error.error, now)
        else:
            self._unwritten = encoded + self._unwritten
            self._pending = group + self._pending
            if isinstance(error, OSError):
                self._note_write_error(error, now)
            else:
                self.log.failure(
                    "Audit spool {directory}: writing {n} events failed; retrying in {delay}s "
                    "(they are not accepted until written)",
                    failure,
                    directory=self.store.directory,
                    n=len(group) + len(encoded),
                    delay=COMMIT_RETRY_DELAY,
                )
        over = self.held - self.max_pending
        if over > 0:
            # The newest go: what waited longest is written first when the disk is back.
            cut = min(over, len(self._pending))
            if cut:
                del self._pending[len(self._pending) - cut:]
            if over > cut:
                del self._unwritten[len(self._unwritten) - (over - cut):]
            failing = self._write_error is not None
            self.metrics.drop("spool_error" if failing else "backlog", over)
            if failing:
                self._dropped_while_failing += over
        # `_schedule_commit` waits while this call is pending; `flush` may run it early.
        self._commit_call = self.clock.callLater(COMMIT_RETRY_DELAY, self._commit)

    def _note_write_error(self, error: OSError, now: float) -> None:
        """
        Count a failed write and say so: loudly when it starts, every
        `FULL_LOG_INTERVAL` while it lasts.
        """
        name, text = describe_os_error(error)
        if self.write_errors is not None:
            self.write_errors.labels(error=name).inc()
        if self._write_error is None:
            self._write_error_since = self._write_error_logged_at = now
            self._dropped_while_failing = 0
            self.log.critical(
                "AUDIT SPOOL CANNOT BE WRITTEN: {directory}: {error}; audit events are held "
                "in memory (at most batch_buffer_size={limit}, then DROPPED) and the write is "
                "tried again every {delay:g}s; requests are not held up",
                directory=self.store.directory,
                error=text,
                limit=self.max_pending,
                delay=COMMIT_RETRY_DELAY,
            )
        elif now - self._write_error_logged_at >= FULL_LOG_INTERVAL:
            self._write_error_logged_at = now
            self.log.critical(
                "AUDIT SPOOL STILL CANNOT BE WRITTEN after {seconds:.0f}s: {directory}: {error}; "
                "{held} audit events held in memory, {dropped} DROPPED so far",
                seconds=now - self._write_error_since,
                directory=self.store.directory,
                error=text,
                held=self.held,
                dropped=self._dropped_while_failing,
            )
        self._write_error = text

    def _write_recovered(self, now: float) -> None:
        self.log.warn(
            "Audit spool {directory} can be written again after {seconds:.0f}s ({error}); "
            "the audit events held in memory are written, {dropped} were dropped",
            directory=self.store.directory,
            seconds=now - self._write_error_since,
            error=self._write_error,
            dropped=self._dropped_while_failing,
        )
        self._write_error = None
        self._dropped_while_failing = 0

    # -- reading and acknowledging --------------------------------------------

    def read(self, start: int, max_records: int) -> Deferred[ReadResult]:
        """
        Read committed records from ``start`` in a thread.
        """
        return self.executor(
            self.store.read, start, self.committed_end, list(self._segments), max_records
        )

    def note_corrupt(self, n: int, sink: str) -> None:
        """
        Count and log records that failed their checksum when ``sink`` read them.
        """
        self.metrics.drop("corrupt", n)
        self.log.critical(
            "Audit spool {directory}: {n} damaged records skipped while reading for {sink}",
            directory=self.store.directory,
            n=n,
            sink=sink,
        )

    def acknowledge(self, name: str, offset: int) -> None:
        """
        ``name`` has everything before ``offset``: persist that, delete what all sinks have.
        """
        if offset <= self._acks.get(name, -1):
            return
        self._acks[name] = offset
        self._write_ack(name)
        self._collect()

    def _write_ack(self, name: str) -> None:
        if name in self._ack_writing:
            return
        offset = self._acks[name]
        if self._ack_written.get(name) == offset:
            return
        d = self.executor(self.store.write_ack, name, offset)
        self._ack_writing[name] = d

        def written(_: object) -> None:
            self._ack_written[name] = offset

        def done(_: object) -> None:
            del self._ack_writing[name]
            # A newer offset arrived meanwhile: write it now.  After a failure the
            # next acknowledgement (or the stop) tries again, not a busy loop.
            if self._ack_written.get(name) == offset and self._acks.get(name) != offset:
                self._write_ack(name)

        d.addCallbacks(written, self._ack_failed, errbackArgs=(name,))
        d.addBoth(done)

    def _ack_failed(self, failure: Failure, name: str) -> None:
        """
        An acknowledgement could not be written: counted, logged at most every
        `FULL_LOG_INTERVAL`; the next acknowledgement (or the stop) writes it again.
        Until then the sink would see some events again after a restart.
        """
        if not isinstance(failure.value, OSError):
            self.log.failure("Writing the audit acknowledgement for {sink} failed", failure, sink=name)
            return
        error_name, text = describe_os_error(failure.value)
        if self.write_errors is not None:
            self.write_errors.labels(error=error_name).inc()
        now = self.clock.seconds()
        if self._ack_error_logged_at is None or now - self._ack_error_logged_at >= FULL_LOG_INTERVAL:
            self._ack_error_logged_at = now
            self.log.error(
                "Audit spool {directory}: the acknowledgement of {sink} cannot be written: "
                "{error} (it is kept in memory and written again with the next one)",
                directory=self.store.directory,
                sink=name,
                error=text,
            )

    def _collect(self) -> None:
        if self._deleting or len(self._segments) < 2 or not self._readers:
            return
        floor = min(self.ack_offset(reader.name) for reader in self._readers)
        doomed = [base for base, size in self._segments[:-1] if base + size <= floor]
        if not doomed:
            return
        self._deleting = True
        d = self.executor(self.store.delete, doomed)

        def deleted(_: object) -> None:
            gone = set(doomed)
            self._segments = [s for s in self._segments if s[0] not in gone]

        def done(_: object) -> None:
            self._deleting = False
            self._collect()

        d.addCallbacks(
            deleted, lambda f: self.log.failure("Deleting acknowledged audit segments failed", f)
        )
        d.addBoth(done)

    # -- stopping ---------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """
        Commit everything waiting now (and anything that arrives meanwhile).

        While the disk refuses writes this makes one more try and returns: the
        events stay in memory (the stop counts them as dropped if it gets no further).
        """
        return Deferred.fromCoroutine(self._flush())

    async def _flush(self) -> None:
        tried_failing = False
        # Bounded: each round either waits for a commit or starts one.
        for _ in range(10000):
            if self._committing is not None:
                await observe(self._committing)
                continue
            if not (self._pending or self._unwritten) or not self._ready:
                return
            if self._write_error is not None:
                if tried_failing:
                    return
                tried_failing = True
            if self._commit_call is not None and self._commit_call.active():
                self._commit_call.cancel()
            self._commit_call = None
            self._commit()

    def close(self) -> Deferred[None]:
        """
        Refuse new events, wait for acknowledgement writes, close files, unlock.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        self._closed = True
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        self._commit_call = None
        if self.held:
            failing = self._write_error is not None
            self.metrics.drop("spool_error" if failing else "stopped", self.held)
            self.log.critical(
                "Audit service stopped with {n} events not yet written to the spool{why}: DROPPED",
                n=self.held,
                why=f" ({self.store.directory}: {self._write_error})" if failing else "",
            )
            self._pending, self._unwritten = [], []
        for _ in range(100):
            writing = list(self._ack_writing.values())
            if writing:
                await gatherResults([observe(d) for d in writing])
                continue
            stale = [n for n, offset in self._acks.items() if self._ack_written.get(n) != offset]
            if not stale:
                break
            for name in stale:
                self._write_ack(name)
            if not self._ack_writing:
                break  # every write failed at once; already logged
        await self.executor(self.store.close)


def observe(d: Deferred[Any]) -> Deferred[None]:
    """
    A Deferred that fires (with None) when ``d`` does, without touching ``d``'s result.
    """
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out
