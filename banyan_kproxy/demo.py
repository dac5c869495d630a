"""
``banyan-kproxy demo`` (``make demo``): the proxy's main job, on loopback, in one command.

It generates throwaway certificates, starts a development OIDC issuer on 127.0.0.1,
and runs the real daemon (``twistd -n banyan-kproxy``) in front of the cluster of the
current kubeconfig context when one answers, otherwise in front of the built-in
Kubernetes API stand-in loaded with the seed's RBAC (Step 4).  It writes a kubeconfig
with a ``reader`` and an ``admin`` context, shows one allowed and one forbidden
request, and keeps running until Ctrl-C.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
from typing import Any

import yaml
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from banyan_kproxy.testing.stack import ADMIN_ROLE, READER_ROLE, ExternalCluster, LoopbackStack

READER = "myuser@example.com"
ADMIN = "admin@example.com"


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _materialise(directory: str, name: str, data: str | None, path: str | None) -> str | None:
    """
    A kubeconfig ``*-data`` value written to a file, or the file it names.
    """
    if data:
        target = os.path.join(directory, name)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(data))
        return target
    return os.path.expanduser(path) if path else None


def current_context_cluster(directory: str, environ: Any = os.environ) -> tuple[ExternalCluster | None, str]:
    """
    The cluster and credential of the current kubeconfig context, or None and why not.

    Only static credentials can be handed to the daemon (a token, or a client
    certificate); exec plugins and auth providers are skipped.
    """
    paths = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p] or [
        os.path.expanduser("~/.kube/config")
    ]
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return None, "no kubeconfig"
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        current = config.get("current-context")
        if not current:
            return None, f"{path} has no current context"
        context = next(c["context"] for c in config.get("contexts", []) if c["name"] == current)
        cluster = next(c["cluster"] for c in config.get("clusters", []) if c["name"] == context["cluster"])
        user = next((u.get("user") or {} for u in config.get("users", []) if u["name"] == context.get("user")), {})
    except (OSError, yaml.YAMLError, KeyError, StopIteration, TypeError, AttributeError) as e:
        return None, f"{path} cannot be used ({type(e).__name__})"
    server = cluster.get("server", "")
    if not server.startswith("https://"):
        return None, f"context {current} has no https server"
    os.makedirs(directory, exist_ok=True)
    ca = _materialise(directory, "cluster-ca.crt", cluster.get("certificate-authority-data"),
                      cluster.get("certificate-authority"))
    token = user.get("token")
    token_file = user.get("tokenFile")
    if token:
        token_file = os.path.join(directory, "cluster.token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    cert = _materialise(directory, "cluster-client.crt", user.get("client-certificate-data"),
                        user.get("client-certificate"))
    key = _materialise(directory, "cluster-client.key", user.get("client-key-data"), user.get("client-key"))
    if not token_file and not (cert and key):
        return None, f"context {current} uses a credential the demo cannot hand over (exec plugin?)"
    return ExternalCluster(server, ca, token_file, cert, key), f"context {current} ({server})"


async def _answers(reactor: Any, cluster: ExternalCluster) -> bool:
    """
    Whether the cluster answers ``GET /version`` with the context's credential.
    """
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    from banyan_kproxy.tls import https_policy

    try:
        policy = https_policy(cluster.ca_file, cluster.client_cert_file, cluster.client_key_file)
        client = HTTPClient(Agent(reactor, contextFactory=policy, connectTimeout=3))
        headers = {}
        if cluster.token_file:
            with open(cluster.token_file) as f:
                headers["Authorization"] = "Bearer " + f.read().strip()
        response = await client.get(cluster.server.rstrip("/") + "/version", headers=headers, timeout=3)
        await treq.content(response)
        return response.code == 200
    except Exception:  # noqa: BLE001 - any failure means "does not answer"
        return False


async def _kubectl(reactor: Any, kubeconfig: str, *args: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "(kubectl is not on PATH)"
    env = dict(os.environ, KUBECONFIG=kubeconfig)
    out, err, code = await getProcessOutputAndValue(kubectl, args, env=env, reactor=reactor)
    return (out + err).decode("utf-8", "replace").rstrip()


async def _demo(reactor: Any, directory: str, force_stand_in: bool) -> None:
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    cluster, where = (None, "--stand-in given") if force_stand_in else current_context_cluster(directory)
    if cluster is not None and not await _answers(reactor, cluster):
        where = f"{where} did not answer"
        cluster = None
    stack = LoopbackStack(reactor, directory, cluster=cluster, echo_daemon=False)
    _say("banyan-kproxy demo: starting (certificates, development issuer, daemon)...")
    try:
        await stack.start()
    except Exception:
        await stack.stop()
        raise
    async def shutdown() -> None:
        _say("\nStopping the daemon, the issuer and the stand-in...")
        await stack.stop()
        _say("Stopped.")

    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(shutdown()))
    if cluster is None:
        upstream = f"the built-in Kubernetes API stand-in ({where}; seed Step 4 RBAC loaded)"
        for name in ("web-1", "web-2"):
            stack.standin.add_pod(name)
        stack.standin.add_service("web")
    else:
        upstream = f"the cluster of the current kubeconfig {where}"
    kubeconfig = stack.write_kubeconfig(
        "kubeconfig",
        {
            "reader": stack.token(READER, [READER_ROLE], expires_in=12 * 3600),
            "admin": stack.token(ADMIN, [ADMIN_ROLE], expires_in=12 * 3600),
        },
    )
    rel = os.path.relpath(kubeconfig)
    _say()
    _say(f"The proxy (pid {stack.daemon_pid}) listens on {stack.proxy_url}")
    _say(f"  in front of {upstream}.")
    _say(f"  OIDC issuer: {stack.issuer.issuer_url}   health: {stack.health_url}/ready")
    _say(f"  configuration: {os.path.relpath(stack.ini_path)}   log: {os.path.relpath(stack.daemon_log)}")
    _say()
    _say(f"Kubeconfig {rel}: context 'reader' is {READER} with role {READER_ROLE},")
    _say(f"  context 'admin' is {ADMIN} with role {ADMIN_ROLE}.")
    _say()
    for context, what, verb in (
        ("reader", "pods", "allowed"),
        ("reader", "services", "forbidden by RBAC"),
        ("admin", "services", "allowed"),
    ):
        _say(f"$ kubectl --kubeconfig {rel} --context {context} get {what}      # {verb}")
        _say(await _kubectl(reactor, kubeconfig, "--context", context, "get", what))
        _say()
    _say("Try more:")
    _say(f"  kubectl --kubeconfig {rel} --context reader get pods -w")
    _say(f"  curl --cacert {os.path.relpath(stack.ca_file)} {stack.proxy_url}/api   # no token: 401")
    _say(f"  curl {stack.health_url}/metrics")
    _say()
    _say("Press Ctrl-C to stop everything.")
    await Deferred()  # until Ctrl-C stops the reactor


def run_demo(directory: str, force_stand_in: bool = False) -> int:
    """
    Run the demo until interrupted; return the exit status.
    """
    from twisted.internet.task import react

    def main(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(_demo(reactor, directory, force_stand_in))

    react(main)
    return 0
