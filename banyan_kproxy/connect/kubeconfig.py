"""
The kubeconfig ``banyan-kproxy kubeconfig`` writes (seed, Step 5: ``~/.kube/banyan``).

One cluster, one user and one context, all named ``[kubeconfig] cluster_name``: the
cluster has the proxy's ``server`` URL, its CA (``certificate-authority-data``, seed
Step 3.5) and ``proxy-url: http://<[connect] listen>`` so that kubectl (>= 1.19)
reaches the server through the local connect service; the user's credential is the
exec plugin ``banyan-kproxy credential --config <this file>``.  Entries of an
existing file with other names are kept, and so is its ``current-context`` (set only
when there is none).  The file is replaced atomically with mode 0600.
"""

from __future__ import annotations

import base64
import os
import sys
from typing import Any

import yaml

from banyan_kproxy.config import Config
from banyan_kproxy.connect.credential import EXEC_API_VERSION
from banyan_kproxy.connect.files import write_private_file

INSTALL_HINT = (
    "banyan-kproxy provides the ID tokens for this cluster: install it "
    "(apt install banyan-kproxy, or pip install banyan-kproxy)"
)


class KubeconfigError(Exception):
    """
    The kubeconfig cannot be written; the message says why.
    """


def plugin_command() -> list[str]:
    """
    How kubectl starts this program: the ``banyan-kproxy`` script installed beside
    the running Python, else that Python with ``-m banyan_kproxy.cli``.
    """
    script = os.path.join(os.path.dirname(sys.executable), "banyan-kproxy")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "banyan_kproxy.cli"]


def proxy_url(config: Config) -> str | None:
    """
    ``http://host:port`` of the connect service, for kubectl's ``proxy-url``; None
    without a ``[connect]`` section (kubectl then goes straight to ``server``).
    """
    if config.connect is None:
        return None
    listen = config.connect.listen
    if listen.port == 0:
        raise KubeconfigError(
            f"{config.path}: [connect] listen has port 0; kubectl needs a fixed port in proxy-url"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{listen.port}"


def kubeconfig_entries(config: Config, command: list[str] | None = None) -> dict[str, Any]:
    """
    The cluster, user and context entries for ``config`` (a kubeconfig of its own).
    """
    if config.kubeconfig is None:
        raise KubeconfigError(f"{config.path}: no [kubeconfig] section: it says what to write")
    if config.oidc_client is None:
        raise KubeconfigError(
            f"{config.path}: no [oidc_client] section: kubectl's ID tokens come from it"
        )
    section = config.kubeconfig
    name = section.cluster_name
    cluster: dict[str, Any] = {"server": section.server}
    if section.ca_file:
        try:
            with open(section.ca_file, "rb") as f:
                cluster["certificate-authority-data"] = base64.b64encode(f.read()).decode("ascii")
        except OSError as e:
            raise KubeconfigError(f"{config.path}: [kubeconfig] ca_file {section.ca_file}: {e.strerror}") from None
    url = proxy_url(config)
    if url is not None:
        cluster["proxy-url"] = url
    command = list(command) if command is not None else plugin_command()
    exec_entry = {
        "apiVersion": EXEC_API_VERSION,
        "command": command[0],
        "args": [*command[1:], "credential", "--config", os.path.abspath(config.path)],
        "interactiveMode": "Never",
        "provideClusterInfo": False,
        "installHint": INSTALL_HINT,
    }
    return {
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"exec": exec_entry}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }


def merge(existing: dict[str, Any] | None, entries: dict[str, Any]) -> dict[str, Any]:
    """
    ``existing`` with the clusters, users and contexts of ``entries`` added or
    replaced by name; other keys and entries are kept, and ``current-context`` is set
    only when ``existing`` has none.
    """
    merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "preferences": {}}
    merged.update(existing or {})
    for key in ("clusters", "users", "contexts"):
        new = entries[key]
        names = {entry["name"] for entry in new}
        kept = [e for e in merged.get(key) or [] if not (isinstance(e, dict) and e.get("name") in names)]
        merged[key] = kept + new
    if not merged.get("current-context"):
        merged["current-context"] = entries["current-context"]
    return merged


def write_kubeconfig(config: Config, command: list[str] | None = None) -> str:
    """
    Write (or update) ``[kubeconfig] path`` for ``config``; return the path.
    """
    entries = kubeconfig_entries(config, command)
    path = config.kubeconfig.path  # type: ignore[union-attr]
    existing = None
    try:
        with open(path, encoding="utf-8") as f:
            existing = yaml.safe_load(f)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise KubeconfigError(f"{path}: cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise KubeconfigError(f"{path}: is not valid YAML ({' '.join(str(e).split())}); fix or move it") from None
    if existing is not None and not isinstance(existing, dict):
        raise KubeconfigError(f"{path}: is not a kubeconfig (not a YAML mapping); fix or move it")
    document = merge(existing, entries)
    try:
        write_private_file(path, yaml.safe_dump(document, sort_keys=False).encode("utf-8"))
    except OSError as e:
        raise KubeconfigError(f"{path}: cannot be written: {e.strerror or e}") from None
    return path
