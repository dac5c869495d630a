"""
Tests for L{banyan_kproxy.testing.containers}: the in-memory pod filesystem, its tar
archives, and the built-in commands ``kubectl exec``, ``cp`` and ``attach`` reach.
"""

from __future__ import annotations

import io
import os
import tarfile

from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.testing.containers import (
    CommandNotFound,
    Container,
    ExitStatus,
    FilesystemError,
    PodFilesystem,
    run,
    runtime_error,
)


def make_tar(entries: dict[str, bytes | None]) -> bytes:
    """
    A tar archive (as Go's archive/tar would write for kubectl cp): files, and
    directories for ``None``.
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o640
                info.mtime = 1000
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


class FilesystemTests(SynchronousTestCase):
    """
    L{PodFilesystem}.
    """

    def test_initial(self) -> None:
        """
        A new filesystem has /, /tmp, /root, /etc with the hostname, and the seeded
        files with their parents.
        """
        fs = PodFilesystem({"/srv/www/index.html": "hi", "/etc/motd": b"\x00\x01"}, hostname="web-1")
        self.assertEqual(fs.listdir("/"), ["etc", "root", "srv", "tmp"])
        self.assertEqual(fs.read("/etc/hostname"), b"web-1\n")
        self.assertEqual(fs.read("/srv/www/index.html"), b"hi")
        self.assertTrue(fs.is_dir("/srv/www"))
        self.assertEqual(fs.files(), {"/etc/hostname": b"web-1\n", "/etc/motd": b"\x00\x01",
                                      "/srv/www/index.html": b"hi"})

    def test_errors(self) -> None:
        """
        Reading a missing file or a directory, and making a directory under a file,
        fail with the libc messages.
        """
        fs = PodFilesystem({"/a": "x"})
        self.assertEqual(self.assertRaises(FilesystemError, fs.read, "/nope").strerror,
                         "No such file or directory")
        self.assertEqual(self.assertRaises(FilesystemError, fs.read, "/tmp").strerror, "Is a directory")
        self.assertEqual(self.assertRaises(FilesystemError, fs.mkdir, "/a/b").strerror, "Not a directory")
        self.assertEqual(self.assertRaises(FilesystemError, fs.mkdir, "/x/y").strerror,
                         "No such file or directory")
        self.assertEqual(self.assertRaises(FilesystemError, fs.remove, "/").strerror,
                         "Device or resource busy")

    def test_paths_and_symlinks(self) -> None:
        """
        Paths are normalised; symlinks are followed for reads and writes.
        """
        fs = PodFilesystem()
        fs.mkdir("/data/logs", parents=True)
        fs.symlink("/data", "/link")
        fs.write("/link/logs/../x.txt", "via link")
        self.assertEqual(fs.read("/data/x.txt"), b"via link")
        self.assertEqual(fs.read("//data/./x.txt"), b"via link")
        self.assertTrue(fs.is_dir("/link/logs"))
        fs.remove("/link")
        self.assertTrue(fs.is_dir("/data"))

    def test_tar_round_trip(self) -> None:
        """
        A directory archived and extracted elsewhere comes back byte for byte, with
        names as GNU tar writes them (no leading slash).
        """
        payload = os.urandom(300_000)
        fs = PodFilesystem({"/srv/a.bin": payload, "/srv/sub/b.txt": "b"})
        fs.mkdir("/srv/empty")
        data, errors = fs.tar(["/srv"])
        self.assertEqual(errors, [])
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            self.assertEqual(sorted(archive.getnames()),
                             ["srv", "srv/a.bin", "srv/empty", "srv/sub", "srv/sub/b.txt"])
        other = PodFilesystem()
        self.assertEqual(other.untar(data, "/tmp"), [])
        self.assertEqual(other.read("/tmp/srv/a.bin"), payload)
        self.assertTrue(other.is_dir("/tmp/srv/empty"))

    def test_untar_like_gnu_tar(self) -> None:
        """
        Leading slashes and ``..`` are dropped, modes kept, the target directory must
        exist, and garbage is refused.
        """
        fs = PodFilesystem()
        errors = fs.untar(make_tar({"/abs.txt": b"1", "../../up.txt": b"2", "d": None}), "/tmp")
        self.assertEqual(errors, [])
        self.assertEqual(fs.read("/tmp/abs.txt"), b"1")
        self.assertEqual(fs.read("/tmp/up.txt"), b"2")
        self.assertEqual(fs.mode("/tmp/abs.txt"), 0o640)
        self.assertEqual(fs.untar(make_tar({"x": b""}), "/nope"),
                         ["/nope: Cannot open: No such file or directory"])
        self.assertEqual(fs.untar(b"not a tar" * 100, "/tmp"), ["This does not look like a tar archive"])

    def test_tar_missing(self) -> None:
        """
        A missing path is reported and the others archived.
        """
        data, errors = PodFilesystem({"/a": "x"}).tar(["/a", "/missing"])
        self.assertEqual(errors, ["/missing: Cannot stat: No such file or directory"])
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            self.assertEqual(archive.getnames(), ["a"])


class CommandTests(SynchronousTestCase):
    """
    The built-in commands, run to completion.
    """

    def setUp(self) -> None:
        self.fs = PodFilesystem({"/srv/a.txt": "alpha\n", "/srv/b.txt": "beta\n"}, hostname="web-1")
        self.container = Container("app", self.fs, hostname="web-1")

    def call(self, *argv: str, stdin: bytes = b"") -> tuple[bytes, bytes, ExitStatus]:
        return run(self.container, list(argv), stdin)

    def test_cat(self) -> None:
        """
        cat copies binary stdin exactly, and files; a missing file is an error.
        """
        payload = bytes(range(256)) * 1000
        self.assertEqual(self.call("cat", stdin=payload), (payload, b"", ExitStatus(0)))
        self.assertEqual(self.call("/bin/cat", "/srv/a.txt", "/srv/b.txt"),
                         (b"alpha\nbeta\n", b"", ExitStatus(0)))
        self.assertEqual(self.call("cat", "/nope"),
                         (b"", b"cat: /nope: No such file or directory\n", ExitStatus(1)))

    def test_simple(self) -> None:
        """
        echo, true, false, pwd and hostname.
        """
        self.assertEqual(self.call("echo", "a", "b c"), (b"a b c\n", b"", ExitStatus(0)))
        self.assertEqual(self.call("echo", "-n", "x")[0], b"x")
        self.assertEqual(self.call("true")[2], ExitStatus(0))
        self.assertEqual(self.call("false")[2], ExitStatus(1))
        self.assertEqual(self.call("pwd")[0], b"/\n")
        self.assertEqual(self.call("hostname")[0], b"web-1\n")

    def test_ls_test_mkdir_rm(self) -> None:
        """
        ls lists sorted names; test checks paths; mkdir and rm change the tree.
        """
        self.assertEqual(self.call("ls", "/srv"), (b"a.txt\nb.txt\n", b"", ExitStatus(0)))
        self.assertEqual(self.call("ls", "/nope"),
                         (b"", b"ls: cannot access '/nope': No such file or directory\n",
                          ExitStatus(2)))
        self.assertIn(b"-rw-r--r-- 1 root root        6", self.call("ls", "-l", "/srv")[0])
        self.assertEqual([self.call("test", flag, path)[2].code for flag, path in
                          (("-d", "/srv"), ("-d", "/srv/a.txt"), ("-f", "/srv/a.txt"),
                           ("-e", "/nope"))], [0, 1, 0, 1])
        self.assertEqual(self.call("[", "-d", "/tmp", "]")[2].code, 0)
        self.assertEqual(self.call("mkdir", "-p", "/x/y/z")[2].code, 0)
        self.assertTrue(self.fs.is_dir("/x/y/z"))
        self.assertEqual(self.call("rm", "/x")[1], b"rm: cannot remove '/x': Is a directory\n")
        self.assertEqual(self.call("rm", "-rf", "/x")[2].code, 0)
        self.assertFalse(self.fs.exists("/x"))

    def test_shell(self) -> None:
        """
        sh -c runs lists with ;, && and ||, pipes, redirections, exit and $?.
        """
        self.assertEqual(self.call("sh", "-c", "exit 3"), (b"", b"", ExitStatus(3)))
        self.assertEqual(self.call("sh", "-c", "echo x >&2; exit 3"), (b"", b"x\n", ExitStatus(3)))
        self.assertEqual(self.call("sh", "-c", "echo out; echo err 1>&2; exit 0"),
                         (b"out\n", b"err\n", ExitStatus(0)))
        self.assertEqual(self.call("sh", "-c", "false && echo no || echo yes; echo $?")[0], b"yes\n0\n")
        self.assertEqual(self.call("sh", "-c", "cat /srv/a.txt | cat")[0], b"alpha\n")
        self.assertEqual(self.call("sh", "-c", "echo one > /tmp/f; echo two >> /tmp/f; cat < /tmp/f")[0],
                         b"one\ntwo\n")
        self.assertEqual(self.call("sh", "-c", "cat", stdin=b"piped")[0], b"piped")
        self.assertEqual(self.call("sh", "-c", "nosuch arg"),
                         (b"", b"sh: 1: nosuch: not found\n", ExitStatus(127)))
        self.assertEqual(self.call("bash", "-c", "exit 300")[2], ExitStatus(44))
        self.assertEqual(self.call("sh", "-c", "echo 'a;b' \"c d\"")[0], b"a;b c d\n")

    def test_interactive_shell(self) -> None:
        """
        sh without -c runs the lines it reads from stdin.
        """
        self.assertEqual(self.call("sh", stdin=b"echo hi\nexit 4\necho never\n"),
                         (b"hi\n", b"", ExitStatus(4)))

    def test_kubectl_cp_to_pod(self) -> None:
        """
        The commands kubectl cp runs to copy into a pod: ``test -d`` on the target,
        then ``tar -xmf - -C DIR`` (or with --no-same-permissions --no-same-owner)
        reading the archive from stdin.
        """
        self.assertEqual(self.call("test", "-d", "/tmp/dest.bin")[2].code, 1)
        payload = os.urandom(100_000)
        archive = make_tar({"dest.bin": payload})
        self.assertEqual(self.call("tar", "-xmf", "-", "-C", "/tmp", stdin=archive),
                         (b"", b"", ExitStatus(0)))
        self.assertEqual(self.fs.read("/tmp/dest.bin"), payload)
        self.assertNotEqual(self.fs._entries["/tmp/dest.bin"].mtime, 1000)
        self.assertEqual(self.call("tar", "--no-same-permissions", "--no-same-owner", "-xmf", "-",
                                  "-C", "/srv", stdin=make_tar({"d/x": b"X"}))[2], ExitStatus(0))
        self.assertEqual(self.fs.read("/srv/d/x"), b"X")
        self.assertEqual(self.call("tar", "xmf", "-", stdin=make_tar({"top": b"T"}))[2], ExitStatus(0))
        self.assertEqual(self.fs.read("/top"), b"T")

    def test_kubectl_cp_from_pod(self) -> None:
        """
        ``tar cf - PATH`` writes the archive to stdout and GNU tar's warning about the
        leading slash to stderr; the --retries form pipes it through ``tail -c+N``.
        """
        out, err, status = self.call("tar", "cf", "-", "/srv/a.txt")
        self.assertEqual((err, status), (b"tar: Removing leading `/' from member names\n",
                                         ExitStatus(0)))
        with tarfile.open(fileobj=io.BytesIO(out)) as archive:
            member = archive.getmember("srv/a.txt")
            self.assertEqual(archive.extractfile(member).read(), b"alpha\n")  # type: ignore[union-attr]
        tailed, _, status = self.call("sh", "-c", "tar cf - /srv/a.txt | tail -c+101")
        self.assertEqual((tailed, status), (out[100:], ExitStatus(0)))
        self.assertEqual(self.call("tail", "-c", "3", stdin=b"abcdef")[0], b"def")

    def test_tar_errors(self) -> None:
        """
        tar reports what GNU tar reports: missing -C directory, empty input, bad
        options, nothing to archive.
        """
        self.assertEqual(self.call("tar", "-xmf", "-", "-C", "/nope", stdin=b"x"),
                         (b"", b"tar: /nope: Cannot open: No such file or directory\n"
                               b"tar: Error is not recoverable: exiting now\n", ExitStatus(2)))
        self.assertEqual(self.call("tar", "xf", "-")[1],
                         b"tar: This does not look like a tar archive\n"
                         b"tar: Exiting with failure status due to previous errors\n")
        self.assertEqual(self.call("tar", "-qf", "-")[1].splitlines()[0], b"tar: invalid option -- 'q'")
        self.assertEqual(self.call("tar", "cf", "-")[2], ExitStatus(2))
        out, err, status = self.call("tar", "cf", "-", "/srv/missing")
        self.assertEqual(status, ExitStatus(2))
        self.assertIn(b"tar: /srv/missing: Cannot stat: No such file or directory\n", err)

    def test_unknown(self) -> None:
        """
        An unknown executable is refused by the runtime, with containerd's message.
        """
        self.assertRaises(CommandNotFound, self.container.command, "nosuch")
        self.assertRaises(CommandNotFound, self.container.command, "/opt/cat")
        self.assertEqual(self.call("nosuch"), (b"", b"", ExitStatus(126, runtime_error(["nosuch"]))))
        self.assertEqual(
            runtime_error(["nosuch"]),
            'OCI runtime exec failed: exec failed: unable to start container process: exec:'
            ' "nosuch": executable file not found in $PATH: unknown',
        )


class ProcessTests(SynchronousTestCase):
    """
    L{Process} streams: output appears as input arrives.
    """

    def setUp(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.statuses: list[ExitStatus] = []
        self.container = Container("app", PodFilesystem(), attach_banner=b"welcome\n")

    def test_cat_streams(self) -> None:
        """
        Each chunk given to cat comes out before the next is given; closing stdin
        ends it with status 0.
        """
        process = self.container.exec(["cat"], stdout=self.out.append, stderr=self.err.append,
                                      on_exit=self.statuses.append)
        process.start()
        for index in range(100):
            chunk = os.urandom(1000)
            process.feed_stdin(chunk)
            self.assertEqual(self.out[-1], chunk)
            self.assertEqual(len(self.out), index + 1)
        self.assertEqual(self.statuses, [])
        process.close_stdin()
        self.assertEqual(self.statuses, [ExitStatus(0)])
        process.feed_stdin(b"late")
        self.assertEqual(len(self.out), 100)

    def test_without_stdin(self) -> None:
        """
        Without stdin a reader sees end of input at once.
        """
        process = self.container.exec(["cat"], stdout=self.out.append, stderr=self.err.append,
                                      on_exit=self.statuses.append, stdin=False)
        process.start()
        self.assertEqual((self.out, self.statuses), ([], [ExitStatus(0)]))

    def test_tty(self) -> None:
        """
        With a TTY stderr joins stdout and newlines go out as CR LF.
        """
        process = self.container.exec(["sh", "-c", "echo a; echo b >&2"], stdout=self.out.append,
                                      stderr=self.err.append, on_exit=self.statuses.append,
                                      stdin=False, tty=True)
        process.start()
        self.assertEqual((b"".join(self.out), self.err), (b"a\r\nb\r\n", []))
        process.resize(80, 24)
        self.assertEqual(process.sizes, [(80, 24)])

    def test_interactive_prompt(self) -> None:
        """
        An interactive shell on a TTY prompts before each line.
        """
        process = self.container.exec(["sh"], stdout=self.out.append, stderr=self.err.append,
                                      on_exit=self.statuses.append, tty=True)
        process.start()
        process.feed_stdin(b"echo hi\n")
        self.assertEqual(b"".join(self.out), b"# hi\r\n# ")
        process.feed_stdin(b"exit\n")
        self.assertEqual(self.statuses, [ExitStatus(0)])

    def test_attach(self) -> None:
        """
        Attaching shows the banner, echoes stdin, and ends when stdin closes; without
        stdin it ends after the banner.
        """
        process = self.container.attach(stdout=self.out.append, on_exit=self.statuses.append)
        process.start()
        process.feed_stdin(b"ping\n")
        self.assertEqual(self.out, [b"welcome\n", b"ping\n"])
        process.close_stdin()
        self.assertEqual(self.statuses, [ExitStatus(0)])
        other: list[bytes] = []
        done: list[ExitStatus] = []
        self.container.attach(stdout=other.append, on_exit=done.append, stdin=False).start()
        self.assertEqual((other, done), ([b"welcome\n"], [ExitStatus(0)]))

    def test_kill(self) -> None:
        """
        Killing a running process ends it without reporting an exit.
        """
        process = self.container.exec(["cat"], stdout=self.out.append, stderr=self.err.append,
                                      on_exit=self.statuses.append)
        process.start()
        process.kill()
        process.feed_stdin(b"x")
        self.assertEqual((self.out, self.statuses, process.status), ([], [], ExitStatus(137)))
