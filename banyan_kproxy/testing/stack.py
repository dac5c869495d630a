"""
A whole proxy deployment on loopback: throwaway certificates, a development OIDC
issuer and (unless a real cluster is given) the Kubernetes API stand-in, running in
this process; the real daemon started as ``twistd -n banyan-kproxy`` in a child
process; and a kubeconfig for kubectl.

The integration tests and ``banyan-kproxy demo`` both use it, so the demo shows
exactly what the tests check.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import signal
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

import attr
import yaml
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.server import Site

from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.issuer import OIDCIssuer
from banyan_kproxy.testing.kubeapi import KubeAPIStandIn, UserInfo, listen
from banyan_kproxy.testing.loopback import serve
from banyan_kproxy.tls import ServerTLS

#: The proxy's own identity at the stand-in (as in etc/banyan-kproxy/kubernetes-rbac.yaml).
PROXY_SERVICE_ACCOUNT = UserInfo(
    "system:serviceaccount:banyan-kproxy:banyan-kproxy",
    ("system:serviceaccounts", "system:serviceaccounts:banyan-kproxy", "system:authenticated"),
)

#: OIDC settings of the seed (Step 2.11).
CLIENT_ID = "external-services"
READER_ROLE = "any-employee-personal-device"
ADMIN_ROLE = "all-admins-corporate-device"

_LISTENING = re.compile(rb"(the proxy|health and metrics) on \S+ listening on ([0-9.]+):(\d+)")


def repository_file(*parts: str) -> str | None:
    """
    A file of this source checkout (``etc/...``), when running from one.
    """
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, *parts)
    return path if os.path.exists(path) else None


def twistd_command() -> list[str]:
    """
    The ``twistd`` of the running Python: the script beside the interpreter (a
    virtualenv's ``twistd``, Debian's ``/usr/bin/twistd3``), else the same code run
    by this interpreter.
    """
    bindir = os.path.dirname(sys.executable)
    for name in ("twistd", "twistd3"):
        path = os.path.join(bindir, name)
        if os.access(path, os.X_OK):
            return [path]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def oidc_settings(issuer_url: str, ca_file: str) -> dict[str, str]:
    """
    The ``[oidc]`` section for the test issuer: the seed's claim mapping (``email``
    and ``roles``, both prefixed ``banyan:``) and client id `CLIENT_ID`.
    """
    return {
        "issuer_url": issuer_url,
        "client_id": CLIENT_ID,
        "username_claim": "email",
        "username_prefix": "banyan:",
        "groups_claim": "roles",
        "groups_prefix": "banyan:",
        "signing_algs": "RS256",
        "ca_file": ca_file,
    }


def ini_text(sections: dict[str, dict[str, str]]) -> str:
    """
    An INI file's text: each section with its keys in order, a blank line after each.
    """
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def proxy_rbac_yaml() -> str:
    """
    The RBAC that lets the proxy's service account impersonate (the shipped file).
    """
    candidates = [
        repository_file("etc", "banyan-kproxy", "kubernetes-rbac.yaml"),
        # Installed by `pip install .` (setup.cfg data_files).
        os.path.join(sys.prefix, "share", "banyan-kproxy", "kubernetes-rbac.yaml"),
    ]
    for path in candidates:
        if path is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise FileNotFoundError("kubernetes-rbac.yaml is neither in a checkout nor installed")


def seed_rbac_yaml() -> str:
    """
    The seed's Step 4 Role, RoleBinding and ClusterRoleBinding.
    """
    return resources.files("banyan_kproxy.testing").joinpath("seed-rbac.yaml").read_text()


class _DaemonProtocol(protocol.ProcessProtocol):
    """
    Collects the daemon's output and notices its listening lines and its exit.
    """

    #: How much of the daemon's output is kept in memory (all of it goes to the log file).
    KEEP = 1 << 20

    def __init__(self, echo: bool, log_path: str) -> None:
        self.output = b""
        self.echo = echo
        self.log_file = open(log_path, "ab")
        self.ports: dict[str, int] = {}
        self.listening: Deferred[None] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self.exit_signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-self.KEEP:]
        self.log_file.write(data)
        self.log_file.flush()
        if self.echo:
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()
        for match in _LISTENING.finditer(self.output):
            self.ports[match.group(1).decode()] = int(match.group(3))
        if "the proxy" in self.ports and "health and metrics" in self.ports and not self.listening.called:
            self.listening.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.log_file.close()
        code = getattr(reason.value, "exitCode", None)
        # twistd stopped by SIGTERM ends by re-raising it once it has shut down.
        self.exit_signal = getattr(reason.value, "signal", None)
        if not self.listening.called:
            self.listening.errback(
                RuntimeError(f"the daemon exited ({code}) before listening:\n{self.output.decode()}")
            )
        self.ended.callback(code)


@attr.s(auto_attribs=True)
class ExternalCluster:
    """
    A real apiserver the proxy forwards to, with the credential it uses there.
    """

    server: str
    ca_file: str | None
    token_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None


@attr.s(auto_attribs=True)
class LoopbackStack:
    """
    Certificates, issuer, apiserver (stand-in or real) and daemon on 127.0.0.1.
    """

    reactor: Any
    directory: str
    cluster: ExternalCluster | None = None
    echo_daemon: bool = False
    extra_ini: str = ""
    # More keys for the sections the stack writes ([proxy], [oidc], [upstream]), e.g.
    # {"oidc": {"jwks_refresh_interval": "1s"}}; other sections go in extra_ini.
    settings: dict[str, dict[str, str]] = attr.Factory(dict)
    # The status the issuer's discovery document is served with at first (503: down).
    issuer_status: int = 200
    # More bearer tokens the stand-in accepts (e.g. service accounts), and more RBAC.
    standin_tokens: dict[str, Any] = attr.Factory(dict)
    standin_rbac: list[str] = attr.Factory(list)
    # More DNS names on the proxy's certificate (a kubeconfig server reached through
    # a CONNECT proxy, e.g. mykube.corp.example.com).
    proxy_dns_names: Sequence[str] = ()
    # The proxy's [proxy] listen address (fixed port: several processes with reuse_port).
    proxy_listen: str = "127.0.0.1:0"
    reuse_port: bool = False
    # How the daemon is started: this command + ``--nodaemon --pidfile= banyan-kproxy
    # --config FILE`` (default: `twistd_command()`); with ``daemon_from_checkout`` this
    # checkout goes first on its PYTHONPATH (false: the installed code runs, e.g. a
    # Debian package's ``/usr/bin/twistd3``).  ``run_as``: a user name the daemon runs
    # as (the caller must be root); the files it reads are given to that user.
    twistd_command: Sequence[str] | None = None
    daemon_from_checkout: bool = True
    run_as: str | None = None
    log = Logger()

    ca: Any = None
    issuer: Any = None
    standin: Any = None
    proxy_port: int = 0
    health_port: int = 0
    ini_path: str = ""
    # The issuer's and the stand-in's listeners (testing.loopback.Served / kubeapi.Listening).
    issuer_listening: Any = None
    standin_listening: Any = None
    _daemon: Any = None
    _process: Any = None
    _standin_port: int = 0
    _issuer_port: int = 0

    @property
    def proxy_url(self) -> str:
        return f"https://127.0.0.1:{self.proxy_port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def daemon_log(self) -> str:
        """
        Where everything the daemon prints is written.
        """
        return os.path.join(self.directory, "daemon.log")

    @property
    def ca_file(self) -> str:
        return os.path.join(self.directory, "ca.crt")

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _write(self, name: str, content: bytes | str, mode: int = 0o600) -> str:
        path = self._path(name)
        data = content.encode("utf-8") if isinstance(content, str) else content
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._give(path)
        return path

    def _give(self, path: str) -> None:
        if self.run_as is not None:
            user = pwd.getpwnam(self.run_as)
            os.chown(path, user.pw_uid, user.pw_gid)

    def _server_tls(self, name: str) -> ServerTLS:
        issued = self.ca.issue("127.0.0.1", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        cert, key = issued.write(self.directory, name)
        return ServerTLS.from_files(cert, key)

    async def start(self, timeout: float = 30.0, wait_ready: bool = True) -> None:
        """
        Bring everything up; fires once the daemon listens and (unless ``wait_ready``
        is false) reports ready.
        """
        os.makedirs(self.directory, exist_ok=True)
        self._give(self.directory)
        self.ca = CertificateAuthority.generate("banyan-kproxy loopback CA")
        self._write("ca.crt", self.ca.cert_pem, 0o644)

        self.issuer = OIDCIssuer("https://127.0.0.1/v2")
        self.issuer.discovery_status = self.issuer_status
        self.issuer_listening = serve(
            self.reactor, Site(self.issuer.resource()), tls=self._server_tls("issuer")
        )
        self.issuer.issuer_url = self.issuer_listening.url + "/v2"

        if self.cluster is None:
            proxy_token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
            self.standin = KubeAPIStandIn(
                tokens={proxy_token: PROXY_SERVICE_ACCOUNT, **self.standin_tokens},
                rbac_yaml=[proxy_rbac_yaml(), seed_rbac_yaml(), *self.standin_rbac],
                clock=self.reactor,
            )
            self.standin_listening = listen(
                self.reactor, self.standin, tls=self._server_tls("kubeapi")
            )
            cluster = ExternalCluster(
                self.standin_listening.url,
                self.ca_file,
                token_file=self._write("proxy.token", proxy_token + "\n"),
            )
        else:
            cluster = self.cluster

        proxy_cert, proxy_key = self.ca.issue(
            "127.0.0.1", dns_names=["localhost", *self.proxy_dns_names], ip_addresses=["127.0.0.1"]
        ).write(self.directory, "proxy")
        self._give(proxy_cert)
        self._give(proxy_key)
        sections = {
            "proxy": {
                "listen": str(self.proxy_listen),
                "tls_cert_file": proxy_cert,
                "tls_key_file": proxy_key,
                "health_listen": "127.0.0.1:0",
                "reuse_port": "true" if self.reuse_port else "false",
            },
            "oidc": oidc_settings(self.issuer.issuer_url, self.ca_file),
            "upstream": {
                "server": cluster.server,
                "ca_file": cluster.ca_file or "",
                "token_file": cluster.token_file or "",
                "client_cert_file": cluster.client_cert_file or "",
                "client_key_file": cluster.client_key_file or "",
            },
        }
        for section, values in self.settings.items():
            sections.setdefault(section, {}).update(values)
        self.ini_path = self._write("kproxy.ini", ini_text(sections) + self.extra_ini, 0o644)
        await self._start_daemon(timeout)
        if wait_ready:
            await self.wait_ready(timeout)

    def spawn_daemon(self, log_path: str | None = None) -> tuple[_DaemonProtocol, Any]:
        """
        Start a daemon process on this stack's configuration file; returns its
        protocol (``listening``, ``ports``, ``ended``, ``output``) and process
        (``pid``).  `start` uses it for the stack's own daemon; with ``reuse_port``
        and a fixed ``proxy_listen`` more can share the proxy's port.  The caller
        stops the ones it starts.
        """
        command = list(self.twistd_command or twistd_command())
        env = dict(os.environ)
        source = repository_file("twisted", "plugins")
        if self.daemon_from_checkout and source is not None:
            # Run this checkout's code, not an older installed copy.
            root = os.path.dirname(os.path.dirname(source))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        elif not self.daemon_from_checkout:
            env.pop("PYTHONPATH", None)
        ids: dict[str, int] = {}
        if self.run_as is not None:
            user = pwd.getpwnam(self.run_as)
            ids = {"uid": user.pw_uid, "gid": user.pw_gid}
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        daemon = _DaemonProtocol(self.echo_daemon, log_path or self.daemon_log)
        process = self.reactor.spawnProcess(
            daemon,
            command[0],
            [*command, "--nodaemon", "--pidfile=", "banyan-kproxy", "--config", self.ini_path],
            env=env,
            path=self.directory,
            **ids,
        )
        return daemon, process

    async def _start_daemon(self, timeout: float) -> None:
        self._daemon, self._process = self.spawn_daemon()
        listening = self._daemon.listening
        listening.addTimeout(timeout, self.reactor)
        await listening
        self.proxy_port = self._daemon.ports["the proxy"]
        self.health_port = self._daemon.ports["health and metrics"]

    @property
    def daemon_output(self) -> str:
        return self._daemon.output.decode("utf-8", "replace") if self._daemon else ""

    @property
    def daemon_exit_signal(self) -> int | None:
        """
        The signal the daemon ended by (SIGTERM after an orderly stop), if any.
        """
        return self._daemon.exit_signal if self._daemon is not None else None

    @property
    def daemon_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def wait_ready(self, timeout: float) -> None:
        """
        Poll ``/ready`` until it answers 200, for at most ``timeout`` seconds.
        """
        import treq

        deadline = self.reactor.seconds() + timeout
        last = ""
        while self.reactor.seconds() < deadline:
            try:
                response = await treq.get(
                    self.health_url + "/ready", reactor=self.reactor, timeout=2, persistent=False
                )
                last = (await treq.text_content(response)).strip()
                if response.code == 200:
                    return
            except Exception as e:  # noqa: BLE001 - keep polling until the deadline
                last = str(e)
            await deferLater(self.reactor, 0.1, lambda: None)
        raise RuntimeError(f"the daemon did not become ready in {timeout}s: {last}")

    def token(self, email: str, roles: Sequence[str] = (), **kwargs: Any) -> str:
        """
        An ID token from the development issuer, as the Banyan issuer would mint it.
        """
        claims = {"email": email, "email_verified": True, "roles": list(roles)}
        claims.update(kwargs.pop("claims", {}))
        kwargs.setdefault("audience", CLIENT_ID)
        kwargs.setdefault("subject", email)
        return self.issuer.token(claims, **kwargs)

    def refresh_token(self, email: str, roles: Sequence[str] = ()) -> str:
        """
        A refresh token the development issuer's token endpoint exchanges for ID
        tokens like `token`'s (client id ``external-services``).
        """
        claims = {"email": email, "email_verified": True, "roles": list(roles)}
        return self.issuer.issue_refresh_token(claims, client_id=CLIENT_ID, subject=email)

    def write_kubeconfig(
        self,
        name: str,
        users: dict[str, str],
        cluster_name: str = "testcluster",
        server: str | None = None,
        proxy_url: str | None = None,
    ) -> str:
        """
        A kubeconfig with one context per user (context name = user name); with
        ``proxy_url``, kubectl reaches ``server`` through that CONNECT proxy.
        """
        with open(self.ca_file, "rb") as f:
            ca_data = base64.b64encode(f.read()).decode()
        cluster: dict[str, str] = {
            "server": server or self.proxy_url,
            "certificate-authority-data": ca_data,
        }
        if proxy_url is not None:
            cluster["proxy-url"] = proxy_url
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": cluster_name, "cluster": cluster}],
            "users": [{"name": user, "user": {"token": token}} for user, token in users.items()],
            "contexts": [
                {"name": user, "context": {"cluster": cluster_name, "user": user, "namespace": "default"}}
                for user in users
            ],
            "current-context": next(iter(users)),
        }
        return self._write(name, yaml.safe_dump(config, sort_keys=False))

    async def kill_daemon(self, timeout: float = 10.0) -> int | None:
        """
        SIGKILL the daemon (no orderly stop: what it held in memory is gone) and wait
        at most ``timeout`` seconds for it to exit; the issuer and stand-in stay up.
        """
        if self._process is None or self._daemon.ended.called:
            return None
        _kill(self._process)
        ended = self._daemon.ended
        ended.addTimeout(timeout, self.reactor)
        return await ended

    async def restart_daemon(self, timeout: float = 30.0, wait_ready: bool = True) -> None:
        """
        Start the daemon again on the same configuration file (after `kill_daemon`);
        ``proxy_port`` and ``health_port`` are those of the new process.
        """
        if self._daemon is not None and not self._daemon.ended.called:
            raise RuntimeError("the daemon is still running")
        await self._start_daemon(timeout)
        if wait_ready:
            await self.wait_ready(timeout)

    async def stop_apiserver(self, graceful: bool = False) -> None:
        """
        Take the stand-in offline until `restart_apiserver`: its port refuses
        connections.  ``graceful``: as a restarting kube-apiserver, end every watch
        with its final chunk and close each connection after what it was sent; else
        abort them, as a crash does.
        """
        listening, self.standin_listening = self.standin_listening, None
        self._standin_port = listening.port_number
        await listening.stop(graceful=graceful)

    async def restart_apiserver(self) -> None:
        """
        Serve the stand-in again on its port, with the objects and watch history it
        had (as etcd keeps them across an apiserver restart).
        """
        self.standin_listening = listen(
            self.reactor, self.standin, port=self._standin_port, tls=self._server_tls("kubeapi")
        )

    async def stop_issuer(self) -> None:
        """
        Take the OIDC issuer offline until `restart_issuer`: its port refuses connections.
        """
        served, self.issuer_listening = self.issuer_listening, None
        self._issuer_port = served.port_number
        await served.stop()

    async def restart_issuer(self) -> None:
        """
        Serve the OIDC issuer again on its port, with the keys it had.
        """
        self.issuer_listening = serve(
            self.reactor,
            Site(self.issuer.resource()),
            port=self._issuer_port,
            tls=self._server_tls("issuer"),
        )

    async def stop(self, timeout: float = 10.0) -> int | None:
        """
        Stop the daemon (SIGTERM, then SIGKILL after ``timeout``) and every listener.
        """
        code = None
        if self._process is not None and not self._daemon.ended.called:
            try:
                self._process.signalProcess("TERM")
            except Exception:  # noqa: BLE001 - already gone
                pass
            ended = self._daemon.ended
            killer = self.reactor.callLater(timeout, _kill, self._process)
            code = await ended
            if killer.active():
                killer.cancel()
        elif self._daemon is not None:
            code = self._daemon.ended.result
        listeners = [self.standin_listening, self.issuer_listening]
        self.standin_listening = self.issuer_listening = None
        await defer.gatherResults([x.stop() for x in listeners if x is not None])
        return code


def _kill(process: Any) -> None:
    try:
        process.signalProcess(signal.SIGKILL)
    except Exception:  # noqa: BLE001 - already gone
        pass
