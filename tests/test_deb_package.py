"""
The Debian package (``make deb``): its systemd units, and the installed package.

`UnitFileTests` checks ``debian/*.service`` with ``systemd-analyze verify`` whenever
that tool is there.  The other classes run only from ``make deb-test``, which sets
``BANYAN_KPROXY_DEB_TEST``: ``installed`` after ``apt-get install ./banyan-kproxy_*.deb``
(contents, user, directories, plugin cache, units, and the installed daemon run by
Debian's ``twistd3`` as the ``banyan-kproxy`` user in front of the Kubernetes API
stand-in, driven with kubectl), then ``purged`` after ``apt-get purge banyan-kproxy``
(nothing left behind).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from banyan_kproxy.testing.stack import ADMIN_ROLE, READER_ROLE, LoopbackStack, repository_file

from .test_kubectl import FORBIDDEN_SERVICES

USER = "banyan-kproxy"
TWISTD3 = "/usr/bin/twistd3"
SYSTEM_UNITS = "/lib/systemd/system"
USER_UNITS = "/usr/lib/systemd/user"
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
PLUGIN_CACHE = os.path.join(DIST_PACKAGES, "twisted", "plugins", "dropin.cache")
STATE_DIRS = ["/var/lib/banyan-kproxy", "/var/lib/banyan-kproxy/audit", "/var/log/banyan-kproxy"]
CONFFILES = [
    "/etc/banyan-kproxy/kproxy.ini",
    "/etc/banyan-kproxy/kubernetes-rbac.yaml",
    "/etc/banyan-kproxy/audit-policy.yaml",
    "/etc/banyan-kproxy/audit-policy-example.yaml",
]
# Files the package must hold (besides the whole banyan_kproxy tree).
PACKAGE_FILES = [
    "/usr/bin/banyan-kproxy",
    f"{DIST_PACKAGES}/banyan_kproxy/__init__.py",
    f"{DIST_PACKAGES}/banyan_kproxy/proxy/service.py",
    f"{DIST_PACKAGES}/banyan_kproxy/reload.py",
    f"{DIST_PACKAGES}/banyan_kproxy/testing/seed-rbac.yaml",
    f"{DIST_PACKAGES}/twisted/plugins/banyan_kproxy_plugin.py",
    f"{SYSTEM_UNITS}/banyan-kproxy.service",
    f"{SYSTEM_UNITS}/banyan-kproxy@.service",
    f"{USER_UNITS}/banyan-kproxy-connect.service",
    "/usr/share/doc/banyan-kproxy/copyright",
    *CONFFILES,
]


def deb_test(stage: str) -> None:
    """
    Skip unless ``make deb-test`` runs this stage.
    """
    if os.environ.get("BANYAN_KPROXY_DEB_TEST") != stage:
        raise SkipTest(f"only run by `make deb-test` (BANYAN_KPROXY_DEB_TEST={stage})")


async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """
    Run a command to completion: its output (stdout then stderr) and exit status.
    """
    out, err, code = await getProcessOutputAndValue(
        argv[0], argv[1:], env=env if env is not None else dict(os.environ), reactor=reactor
    )
    return (out + err).decode("utf-8", "replace"), code


async def verify_units(case: TestCase, system_units: list[str], user_units: list[str]) -> None:
    """
    ``systemd-analyze verify`` accepts every unit without a word (unknown keys and
    bad values are only warnings on standard error, with exit status 0).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise SkipTest("systemd-analyze is not installed")
    runtime = tempfile.mkdtemp()
    case.addCleanup(shutil.rmtree, runtime)
    for user, units in ((False, system_units), (True, user_units)):
        for unit in units:
            argv = [analyze, *(["--user"] if user else []), "verify", unit]
            # A user manager needs a runtime directory, even offline.
            output, code = await run(*argv, env={**os.environ, "XDG_RUNTIME_DIR": runtime})
            case.assertEqual((output, code), ("", 0), " ".join(argv))


class UnitFileTests(TestCase):
    """
    The unit files in ``debian/`` as written.
    """

    timeout = 60

    def test_verify(self) -> Deferred[None]:
        """
        The service, the template (as an instance) and the user unit verify cleanly.
        """
        debian = repository_file("debian")
        if debian is None:
            raise SkipTest("not running from a source checkout")
        if not os.access(TWISTD3, os.X_OK):
            raise SkipTest(f"{TWISTD3} (python3-twisted) is not installed: the units run it")

        async def check() -> None:
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            for source, name in [
                ("banyan-kproxy.service", "banyan-kproxy.service"),
                ("banyan-kproxy@.service", "banyan-kproxy@.service"),
                ("banyan-kproxy.banyan-kproxy-connect.user.service", "banyan-kproxy-connect.service"),
            ]:
                shutil.copy(os.path.join(debian, source), os.path.join(directory, name))
            path = os.path.join
            await verify_units(
                self,
                [path(directory, "banyan-kproxy.service"), path(directory, "banyan-kproxy@proxy1.service")],
                [path(directory, "banyan-kproxy-connect.service")],
            )

        return Deferred.fromCoroutine(check())


class InstalledPackageTests(TestCase):
    """
    After ``apt-get install ./banyan-kproxy_*_all.deb``.
    """

    timeout = 180

    def setUp(self) -> None:
        deb_test("installed")

    def test_contents(self) -> Deferred[None]:
        """
        ``dpkg -L`` lists the code, the plugin, the units, the docs and the sample
        configuration, every file in /etc/banyan-kproxy is a conffile, and no test
        suite, byte code or plugin cache is shipped.
        """

        async def check() -> None:
            output, code = await run("dpkg", "-L", "banyan-kproxy")
            self.assertEqual(code, 0, output)
            files = output.splitlines()
            for path in PACKAGE_FILES:
                self.assertIn(path, files)
            for bad in ("dropin.cache", "__pycache__", ".pyc", "/tests/", "_trial_temp"):
                self.assertEqual([f for f in files if bad in f], [])
            output, code = await run("dpkg-query", "-W", "-f=${Conffiles}\n", "banyan-kproxy")
            conffiles = {line.split()[0] for line in output.splitlines() if line.strip()}
            in_etc = {f for f in files if f.startswith("/etc/banyan-kproxy/") and os.path.isfile(f)}
            self.assertEqual(conffiles, in_etc)
            self.assertTrue(set(CONFFILES) <= conffiles)

        return Deferred.fromCoroutine(check())

    def test_user_and_directories(self) -> None:
        """
        The system user exists with no login shell, and owns the state (audit
        spool) and log directories, which others cannot read.
        """
        user = pwd.getpwnam(USER)
        self.assertLess(user.pw_uid, 1000)
        self.assertEqual(grp.getgrgid(user.pw_gid).gr_name, USER)
        self.assertEqual(user.pw_dir, "/var/lib/banyan-kproxy")
        self.assertIn(user.pw_shell, ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"))
        for directory in STATE_DIRS:
            st = os.stat(directory)
            self.assertEqual(
                (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (user.pw_uid, user.pw_gid, 0o750), directory
            )

    def test_plugin_cache(self) -> Deferred[None]:
        """
        The trigger rebuilt Twisted's plugin cache with the plugin in it, and
        Debian's twistd3 offers the ``banyan-kproxy`` command.
        """
        with open(PLUGIN_CACHE, "rb") as f:
            self.assertIn(b"banyan_kproxy_plugin", f.read())

        async def check() -> None:
            output, code = await run(TWISTD3, "--help", env={"PATH": "/usr/bin:/bin"})
            self.assertEqual(code, 0, output)
            self.assertIn("banyan-kproxy", output)

        return Deferred.fromCoroutine(check())

    def test_units(self) -> Deferred[None]:
        """
        The installed units verify cleanly (the template as an instance).
        """
        return Deferred.fromCoroutine(
            verify_units(
                self,
                [f"{SYSTEM_UNITS}/banyan-kproxy.service", f"{SYSTEM_UNITS}/banyan-kproxy@proxy1.service"],
                [f"{USER_UNITS}/banyan-kproxy-connect.service"],
            )
        )

    def test_sample_configuration_exit_2(self) -> Deferred[None]:
        """
        The shipped kproxy.ini names files that do not exist yet: the daemon stops
        with one readable line and exit status 2, which the unit does not restart
        (RestartPreventExitStatus=2).
        """

        async def check() -> None:
            output, code = await run(
                "runuser", "-u", USER, "--", TWISTD3, "--nodaemon", "--pidfile=", "banyan-kproxy",
                "--config", "/etc/banyan-kproxy/kproxy.ini", env={"PATH": "/usr/bin:/bin"},
            )
            self.assertEqual(code, 2, output)
            self.assertIn("banyan-kproxy: configuration error:\n", output)
            self.assertIn(
                "/etc/banyan-kproxy/kproxy.ini: [proxy] tls_cert_file: file /etc/banyan-kproxy/tls.crt "
                "does not exist", output
            )
            with open(f"{SYSTEM_UNITS}/banyan-kproxy.service", encoding="utf-8") as f:
                self.assertIn("RestartPreventExitStatus=2\n", f.read())

        return Deferred.fromCoroutine(check())

    def test_round_trip(self) -> Deferred[None]:
        """
        The installed daemon, started by Debian's twistd3 as the banyan-kproxy user
        (as the unit does, without systemd), serves kubectl in front of the stand-in:
        a reader lists pods and is refused services with the apiserver's exact
        message; it writes audit events to /var/log/banyan-kproxy, survives SIGHUP
        (systemctl reload) and stops on SIGTERM to its PID.
        """
        kubectl = shutil.which("kubectl")
        self.assertIsNotNone(kubectl, "kubectl is not on PATH")
        assert kubectl is not None

        async def check() -> None:
            # The service user must reach the stack's files: a directory it can enter.
            directory = tempfile.mkdtemp(prefix="banyan-kproxy-deb-")
            os.chmod(directory, 0o711)
            self.addCleanup(shutil.rmtree, directory, True)
            audit_log = "/var/log/banyan-kproxy/deb-test-audit.log"
            self.addCleanup(lambda: os.path.exists(audit_log) and os.remove(audit_log))
            stack = LoopbackStack(
                reactor,
                os.path.join(directory, "stack"),
                twistd_command=[TWISTD3],
                daemon_from_checkout=False,
                run_as=USER,
                extra_ini=f"\n[audit]\nlog_file = {audit_log}\nbatch_max_wait = 50ms\n",
            )
            self.addCleanup(lambda: Deferred.fromCoroutine(stack.stop()))
            await stack.start()
            pid = stack.daemon_pid
            assert pid is not None
            self.assertIn("(/usr/bin/python3 ", stack.daemon_output)
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            self.assertEqual(set(uids), {str(pwd.getpwnam(USER).pw_uid)})
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                self.assertIn(TWISTD3.encode(), f.read().split(b"\0"))

            stack.standin.add_pod("web-1")
            kubeconfig = stack.write_kubeconfig(
                "kubeconfig",
                {
                    "reader": stack.token("myuser@example.com", [READER_ROLE]),
                    "admin": stack.token("admin@example.com", [ADMIN_ROLE]),
                },
            )
            home = os.path.join(directory, "home")
            os.makedirs(home)
            env = {"HOME": home, "KUBECONFIG": kubeconfig, "PATH": os.environ.get("PATH", "")}

            async def kubectl_run(*args: str) -> tuple[str, int]:
                output, code = await run(kubectl, "--request-timeout=20s", *args, env=env)
                return output.strip(), code

            output, code = await kubectl_run("--context", "reader", "get", "pods")
            self.assertEqual(code, 0, output)
            self.assertTrue(output.startswith("NAME"), output)
            self.assertIn("web-1", output)
            self.assertEqual(await kubectl_run("--context", "reader", "get", "services"), (FORBIDDEN_SERVICES, 1))
            output, code = await kubectl_run("--context", "admin", "get", "services")
            self.assertEqual(code, 0, output)

            for _ in range(100):
                if os.path.exists(audit_log) and b"banyan:myuser@example.com" in open(audit_log, "rb").read():
                    break
                await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(os.stat(audit_log).st_uid, pwd.getpwnam(USER).pw_uid)
            with open(audit_log, "rb") as f:
                self.assertIn(b"banyan:myuser@example.com", f.read())

            os.kill(pid, signal.SIGHUP)
            for _ in range(100):
                if "SIGHUP: reloading" in stack.daemon_output:
                    break
                await deferLater(reactor, 0.05, lambda: None)
            self.assertIn("Reloaded TLS certificate", stack.daemon_output)
            self.assertEqual((await kubectl_run("--context", "reader", "get", "pods"))[1], 0)

            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if "Server Shut Down." in stack.daemon_output:
                    break
                await deferLater(reactor, 0.05, lambda: None)
            self.assertIn("Server Shut Down.", stack.daemon_output)
            await stack.stop()
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)

        return Deferred.fromCoroutine(check())


class PurgedPackageTests(TestCase):
    """
    After ``apt-get purge banyan-kproxy``.
    """

    timeout = 120

    def setUp(self) -> None:
        deb_test("purged")

    def test_nothing_left(self) -> Deferred[None]:
        """
        No package files, configuration, state, logs, units, enablement state or
        plugin cache entry remain.
        """
        leftovers = [
            path
            for path in [
                "/etc/banyan-kproxy",
                *STATE_DIRS,
                "/usr/bin/banyan-kproxy",
                f"{DIST_PACKAGES}/banyan_kproxy",
                f"{DIST_PACKAGES}/twisted/plugins/banyan_kproxy_plugin.py",
                f"{SYSTEM_UNITS}/banyan-kproxy.service",
                f"{SYSTEM_UNITS}/banyan-kproxy@.service",
                f"{USER_UNITS}/banyan-kproxy-connect.service",
                "/usr/share/doc/banyan-kproxy",
                "/usr/share/banyan-kproxy",
            ]
            if os.path.lexists(path)
        ]
        self.assertEqual(leftovers, [])
        plugins = os.path.join(DIST_PACKAGES, "twisted", "plugins")
        self.assertEqual([n for n in os.listdir(plugins) if "banyan" in n], [])
        pycache = os.path.join(plugins, "__pycache__")
        if os.path.isdir(pycache):
            self.assertEqual([n for n in os.listdir(pycache) if "banyan" in n], [])
        if os.path.exists(PLUGIN_CACHE):
            with open(PLUGIN_CACHE, "rb") as f:
                self.assertNotIn(b"banyan_kproxy", f.read())
        for state in ("/var/lib/systemd/deb-systemd-helper-enabled", "/var/lib/systemd/deb-systemd-user-helper-enabled",
                      "/etc/systemd/system", "/etc/systemd/user"):
            found = [os.path.join(d, n) for d, _, names in os.walk(state) for n in names if "banyan" in n]
            self.assertEqual(found, [])

        async def check() -> None:
            output, code = await run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "banyan-kproxy")
            # Unknown to dpkg, or known as "not installed" with no config files left.
            self.assertTrue(code != 0 or output.strip() in ("un", "pn"), output)

        return Deferred.fromCoroutine(check())

    def test_user_kept(self) -> Deferred[None]:
        """
        The banyan-kproxy user and group stay (Debian practice, see debian/postrm)
        but own nothing in /etc or /var any more.
        """
        pwd.getpwnam(USER)
        grp.getgrnam(USER)

        async def check() -> None:
            output, code = await run("find", "/etc", "/var", "-xdev", "-user", USER)
            self.assertEqual(output, "")

        return Deferred.fromCoroutine(check())
