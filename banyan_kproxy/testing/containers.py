"""
Fake containers for the Kubernetes API stand-in: an in-memory filesystem per pod and
a small set of built-in commands, so that ``kubectl exec``, ``attach`` and ``cp`` have
something to talk to without running anything on the host.

`PodFilesystem` holds directories, regular files and symlinks in memory; it writes
and reads tar archives with `tarfile`, the way GNU tar does for ``kubectl cp``.

`Container` runs commands (`Container.exec`) and stands for the container's main
process (`Container.attach`).  A command is a generator that asks for standard input
by yielding and gets ``b""`` at end of input, so it streams: ``cat`` copies megabytes
from stdin to stdout as they arrive.  `Process` drives one.  The commands:

``cat [FILE...]``
    stdin (or the files) to stdout, byte for byte.
``echo [-n] [ARG...]``, ``true``, ``false``, ``pwd``, ``hostname``
    as usual.
``ls [-1] [-a] [-l] [PATH...]``
    names, one per line, sorted (``-l`` adds mode and size).
``test``/``[`` with ``-d``, ``-f``, ``-e``, ``-s``, ``-z``, ``-n``
    what ``kubectl cp`` runs first: ``test -d DEST``.
``mkdir [-p] DIR...``, ``rm [-r] [-f] PATH...``
    on the pod's filesystem.
``tar cf - PATH...`` and ``tar [--no-same-permissions] [--no-same-owner] -xmf - [-C DIR]``
    the forms ``kubectl cp`` sends (old-style ``cf``/``xmf`` and dashed bundles both
    parse; ``-C``, ``--directory=DIR`` and ``v`` work too).
``tail -c +N`` / ``tail -c N``
    for ``kubectl cp --retries`` (``tar cf - PATH | tail -c+N``).
``sh -c SCRIPT`` (also ``/bin/sh``, ``bash``)
    simple commands joined by ``;``, ``&&``, ``||`` and ``|``, with ``'...'``/``"..."``
    quoting, ``>&2``, ``2>&1``, ``> FILE``, ``>> FILE`` and ``< FILE``, ``exit N``
    and ``$?``.  ``sh`` without ``-c`` reads commands from stdin, a line at a time.
    An unknown command inside a script is ``sh: 1: NAME: not found`` with status 127.

An unknown command run directly raises `CommandNotFound`; the stand-in answers it as
containerd and runc do (an ``InternalError`` status on the error channel).  With a
TTY, stderr goes to stdout and ``\\n`` becomes ``\\r\\n`` on the way out.

The main process (``kubectl attach``) writes the container's attach banner to each
client that attaches, then echoes what arrives on stdin back on stdout; the session
ends when the client closes stdin, or straight after the banner when the client
attached without stdin.
"""

from __future__ import annotations

import io
import posixpath
import shlex
import stat
import tarfile
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any

from attr import define, field, frozen

#: A running command: yields to ask for stdin (gets ``b""`` at EOF), returns the status.
Command = Generator[None, bytes, int]
CommandResult = int | Command


class CommandNotFound(Exception):
    """
    The container has no such executable (the runtime refuses to start it).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@frozen
class ExitStatus:
    """
    How a process ended: its exit ``code``, or the container runtime's ``error``
    message when it could not run at all.
    """

    code: int = 0
    error: str | None = None

    @property
    def success(self) -> bool:
        """
        Exit code 0 and no runtime error.
        """
        return self.error is None and self.code == 0


# -- the filesystem --------------------------------------------------------------------


@define
class _Entry:
    kind: str  # "dir", "file" or "symlink"
    data: bytes = b""
    mode: int = 0o644
    mtime: float = 0.0
    target: str = ""


def _clean(path: str, cwd: str = "/") -> str:
    joined = posixpath.join(cwd, path) if not path.startswith("/") else path
    normal = posixpath.normpath(joined)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    return normal


class FilesystemError(Exception):
    """
    A filesystem operation failed; ``strerror`` is the libc text (``No such file or
    directory``, ``Not a directory``, ...).
    """

    def __init__(self, path: str, strerror: str) -> None:
        super().__init__(f"{path}: {strerror}")
        self.path = path
        self.strerror = strerror


class PodFilesystem:
    """
    An in-memory POSIX-like filesystem: directories, regular files and symlinks, with
    modes and modification times.  Paths are absolute or relative to ``/``.

    A new one has ``/``, ``/tmp``, ``/root``, ``/etc`` (with ``/etc/hostname`` when a
    ``hostname`` is given) and the ``files`` given (``{"/srv/a.txt": b"..."}``; text
    is UTF-8), their parent directories made as needed.
    """

    def __init__(
        self,
        files: Mapping[str, bytes | str] | None = None,
        *,
        hostname: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {"/": _Entry("dir", mode=0o755, mtime=clock())}
        for directory in ("/tmp", "/root", "/etc"):
            self.mkdir(directory, parents=True, mode=0o1777 if directory == "/tmp" else 0o755)
        if hostname:
            self.write("/etc/hostname", hostname + "\n")
        for path, data in (files or {}).items():
            self.write(path, data)

    # -- queries

    def _lookup(self, path: str) -> _Entry | None:
        try:
            return self._entries.get(self._resolve(path))
        except FilesystemError:
            return None

    def exists(self, path: str) -> bool:
        """
        Whether ``path`` exists (following symlinks).
        """
        return self._lookup(path) is not None

    def is_dir(self, path: str) -> bool:
        """
        Whether ``path`` is a directory (following symlinks).
        """
        entry = self._lookup(path)
        return entry is not None and entry.kind == "dir"

    def is_file(self, path: str) -> bool:
        """
        Whether ``path`` is a regular file (following symlinks).
        """
        entry = self._lookup(path)
        return entry is not None and entry.kind == "file"

    def read(self, path: str) -> bytes:
        """
        A regular file's content; `FilesystemError` if missing or a directory.
        """
        entry = self._lookup(path)
        if entry is None:
            raise FilesystemError(path, "No such file or directory")
        if entry.kind == "dir":
            raise FilesystemError(path, "Is a directory")
        return entry.data

    def mode(self, path: str) -> int:
        """
        The permission bits of ``path``.
        """
        entry = self._lookup(path)
        if entry is None:
            raise FilesystemError(path, "No such file or directory")
        return entry.mode

    def listdir(self, path: str) -> list[str]:
        """
        The sorted names in a directory.
        """
        entry = self._lookup(path)
        if entry is None:
            raise FilesystemError(path, "No such file or directory")
        if entry.kind != "dir":
            raise FilesystemError(path, "Not a directory")
        directory = self._resolve(path)
        prefix = directory.rstrip("/") + "/"
        return sorted(
            p[len(prefix):] for p in self._entries
            if p.startswith(prefix) and p != directory and "/" not in p[len(prefix):]
        )

    def files(self) -> dict[str, bytes]:
        """
        Every regular file's path and content.
        """
        return {p: e.data for p, e in sorted(self._entries.items()) if e.kind == "file"}

    def _resolve(self, path: str, depth: int = 0) -> str:
        """
        ``path`` with every symlink in it followed (the last component too).
        """
        if depth > 32:
            raise FilesystemError(path, "Too many levels of symbolic links")
        path = _clean(path)
        if path == "/":
            return path
        parent, name = posixpath.split(path)
        real_parent = self._resolve(parent, depth + 1)
        candidate = posixpath.join(real_parent, name)
        entry = self._entries.get(candidate)
        if entry is not None and entry.kind == "symlink":
            return self._resolve(_clean(entry.target, real_parent), depth + 1)
        return candidate

    # -- changes

    def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> None:
        """
        Make a directory (and its parents with ``parents``); an existing directory is
        fine with ``parents``, an error without.
        """
        path = self._resolve(path)
        entry = self._entries.get(path)
        if entry is not None:
            if entry.kind == "dir" and parents:
                return
            raise FilesystemError(path, "File exists")
        parent = posixpath.dirname(path)
        if not self.is_dir(parent):
            if parents and not self.exists(parent):
                self.mkdir(parent, parents=True)
            else:
                raise FilesystemError(
                    path, "Not a directory" if self.exists(parent) else "No such file or directory"
                )
        self._entries[path] = _Entry("dir", mode=mode, mtime=self._clock())

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644, append: bool = False,
              mtime: float | None = None) -> None:
        """
        Create or replace (or with ``append`` extend) a regular file; missing parent
        directories are made.
        """
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        path = self._resolve(path)
        entry = self._entries.get(path)
        if entry is not None and entry.kind == "dir":
            raise FilesystemError(path, "Is a directory")
        parent = posixpath.dirname(path)
        if not self.exists(parent):
            self.mkdir(parent, parents=True)
        elif not self.is_dir(parent):
            raise FilesystemError(path, "Not a directory")
        if entry is not None and append:
            entry.data += raw
            entry.mtime = self._clock() if mtime is None else mtime
            return
        self._entries[path] = _Entry(
            "file", raw, mode, self._clock() if mtime is None else mtime
        )

    def symlink(self, target: str, path: str) -> None:
        """
        Make a symlink at ``path`` pointing to ``target``.
        """
        path = self._resolve(posixpath.dirname(_clean(path))) + "/" + posixpath.basename(path)
        path = _clean(path)
        if path in self._entries:
            raise FilesystemError(path, "File exists")
        self._entries[path] = _Entry("symlink", mode=0o777, mtime=self._clock(), target=target)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """
        Remove a file, symlink or (with ``recursive``, or when empty) directory.
        """
        real = _clean(path)
        entry = self._entries.get(real) or self._entries.get(self._resolve(path))
        if entry is None:
            raise FilesystemError(path, "No such file or directory")
        if entry.kind != "symlink":
            real = self._resolve(path)
        if real == "/":
            raise FilesystemError(path, "Device or resource busy")
        if entry.kind == "dir":
            children = [p for p in self._entries if p.startswith(real + "/")]
            if children and not recursive:
                raise FilesystemError(path, "Directory not empty")
            for child in children:
                del self._entries[child]
        del self._entries[real]

    # -- tar

    def tar(self, paths: Sequence[str], *, cwd: str = "/") -> tuple[bytes, list[str]]:
        """
        A tar archive of ``paths`` (directories recursively), named as GNU tar names
        them: as given, less any leading ``/``.  Returns the archive and the error
        messages for paths that do not exist.
        """
        out = io.BytesIO()
        errors: list[str] = []
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
            for given in paths:
                if not self.exists(_clean(given, cwd)) and _clean(given, cwd) not in self._entries:
                    errors.append(f"{given}: Cannot stat: No such file or directory")
                    continue
                name = posixpath.normpath(given).lstrip("/") or "."
                self._add_to_tar(archive, _clean(given, cwd), name)
        return out.getvalue(), errors

    def _add_to_tar(self, archive: tarfile.TarFile, path: str, name: str) -> None:
        # The named path itself (a symlink stays a symlink, as without tar -h).
        entry = self._entries.get(path) or self._lookup(path)
        assert entry is not None
        info = tarfile.TarInfo(name)
        info.mtime = int(entry.mtime)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = entry.mode
        if entry.kind == "dir":
            info.type = tarfile.DIRTYPE
            info.name = name.rstrip("/") + "/"
            archive.addfile(info)
            for child in self.listdir(path):
                self._add_to_tar(archive, posixpath.join(path, child), posixpath.join(name, child))
        elif entry.kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = entry.target
            archive.addfile(info)
        else:
            info.size = len(entry.data)
            archive.addfile(info, io.BytesIO(entry.data))

    def untar(self, data: bytes, directory: str = "/", *, keep_mtime: bool = False) -> list[str]:
        """
        Extract a tar archive under ``directory`` (which must exist), as GNU tar does:
        leading ``/`` and ``..`` components are dropped from names, parents are made.
        With ``keep_mtime`` false (``tar -m``) files get the current time.  Returns
        the error messages (empty on success).
        """
        if not self.is_dir(directory):
            return [f"{directory}: Cannot open: No such file or directory"]
        errors: list[str] = []
        try:
            archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        except tarfile.TarError:
            return ["This does not look like a tar archive"]
        with archive:
            try:
                members = archive.getmembers()
            except tarfile.TarError as e:
                return [f"Unexpected EOF in archive ({e})"]
            for member in members:
                parts = [p for p in member.name.split("/") if p not in ("", ".", "..")]
                if not parts:
                    continue
                target = _clean("/".join(parts), directory)
                mtime = float(member.mtime) if keep_mtime else None
                try:
                    if member.isdir():
                        self.mkdir(target, parents=True, mode=member.mode & 0o7777)
                    elif member.issym():
                        if self.exists(target) or target in self._entries:
                            self.remove(target, recursive=False)
                        self.symlink(member.linkname, target)
                    elif member.isfile():
                        source = archive.extractfile(member)
                        assert source is not None
                        self.write(target, source.read(), mode=member.mode & 0o7777, mtime=mtime)
                    else:
                        errors.append(f"{member.name}: Cannot create: Operation not permitted")
                except FilesystemError as e:
                    errors.append(f"{member.name}: Cannot open: {e.strerror}")
        return errors


# -- commands --------------------------------------------------------------------------


@define
class _Context:
    """
    What a command runs with: the filesystem, where its output goes, its shell state.
    """

    container: Container
    stdout: Callable[[bytes], None]
    stderr: Callable[[bytes], None]
    cwd: str = "/"
    last_status: int = 0
    tty: bool = False

    @property
    def fs(self) -> PodFilesystem:
        return self.container.filesystem

    def err(self, text: str) -> None:
        self.stderr(text.encode("utf-8"))

    def out(self, text: str) -> None:
        self.stdout(text.encode("utf-8"))

    def with_output(self, stdout: Callable[[bytes], None], stderr: Callable[[bytes], None] | None = None) -> _Context:
        return _Context(self.container, stdout, stderr or self.stderr, self.cwd, self.last_status,
                        self.tty)


def read_all() -> Generator[None, bytes, bytes]:
    """
    Read stdin to its end (``data = yield from read_all()``).
    """
    data = bytearray()
    while True:
        chunk = yield
        if not chunk:
            return bytes(data)
        data += chunk


def _cat(ctx: _Context, args: list[str]) -> CommandResult:
    paths = [a for a in args if a != "-"]
    if not args:
        return _cat_stdin(ctx)
    status = 0
    for path in paths:
        try:
            ctx.stdout(ctx.fs.read(_clean(path, ctx.cwd)))
        except FilesystemError as e:
            ctx.err(f"cat: {path}: {e.strerror}\n")
            status = 1
    return status


def _cat_stdin(ctx: _Context) -> Command:
    while True:
        chunk = yield
        if not chunk:
            return 0
        ctx.stdout(chunk)


def _echo(ctx: _Context, args: list[str]) -> int:
    newline = "\n"
    if args[:1] == ["-n"]:
        args, newline = args[1:], ""
    ctx.out(" ".join(args) + newline)
    return 0


def _ls(ctx: _Context, args: list[str]) -> int:
    flags = "".join(a[1:] for a in args if a.startswith("-") and len(a) > 1)
    paths = [a for a in args if not a.startswith("-") or a == "-"] or ["."]
    status = 0
    listings: list[tuple[str, list[str]]] = []
    for path in paths:
        full = _clean(path, ctx.cwd)
        if not ctx.fs.exists(full):
            ctx.err(f"ls: cannot access '{path}': No such file or directory\n")
            status = 2
            continue
        if ctx.fs.is_dir(full):
            names = ctx.fs.listdir(full)
            if "a" in flags:
                names = [".", ".."] + names
            listings.append((path, [n for n in names if "a" in flags or not n.startswith(".")]))
        else:
            listings.append(("", [path]))
    for index, (path, names) in enumerate(listings):
        if len(listings) > 1 and path:
            ctx.out(("\n" if index else "") + f"{path}:\n")
        for name in names:
            if "l" in flags:
                full = _clean(posixpath.join(path, name), ctx.cwd) if path else _clean(name, ctx.cwd)
                kind = "d" if ctx.fs.is_dir(full) else "-"
                mode = stat.filemode(ctx.fs.mode(full))[1:]
                size = 4096 if kind == "d" else len(ctx.fs.read(full))
                ctx.out(f"{kind}{mode} 1 root root {size:>8} Jan  1 00:00 {name}\n")
            else:
                ctx.out(name + "\n")
    return status


def _test(ctx: _Context, args: list[str]) -> int:
    if args and args[-1] == "]":
        args = args[:-1]
    if not args:
        return 1
    if len(args) == 1:
        return 0 if args[0] else 1
    if len(args) == 2:
        op, operand = args
        path = _clean(operand, ctx.cwd) if operand else ""
        checks: dict[str, Callable[[], bool]] = {
            "-d": lambda: bool(path) and ctx.fs.is_dir(path),
            "-f": lambda: bool(path) and ctx.fs.is_file(path),
            "-e": lambda: bool(path) and ctx.fs.exists(path),
            "-s": lambda: bool(path) and ctx.fs.is_file(path) and bool(ctx.fs.read(path)),
            "-z": lambda: operand == "",
            "-n": lambda: operand != "",
        }
        if op in checks:
            return 0 if checks[op]() else 1
        if op == "!":
            return 1 - _test(ctx, [operand])
    if len(args) == 3 and args[1] in ("=", "!="):
        return 0 if (args[0] == args[2]) == (args[1] == "=") else 1
    ctx.err(f"test: {args[0]}: unexpected operator\n")
    return 2


def _mkdir(ctx: _Context, args: list[str]) -> int:
    parents = "-p" in args
    status = 0
    for path in (a for a in args if not a.startswith("-")):
        try:
            ctx.fs.mkdir(_clean(path, ctx.cwd), parents=parents)
        except FilesystemError as e:
            ctx.err(f"mkdir: cannot create directory '{path}': {e.strerror}\n")
            status = 1
    return status


def _rm(ctx: _Context, args: list[str]) -> int:
    flags = "".join(a[1:] for a in args if a.startswith("-"))
    status = 0
    for path in (a for a in args if not a.startswith("-")):
        full = _clean(path, ctx.cwd)
        if ctx.fs.is_dir(full) and "r" not in flags and "R" not in flags:
            ctx.err(f"rm: cannot remove '{path}': Is a directory\n")
            status = 1
            continue
        try:
            ctx.fs.remove(full, recursive=True)
        except FilesystemError as e:
            if "f" not in flags:
                ctx.err(f"rm: cannot remove '{path}': {e.strerror}\n")
                status = 1
    return status


def _tail(ctx: _Context, args: list[str]) -> CommandResult:
    spec = ""
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "-c" and rest:
            spec = rest.pop(0)
        elif arg.startswith("-c"):
            spec = arg[2:]
        else:
            ctx.err(f"tail: unsupported argument '{arg}'\n")
            return 1
    if not spec:
        ctx.err("tail: only -c is supported here\n")
        return 1

    def run() -> Command:
        data = yield from read_all()
        if spec.startswith("+"):
            ctx.stdout(data[max(int(spec[1:]) - 1, 0):])
        else:
            count = int(spec)
            ctx.stdout(data[-count:] if count else b"")
        return 0

    if not spec.lstrip("+").isdigit():
        ctx.err(f"tail: invalid number of bytes: '{spec}'\n")
        return 1
    return run()


def _parse_tar_args(args: list[str]) -> tuple[str, str | None, str | None, list[str], bool]:
    """
    (mode, archive, directory, operands, verbose) from tar's argv (after ``tar``).
    """
    mode = ""
    archive: str | None = None
    directory: str | None = None
    verbose = False
    operands: list[str] = []
    queue = list(args)
    if queue and not queue[0].startswith("-"):
        # Old-style bundled letters: "cf", "xmf".
        queue[0] = "-" + queue[0]
    pending_values: list[str] = []
    while queue:
        arg = queue.pop(0)
        if arg == "--":
            operands.extend(queue)
            break
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if name in ("no-same-permissions", "no-same-owner", "touch", "same-owner",
                        "preserve-permissions"):
                continue
            if name == "directory":
                directory = value or (queue.pop(0) if queue else None)
                continue
            if name == "file":
                archive = value or (queue.pop(0) if queue else None)
                continue
            if name in ("create", "extract", "list"):
                mode = name[0] if name != "list" else "t"
                continue
            if name == "verbose":
                verbose = True
                continue
            raise ValueError(f"unrecognized option '{arg}'")
        if arg.startswith("-") and len(arg) > 1:
            for letter in arg[1:]:
                if letter in "cxt":
                    mode = letter
                elif letter in "fC":
                    pending_values.append(letter)
                elif letter == "v":
                    verbose = True
                elif letter in "mpo":
                    continue
                else:
                    raise ValueError(f"invalid option -- '{letter}'")
            for letter in pending_values:
                if not queue:
                    raise ValueError(f"option requires an argument -- '{letter}'")
                if letter == "f":
                    archive = queue.pop(0)
                else:
                    directory = queue.pop(0)
            pending_values = []
            continue
        operands.append(arg)
    return mode, archive, directory, operands, verbose


def _tar(ctx: _Context, args: list[str]) -> CommandResult:
    try:
        mode, archive, directory, operands, verbose = _parse_tar_args(args)
    except ValueError as e:
        ctx.err(f"tar: {e}\nTry 'tar --help' or 'tar --usage' for more information.\n")
        return 2
    if not mode:
        ctx.err("tar: You must specify one of the '-Acdtrux', '--delete' or '--test-label'"
                " options\nTry 'tar --help' or 'tar --usage' for more information.\n")
        return 2
    if archive not in (None, "-"):
        ctx.err(f"tar: {archive}: archives on the pod filesystem are not supported here\n")
        return 2
    cwd = _clean(directory, ctx.cwd) if directory else ctx.cwd
    if directory and not ctx.fs.is_dir(cwd):
        ctx.err(f"tar: {directory}: Cannot open: No such file or directory\n"
                "tar: Error is not recoverable: exiting now\n")
        return 2
    if mode == "c":
        if not operands:
            ctx.err("tar: Cowardly refusing to create an empty archive\n"
                    "Try 'tar --help' or 'tar --usage' for more information.\n")
            return 2
        if any(o.startswith("/") for o in operands):
            ctx.err("tar: Removing leading `/' from member names\n")
        data, errors = ctx.fs.tar(operands, cwd=cwd)
        ctx.stdout(data)
        for error in errors:
            ctx.err(f"tar: {error}\n")
        if errors:
            ctx.err("tar: Exiting with failure status due to previous errors\n")
            return 2
        return 0

    def extract() -> Command:
        data = yield from read_all()
        if not data:
            ctx.err("tar: This does not look like a tar archive\n"
                    "tar: Exiting with failure status due to previous errors\n")
            return 2
        if mode == "t":
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as listing:
                    for name in listing.getnames():
                        ctx.out(name + "\n")
            except tarfile.TarError:
                ctx.err("tar: This does not look like a tar archive\n")
                return 2
            return 0
        errors = ctx.fs.untar(data, cwd, keep_mtime="m" not in "".join(args))
        if verbose:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as listing:
                for name in listing.getnames():
                    ctx.out(name + "\n")
        for error in errors:
            ctx.err(f"tar: {error}\n")
        if errors:
            ctx.err("tar: Exiting with failure status due to previous errors\n")
            return 2
        return 0

    return extract()


# -- the shell -------------------------------------------------------------------------


class _ShellExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@frozen
class _Simple:
    argv: tuple[str, ...]
    redirects: tuple[tuple[str, str], ...] = ()


_OPERATORS = (";", "&&", "||", "|", "\n")


def _tokenize(script: str) -> list[str]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = []
    for token in lexer:
        tokens.append(token)
    return tokens


def _parse_script(script: str) -> list[tuple[str, list[_Simple]]]:
    """
    A script as (joiner, pipeline) pairs: the joiner (``;``, ``&&``, ``||``) says when
    the pipeline runs, relative to the status of the one before.
    """
    # Newlines separate commands like ";"; shlex drops them, so split lines first.
    tokens: list[str] = []
    for line in script.splitlines() or [""]:
        if tokens and tokens[-1] not in (";", "&&", "||", "|"):
            tokens.append(";")
        tokens.extend(_tokenize(line))
    result: list[tuple[str, list[_Simple]]] = []
    joiner = ";"
    pipeline: list[_Simple] = []
    words: list[str] = []
    redirects: list[tuple[str, str]] = []
    index = 0

    def end_simple() -> None:
        nonlocal words, redirects
        if words or redirects:
            pipeline.append(_Simple(tuple(words), tuple(redirects)))
        words, redirects = [], []

    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token in (";", "&&", "||"):
            end_simple()
            if pipeline:
                result.append((joiner, pipeline))
            elif token != ";":
                raise ValueError(f"syntax error near unexpected token `{token}'")
            joiner, pipeline = token, []
        elif token == "|":
            end_simple()
            if not pipeline:
                raise ValueError("syntax error near unexpected token `|'")
        elif token in (">", ">>", "<", ">&", "<&"):
            if index >= len(tokens):
                raise ValueError("syntax error near unexpected token `newline'")
            target = tokens[index]
            index += 1
            fd = "1" if token.startswith(">") else "0"
            if words and words[-1] in ("0", "1", "2"):
                fd = words.pop()
            redirects.append((fd + token, target))
        elif token == "&":
            raise ValueError("background jobs are not supported")
        else:
            words.append(token)
    end_simple()
    if pipeline:
        result.append((joiner, pipeline))
    return result


def _expand(word: str, ctx: _Context) -> str:
    return word.replace("$?", str(ctx.last_status))


def _run_simple(ctx: _Context, simple: _Simple, stdin: bytes | None) -> Command:
    """
    One simple command inside the shell; ``stdin`` is piped input (``None``: the
    shell's own stdin, read by yielding).
    """
    argv = [_expand(w, ctx) for w in simple.argv]
    stdout, stderr = ctx.stdout, ctx.stderr
    files: list[tuple[str, bytearray, bool]] = []
    for op, target in simple.redirects:
        if op in ("1>&", "2>&"):
            chosen = {"1": ctx.stdout, "2": ctx.stderr}.get(target)
            if chosen is None:
                ctx.err("sh: 1: Syntax error: Bad fd number\n")
                return 2
            if op == "1>&":
                stdout = chosen
            else:
                stderr = chosen
        elif op in ("1>", "2>", "1>>", "2>>"):
            buffer = bytearray()
            files.append((target, buffer, op.endswith(">>")))
            if op.startswith("1"):
                stdout = buffer.extend
            else:
                stderr = buffer.extend
        elif op == "0<":
            try:
                stdin = ctx.fs.read(_clean(target, ctx.cwd))
            except FilesystemError as e:
                ctx.err(f"sh: 1: cannot open {target}: {e.strerror}\n")
                return 2
    inner = ctx.with_output(stdout, stderr)
    if not argv:
        status = 0
    elif argv[0] == "exit":
        raise _ShellExit(int(argv[1]) if len(argv) > 1 and argv[1].lstrip("-").isdigit()
                         else ctx.last_status)
    elif argv[0] == "cd":
        target = _clean(argv[1] if len(argv) > 1 else "/root", ctx.cwd)
        if not ctx.fs.is_dir(target):
            ctx.err(f"sh: 1: cd: can't cd to {argv[1]}\n")
            status = 2
        else:
            ctx.cwd = target
            status = 0
    else:
        try:
            command = ctx.container.command(argv[0])
        except CommandNotFound:
            ctx.err(f"sh: 1: {argv[0]}: not found\n")
            status = 127
        else:
            result = command(inner, argv[1:])
            if isinstance(result, int):
                status = result
            elif stdin is None:
                status = yield from result
            else:
                status = _drive(result, stdin)
    for target, buffer, append in files:
        try:
            ctx.fs.write(_clean(target, ctx.cwd), bytes(buffer), append=append)
        except FilesystemError as e:
            ctx.err(f"sh: 1: cannot create {target}: {e.strerror}\n")
            status = 2
    return status


def _drive(command: Command, stdin: bytes) -> int:
    """
    Run a command to its end with ``stdin`` as its whole input.
    """
    try:
        next(command)
        if stdin:
            command.send(stdin)
        while True:
            command.send(b"")
    except StopIteration as stop:
        return int(stop.value or 0)


def run_script(ctx: _Context, script: str) -> Command:
    """
    Run a shell script (see the module docstring for what it understands).
    """
    try:
        parsed = _parse_script(script)
    except ValueError as e:
        ctx.err(f"sh: 1: {e}\n")
        return 2
    status = 0
    try:
        for joiner, pipeline in parsed:
            if (joiner == "&&" and status != 0) or (joiner == "||" and status == 0):
                continue
            piped: bytes | None = None
            for index, simple in enumerate(pipeline):
                last = index == len(pipeline) - 1
                if last:
                    status = yield from _run_simple(ctx, simple, piped)
                else:
                    buffer = bytearray()
                    status = yield from _run_simple(ctx.with_output(buffer.extend), simple, piped)
                    piped = bytes(buffer)
            ctx.last_status = status
    except _ShellExit as e:
        return e.code & 0xFF
    return status


def _sh(ctx: _Context, args: list[str]) -> CommandResult:
    if args[:1] == ["-c"]:
        if len(args) < 2:
            ctx.err("sh: 0: -c requires an argument\n")
            return 2
        return run_script(ctx, args[1])
    if args and not args[0].startswith("-"):
        try:
            return run_script(ctx, ctx.fs.read(_clean(args[0], ctx.cwd)).decode("utf-8", "replace"))
        except FilesystemError:
            ctx.err(f"sh: 0: cannot open {args[0]}: No such file\n")
            return 2
    return _interactive(ctx)


def _interactive(ctx: _Context) -> Command:
    prompt = b"# " if ctx.tty else b""
    ctx.stdout(prompt)
    pending = b""
    status = 0
    while True:
        chunk = yield
        if not chunk:
            if pending.strip():
                try:
                    status = yield from _script_line(ctx, pending)
                except _ShellExit as e:
                    return e.code & 0xFF
            return status
        pending += chunk.replace(b"\r", b"\n")
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                status = yield from _script_line(ctx, line)
            except _ShellExit as e:
                return e.code & 0xFF
            ctx.stdout(prompt)


def _script_line(ctx: _Context, line: bytes) -> Command:
    try:
        parsed = _parse_script(line.decode("utf-8", "replace"))
    except ValueError as e:
        ctx.err(f"sh: 1: {e}\n")
        return 2
    status = ctx.last_status
    for joiner, pipeline in parsed:
        if (joiner == "&&" and status != 0) or (joiner == "||" and status == 0):
            continue
        piped: bytes | None = None
        for index, simple in enumerate(pipeline):
            if index == len(pipeline) - 1:
                # Commands run from an interactive shell do not read its stdin here.
                status = yield from _run_simple(ctx, simple, piped if piped is not None else b"")
            else:
                buffer = bytearray()
                status = yield from _run_simple(
                    ctx.with_output(buffer.extend), simple, piped if piped is not None else b""
                )
                piped = bytes(buffer)
        ctx.last_status = status
    return status


def _constant(code: int) -> Callable[[_Context, list[str]], int]:
    return lambda ctx, args: code


def _pwd(ctx: _Context, args: list[str]) -> int:
    ctx.out(ctx.cwd + "\n")
    return 0


def _hostname(ctx: _Context, args: list[str]) -> int:
    ctx.out(ctx.container.hostname + "\n")
    return 0


#: The built-in commands, by name (``/bin/NAME`` and ``/usr/bin/NAME`` work too).
COMMANDS: dict[str, Callable[[_Context, list[str]], CommandResult]] = {
    "cat": _cat,
    "echo": _echo,
    "true": _constant(0),
    "false": _constant(1),
    "ls": _ls,
    "test": _test,
    "[": _test,
    "mkdir": _mkdir,
    "rm": _rm,
    "tail": _tail,
    "tar": _tar,
    "sh": _sh,
    "bash": _sh,
    "pwd": _pwd,
    "hostname": _hostname,
}


# -- processes and containers -------------------------------------------------------------


class Process:
    """
    Drives one command: `feed_stdin` and `close_stdin` hand it input, ``on_exit``
    gets its `ExitStatus` once it ends.  Output goes where the command's context
    sends it, as it is produced.
    """

    def __init__(self, command: CommandResult, on_exit: Callable[[ExitStatus], Any], *,
                 stdin: bool = True) -> None:
        self._command = command
        self._on_exit = on_exit
        self._eof = not stdin
        self.status: ExitStatus | None = None
        self.sizes: list[tuple[int, int]] = []

    def start(self) -> None:
        """
        Run the command until it first needs input (or ends).
        """
        if isinstance(self._command, int):
            self._exit(ExitStatus(self._command))
            return
        self._advance(None)

    def feed_stdin(self, data: bytes) -> None:
        """
        Input for the command; ignored once it has ended or stdin was closed.
        """
        if data and self.status is None and not self._eof:
            self._advance(data)

    def close_stdin(self) -> None:
        """
        End of input.
        """
        if self.status is None and not self._eof:
            self._eof = True
            self._advance(b"")

    def resize(self, width: int, height: int) -> None:
        """
        The terminal changed size (recorded in ``sizes``).
        """
        self.sizes.append((width, height))

    def kill(self) -> None:
        """
        Stop the command (its client went away).
        """
        if self.status is None and not isinstance(self._command, int):
            self._command.close()
            self.status = ExitStatus(137)

    def _advance(self, value: bytes | None) -> None:
        assert not isinstance(self._command, int)
        try:
            self._command.send(value)  # type: ignore[arg-type]
            while self._eof:
                self._command.send(b"")
        except StopIteration as stop:
            self._exit(ExitStatus(int(stop.value or 0) & 0xFF))
        except _ShellExit as e:
            self._exit(ExitStatus(e.code & 0xFF))

    def _exit(self, status: ExitStatus) -> None:
        if self.status is None:
            self.status = status
            self._on_exit(status)


def _tty_output(write: Callable[[bytes], None]) -> Callable[[bytes], None]:
    def translate(data: bytes) -> None:
        write(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    return translate


@define(eq=False)
class Container:
    """
    One fake container: its name, its pod's filesystem and hostname, the banner its
    main process shows to ``kubectl attach``, and the commands it can run.
    """

    name: str
    filesystem: PodFilesystem
    hostname: str = ""
    attach_banner: bytes = b""
    commands: dict[str, Callable[[_Context, list[str]], CommandResult]] = field(
        factory=lambda: dict(COMMANDS)
    )

    def command(self, name: str) -> Callable[[_Context, list[str]], CommandResult]:
        """
        The built-in for ``name`` (``/bin/cat`` is ``cat``); `CommandNotFound` when
        there is none.
        """
        base = name
        for prefix in ("/usr/local/bin/", "/usr/bin/", "/bin/", "/usr/sbin/", "/sbin/"):
            if name.startswith(prefix):
                base = name[len(prefix):]
        if base not in self.commands or ("/" in name and base == name):
            raise CommandNotFound(name)
        return self.commands[base]

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdout: Callable[[bytes], None],
        stderr: Callable[[bytes], None],
        on_exit: Callable[[ExitStatus], Any],
        stdin: bool = True,
        tty: bool = False,
    ) -> Process:
        """
        A `Process` running ``argv`` (call `Process.start`); raises `CommandNotFound`
        when ``argv[0]`` is not a built-in.  With ``tty`` stderr joins stdout and
        newlines go out as CR LF.
        """
        if not argv:
            raise CommandNotFound("")
        command = self.command(argv[0])
        if tty:
            stdout = _tty_output(stdout)
            stderr = stdout
        ctx = _Context(self, stdout, stderr, tty=tty)
        return Process(command(ctx, list(argv[1:])), on_exit, stdin=stdin)

    def attach(
        self,
        *,
        stdout: Callable[[bytes], None],
        on_exit: Callable[[ExitStatus], Any],
        stdin: bool = True,
        tty: bool = False,
    ) -> Process:
        """
        A `Process` standing for an attachment to the main process: the banner, then
        stdin echoed to stdout until stdin closes.
        """
        if tty:
            stdout = _tty_output(stdout)

        def main() -> Command:
            if self.attach_banner:
                stdout(self.attach_banner)
            while True:
                chunk = yield
                if not chunk:
                    return 0
                stdout(chunk)

        return Process(main(), on_exit, stdin=stdin)


def runtime_error(argv: Iterable[str]) -> str:
    """
    The message containerd and runc give when the executable does not exist.
    """
    name = next(iter(argv), "")
    return (
        "OCI runtime exec failed: exec failed: unable to start container process: exec:"
        f' "{name}": executable file not found in $PATH: unknown'
    )


def run(container: Container, argv: Sequence[str], stdin: bytes = b"") -> tuple[bytes, bytes, ExitStatus]:
    """
    Run a command to completion with the given input: (stdout, stderr, status).
    A convenience for tests and for seeding a pod's state.
    """
    out, err = bytearray(), bytearray()
    statuses: list[ExitStatus] = []
    try:
        process = container.exec(argv, stdout=out.extend, stderr=err.extend,
                                 on_exit=statuses.append)
    except CommandNotFound:
        return b"", b"", ExitStatus(126, runtime_error(argv))
    process.start()
    if stdin:
        process.feed_stdin(stdin)
    process.close_stdin()
    return bytes(out), bytes(err), statuses[0]

