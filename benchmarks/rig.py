"""
The loopback deployment the HTTP benchmarks measure: an nginx "apiserver" over TLS
serving canned API responses, banyan-kproxy (the real ``twistd -n banyan-kproxy``
daemon, one process or two sharing the port with ``reuse_port``) and HAProxy doing
the same core job, all on 127.0.0.1.

Blocking code on purpose: the driver only starts processes, waits for them and runs
load generators; it must not itself be a Twisted program competing with the daemon.

- **nginx** (Debian's, ``nginx -p DIR -c FILE -g 'daemon off;'``) plays the
  apiserver: a 10-pod ``PodList`` at ``/api/v1/namespaces/default/pods``, a 20 MB
  ``PodList`` at ``/api/v1/pods``, both ``application/json``; it answers 401 unless
  the request carries the proxy's own bearer credential, so a proxy that forwarded the
  caller's token would be seen failing.  ``/readyz`` answers ``ok`` (the daemon's
  upstream probe asks it).  ``/echo`` returns the ``Impersonate-*``
  headers it received (the sanity check before measuring).  A second nginx server
  block serves the OIDC issuer's discovery document and JWKS as static files: the
  daemon fetches its keys from there, and no Python issuer process competes for CPU.
- **banyan-kproxy**: the INI mirrors `banyan_kproxy.testing.stack` (``[proxy]``,
  ``[oidc]`` with the seed's claims, ``[upstream]`` pointing at nginx with a token).
- **HAProxy** (Debian's 2.6): TLS termination, ``jwt_verify`` (RS256, the issuer's
  public key as PEM), issuer, audience and expiry checks with ``jwt_payload_query``,
  caller-supplied ``Impersonate-*`` and ``Authorization`` removed, ``Impersonate-User``
  and ``Impersonate-Group`` (the first role plus ``system:authenticated``: HAProxy's
  JSON path cannot iterate an array) set, the proxy's own credential added, then TLS
  to nginx with the CA verified and connections reused.  ``nbthread`` 1 or 2.  It
  does a little less than the daemon (no ``email_verified`` check, one group, no
  audit ID, no cache: it verifies the signature on every request).

Every process is started with `Children.spawn` and stopped by its PID.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attr

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    # banyan_kproxy.testing (certificates, tokens) from this checkout.
    sys.path.insert(0, ROOT)

from banyan_kproxy.testing.stack import CLIENT_ID, ini_text, oidc_settings  # noqa: E402

USER_EMAIL = "alice@example.com"
USER_ROLES = ("any-employee-personal-device", "all-admins-corporate-device")
EXPECTED_USER = "banyan:" + USER_EMAIL
EXPECTED_GROUP = "banyan:" + USER_ROLES[0]

SMALL_PATH = "/api/v1/namespaces/default/pods"
LARGE_PATH = "/api/v1/pods"
ECHO_PATH = "/echo"
LARGE_BYTES = 20 * 1000 * 1000


class ToolMissing(Exception):
    """
    A program the benchmarks need is not installed.
    """


def find_tool(name: str) -> str:
    """
    The path of ``name`` on PATH or in the sbin directories (nginx and haproxy live
    in /usr/sbin, which is not on an ordinary user's PATH).
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise ToolMissing(f"{name} is not installed (make bench installs it: apt-get install -y {name})")
    return path


def slug(name: str) -> str:
    """
    ``name`` as a file name: "banyan-kproxy x2 (reuse_port)" -> "banyan-kproxy-x2-reuse_port".
    """
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-")


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot
    bind port 0 and report it: nginx, HAProxy, two processes sharing one port).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """
    ``VmRSS`` (or ``VmHWM``, the peak) of a process in MiB.
    """
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for {pid}")


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU time a process has used, in seconds.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), counted from the state field (3).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """
    The processes whose parent is ``pid`` (nginx's workers).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """
    Call ``check`` until it returns true; return the seconds it took.  Raises
    `TimeoutError` naming ``what`` after ``timeout`` seconds.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            if check():
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(interval)


@attr.s(auto_attribs=True)
class Child:
    """
    A process this run started.
    """

    name: str
    process: subprocess.Popen
    log_path: str
    started_at: float

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, size: int = 2000) -> str:
        """
        The end of what the process printed.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def check_running(self) -> None:
        """
        Raise if the process has exited.
        """
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")


class Children:
    """
    The processes of one run, each stopped by its PID (SIGTERM, then SIGKILL).
    """

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.running: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """
        Start ``argv`` with its output in ``<workdir>/<name>.log``.
        """
        log_path = os.path.join(self.workdir, slug(name) + ".log")
        log = open(log_path, "ab")
        started_at = time.monotonic()
        try:
            process = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.workdir, start_new_session=True,
            )
        finally:
            log.close()
        child = Child(name, process, log_path, started_at)
        self.running.append(child)
        return child

    def stop(self, child: Child, timeout: float = 10.0) -> None:
        """
        SIGTERM ``child``, SIGKILL it after ``timeout`` seconds, and reap it.
        """
        if child in self.running:
            self.running.remove(child)
        if child.process.poll() is not None:
            return
        try:
            os.kill(child.pid, signal.SIGTERM)
            child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            child.process.wait(timeout)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        """
        Stop every process still running, newest first.
        """
        for child in reversed(list(self.running)):
            self.stop(child)


# -- canned API responses --------------------------------------------------------------


def pod(index: int, namespace: str = "default") -> dict[str, Any]:
    """
    A Pod as ``kubectl get pods -o json`` shows it (without managedFields): a
    Deployment's replica with one container, probes, a volume and a status.
    """
    app = f"web-{index % 7}"
    name = f"{app}-7d4b9c8f6d-{index:05x}"
    uid = f"{index:08x}-1c2d-4e5f-8a9b-{index * 2654435761 % (1 << 48):012x}"
    ip = f"10.244.{index // 250 % 250}.{index % 250 + 2}"
    return {
        "metadata": {
            "name": name,
            "generateName": f"{app}-7d4b9c8f6d-",
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": str(100000 + index),
            "creationTimestamp": "2024-05-01T12:00:00Z",
            "labels": {"app": app, "pod-template-hash": "7d4b9c8f6d", "tier": "frontend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-05-01T11:59:00Z"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{app}-7d4b9c8f6d",
                "uid": f"rs-{index % 7:04d}-5e6f-7a8b-9c0d", "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "volumes": [{
                "name": "kube-api-access-x7k2p",
                "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                ], "defaultMode": 420},
            }],
            "containers": [{
                "name": "web",
                "image": "registry.example.com/web:1.25.3",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"limits": {"cpu": "500m", "memory": "256Mi"},
                              "requests": {"cpu": "100m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": True,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                                  "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
                                  "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                                   "timeoutSeconds": 1, "periodSeconds": 5, "successThreshold": 1,
                                   "failureThreshold": 3},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "nodeName": f"node-{index % 5}",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None,
                 "lastTransitionTime": "2024-05-01T12:00:05Z"}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "hostIP": f"192.168.1.{index % 5 + 10}",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": "2024-05-01T12:00:00Z",
            "containerStatuses": [{
                "name": "web", "state": {"running": {"startedAt": "2024-05-01T12:00:03Z"}},
                "lastState": {}, "ready": True, "restartCount": 0,
                "image": "registry.example.com/web:1.25.3",
                "imageID": "registry.example.com/web@sha256:" + f"{index:064x}",
                "containerID": "containerd://" + f"{index * 7919:064x}",
                "started": True,
            }],
            "qosClass": "Burstable",
        },
    }


def pod_list(count: int | None = None, min_bytes: int | None = None) -> bytes:
    """
    A ``PodList`` of ``count`` pods, or of as many as it takes to reach ``min_bytes``.
    """
    items = []
    size = 0
    index = 0
    while (count is not None and index < count) or (min_bytes is not None and size < min_bytes):
        item = pod(index)
        items.append(item)
        size += len(json.dumps(item, separators=(",", ":"))) + 1
        index += 1
    document = {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "123456"},
        "items": items,
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


# -- the deployment ---------------------------------------------------------------------


@attr.s(auto_attribs=True)
class Target:
    """
    Something a load generator is pointed at: its URL, the bearer token to send, and
    the processes behind it (for RSS).
    """

    name: str
    port: int
    token: str
    children: list[Child]
    health_ports: list[int] = attr.Factory(list)

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def rss_mib(self, field: str = "VmRSS") -> float:
        """
        The summed ``field`` of its processes, MiB.
        """
        return sum(rss_mib(pid, field) for pid in self.pids)

    def reset_peak_rss(self) -> bool:
        """
        Reset the kernel's peak-RSS mark (``VmHWM``) of its processes; false if it
        could not be (then ``VmHWM`` is the peak since start).
        """
        try:
            for pid in self.pids:
                with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
        except OSError:
            return False
        return True

    def cpu_seconds(self) -> list[float]:
        """
        CPU time used so far by each of its processes and their children (nginx's
        workers), in seconds.
        """
        return [cpu_seconds(pid) + sum(cpu_seconds(c) for c in child_pids(pid)) for pid in self.pids]


class Rig:
    """
    Certificates, tokens, canned responses and nginx (the apiserver and the issuer's
    static files) in ``workdir``; `start_kproxy` and `start_haproxy` add proxies in
    front of it.  `close` stops everything.
    """

    def __init__(self, workdir: str, large_bytes: int = LARGE_BYTES) -> None:
        self.workdir = os.path.abspath(workdir)
        self.large_bytes = large_bytes
        self.children = Children(self.workdir)
        self.nginx_bin = find_tool("nginx")
        self.haproxy_bin = find_tool("haproxy")
        self.nginx: Child | None = None
        self.api_port = 0
        self.issuer_port = 0
        self.proxy_token = ""
        self.user_token = ""
        self.expired_token = ""
        self.direct: Target | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def _write(self, name: str, data: bytes | str, mode: int = 0o644) -> str:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(path, mode)
        return path

    # -- set-up ---------------------------------------------------------------------

    def setup(self) -> None:
        """
        Generate everything and start nginx.
        """
        import base64

        from banyan_kproxy.testing.certs import CertificateAuthority
        from banyan_kproxy.testing.issuer import OIDCIssuer

        os.makedirs(self.workdir, exist_ok=True)
        self.api_port = free_port()
        self.issuer_port = free_port()
        self.ca = CertificateAuthority.generate("banyan-kproxy benchmark CA")
        self.ca_file = self._write("ca.crt", self.ca.cert_pem)
        for name in ("nginx", "kproxy", "haproxy"):
            issued = self.ca.issue("127.0.0.1", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
            issued.write(self.workdir, name)
            # HAProxy wants the chain and the key in one file.
            self._write(name + ".pem", issued.chain_pem + issued.key_pem, 0o600)

        issuer_url = f"https://127.0.0.1:{self.issuer_port}/v2"
        self.issuer = OIDCIssuer(issuer_url, alg="RS256", fresh_keys=True)
        self._write("issuer/v2/.well-known/openid-configuration", json.dumps(self.issuer.discovery_document()))
        self._write("issuer/v2/keys", json.dumps(self.issuer.jwks()))
        self.issuer_public_key = self._write("issuer-public.pem", self.issuer.public_pem())
        claims = {"email": USER_EMAIL, "email_verified": True, "roles": list(USER_ROLES)}
        self.user_token = self.issuer.token(claims, audience=CLIENT_ID, subject=USER_EMAIL, expires_in=86400)
        self.expired_token = self.issuer.token(
            claims, audience=CLIENT_ID, subject=USER_EMAIL, expires_in=-3600, issued_at=time.time() - 7200
        )
        self.proxy_token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        self.proxy_token_file = self._write("proxy.token", self.proxy_token + "\n", 0o600)

        self._write("content/small.json", pod_list(count=10))
        self._write("content/large.json", pod_list(min_bytes=self.large_bytes))
        self.small_bytes = os.path.getsize(self.path("content/small.json"))
        self.large_bytes = os.path.getsize(self.path("content/large.json"))
        self._start_nginx()
        self.direct = Target("direct", self.api_port, self.proxy_token, [self.nginx])

    def _start_nginx(self) -> None:
        for name in ("logs", "tmp"):
            os.makedirs(self.path(name), exist_ok=True)
        # Workers run as root when we are root, so they can read the 0700 work directory.
        user = "user root;" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {self.path('tmp', kind)};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = f"""
{user}
worker_processes auto;
pid {self.path('nginx.pid')};
error_log {self.path('logs', 'nginx-error.log')} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/json;
    map $http_authorization $kproxy_authorized {{
        "Bearer {self.proxy_token}" 1;
        default 0;
    }}
    server {{
        listen 127.0.0.1:{self.api_port} ssl;
        ssl_certificate {self.path('nginx.crt')};
        ssl_certificate_key {self.path('nginx.key')};
        if ($kproxy_authorized = 0) {{
            return 401 '{{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Unauthorized","code":401}}';
        }}
        location = {SMALL_PATH} {{ alias {self.path('content', 'small.json')}; }}
        location = {LARGE_PATH} {{ alias {self.path('content', 'large.json')}; }}
        location = /readyz {{ default_type text/plain; return 200 'ok'; }}
        location = {ECHO_PATH} {{
            return 200 '{{"user":"$http_impersonate_user","group":"$http_impersonate_group"}}';
        }}
    }}
    server {{
        listen 127.0.0.1:{self.issuer_port} ssl;
        ssl_certificate {self.path('nginx.crt')};
        ssl_certificate_key {self.path('nginx.key')};
        root {self.path('issuer')};
    }}
}}
"""
        conf_path = self._write("nginx.conf", conf)
        self.nginx = self.children.spawn(
            "nginx", [self.nginx_bin, "-p", self.workdir, "-c", conf_path, "-g", "daemon off;"]
        )
        wait_until(
            lambda: self._nginx_up(), 15, "nginx"
        )

    def _nginx_up(self) -> bool:
        assert self.nginx is not None
        self.nginx.check_running()
        status, _ = self.get(self.api_port, SMALL_PATH, self.proxy_token)
        return status == 200

    # -- HTTP checks -------------------------------------------------------------------

    def get(
        self, port: int, path: str, token: str | None, headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> tuple[int, bytes]:
        """
        One HTTPS GET on a new connection; ``(status, body)``.
        """
        context = ssl.create_default_context(cafile=self.ca_file)
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
        try:
            all_headers = dict(headers or {})
            if token is not None:
                all_headers["Authorization"] = "Bearer " + token
            connection.request("GET", path, headers=all_headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def check_target(self, target: Target) -> None:
        """
        Before measuring a proxy, check it does the job: a valid token is forwarded
        with the proxy's credential and the right ``Impersonate-User``/``-Group``
        (client-supplied impersonation removed), the pod list comes back whole, and an
        expired token or no token is refused.
        """
        status, body = self.get(target.port, ECHO_PATH, target.token)
        if status != 200:
            raise RuntimeError(f"{target.name}: /echo answered {status}: {body[:200]!r}")
        seen = json.loads(body)
        if target.name != "direct" and (seen["user"], seen["group"]) != (EXPECTED_USER, EXPECTED_GROUP):
            raise RuntimeError(f"{target.name}: upstream saw {seen}, wanted {EXPECTED_USER} / {EXPECTED_GROUP}")
        if target.name != "direct":
            # Client-supplied impersonation is refused (banyan-kproxy: 403) or replaced (HAProxy).
            status, body = self.get(target.port, ECHO_PATH, target.token, {"Impersonate-User": "mallory"})
            if status != 403 and (status != 200 or json.loads(body)["user"] != EXPECTED_USER):
                raise RuntimeError(f"{target.name}: Impersonate-User: mallory got {status} {body[:200]!r}")
        status, body = self.get(target.port, SMALL_PATH, target.token)
        if status != 200 or len(body) != self.small_bytes:
            raise RuntimeError(f"{target.name}: pod list answered {status} with {len(body)} bytes")
        if target.name != "direct":
            for token in (self.expired_token, None):
                status, _ = self.get(target.port, SMALL_PATH, token)
                if status != 401:
                    raise RuntimeError(f"{target.name}: a bad token got {status}, not 401")

    # -- banyan-kproxy ----------------------------------------------------------------

    def kproxy_ini(self, name: str, listen_port: int, health_port: int, reuse_port: bool) -> str:
        """
        Write the daemon's configuration file.
        """
        text = ini_text({
            "proxy": {
                "listen": f"127.0.0.1:{listen_port}",
                "tls_cert_file": self.path("kproxy.crt"),
                "tls_key_file": self.path("kproxy.key"),
                "health_listen": f"127.0.0.1:{health_port}",
                "reuse_port": "true" if reuse_port else "false",
            },
            "oidc": oidc_settings(self.issuer.issuer_url, self.ca_file),
            "upstream": {
                "server": f"https://127.0.0.1:{self.api_port}",
                "ca_file": self.ca_file,
                "token_file": self.proxy_token_file,
                "max_connections": "512",
            },
        })
        return self._write(name + ".ini", text)

    def start_kproxy(self, processes: int = 1, name: str = "banyan-kproxy", timeout: float = 60.0) -> Target:
        """
        Start the daemon (``processes`` > 1: that many sharing one port with
        ``reuse_port``) and wait until each reports ready and the proxy serves.
        """
        from banyan_kproxy.testing.stack import twistd_command

        port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        children = []
        health_ports = []
        for i in range(processes):
            health = free_port()
            label = name if processes == 1 else f"{name}-{i + 1}"
            ini = self.kproxy_ini(slug(label), port, health, reuse_port=processes > 1)
            argv = [*twistd_command(), "--nodaemon", "--pidfile=", "banyan-kproxy", "--config", ini]
            children.append(self.children.spawn(label, argv, env=env))
            health_ports.append(health)
        target = Target(name, port, self.user_token, children, health_ports)
        for child, health in zip(children, health_ports, strict=True):
            wait_until(lambda c=child, h=health: self._kproxy_ready(c, h), timeout, child.name)
        return target

    def _kproxy_ready(self, child: Child, health_port: int) -> bool:
        child.check_running()
        connection = http.client.HTTPConnection("127.0.0.1", health_port, timeout=2)
        try:
            connection.request("GET", "/ready")
            response = connection.getresponse()
            response.read()
            return response.status == 200
        finally:
            connection.close()

    # -- HAProxy --------------------------------------------------------------------

    def haproxy_config(self, name: str, port: int, threads: int) -> str:
        """
        Write an HAProxy configuration doing the proxy's core job.
        """
        iss = self.issuer.issuer_url
        conf = f"""
global
    nbthread {threads}
    maxconn 4096
    tune.ssl.default-dh-param 2048

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s
    http-reuse always

frontend kube
    bind 127.0.0.1:{port} ssl crt {self.path('haproxy.pem')} alpn http/1.1
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{self.issuer_public_key}") -m int 1 }}
    http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')
    http-request deny deny_status 401 unless {{ var(txn.iss) -m str {iss} }}
    http-request set-var(txn.aud) var(txn.bearer),jwt_payload_query('$.aud')
    http-request deny deny_status 401 unless {{ var(txn.aud) -m str {CLIENT_ID} }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date
    http-request deny deny_status 401 unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}
    http-request set-var(txn.user) var(txn.bearer),jwt_payload_query('$.email')
    http-request deny deny_status 401 unless {{ var(txn.user) -m found }}
    http-request set-var(txn.group) var(txn.bearer),jwt_payload_query('$.roles[0]')
    http-request del-header Impersonate- -m beg
    http-request set-header Impersonate-User banyan:%[var(txn.user)]
    http-request set-header Impersonate-Group banyan:%[var(txn.group)] if {{ var(txn.group) -m found }}
    http-request add-header Impersonate-Group system:authenticated
    http-request set-header Authorization "Bearer {self.proxy_token}"
    default_backend apiserver

backend apiserver
    server nginx 127.0.0.1:{self.api_port} ssl verify required ca-file {self.ca_file} maxconn 1000
"""
        return self._write(name + ".cfg", conf)

    def start_haproxy(self, threads: int = 1, name: str = "haproxy", timeout: float = 30.0) -> Target:
        """
        Start HAProxy with ``threads`` threads and wait until it proxies a request.
        """
        port = free_port()
        cfg = self.haproxy_config(slug(name), port, threads)
        child = self.children.spawn(name, [self.haproxy_bin, "-db", "-f", cfg])
        target = Target(name, port, self.user_token, [child])

        def ready() -> bool:
            child.check_running()
            return self.get(port, SMALL_PATH, self.user_token)[0] == 200

        wait_until(ready, timeout, name)
        return target

    def stop(self, target: Target) -> None:
        """
        Stop the processes of ``target``.
        """
        for child in target.children:
            self.children.stop(child)

    def close(self) -> None:
        """
        Stop every process this rig started.
        """
        self.children.stop_all()

