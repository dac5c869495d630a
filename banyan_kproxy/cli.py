"""
The ``banyan-kproxy`` command: configuration checks and developer tools.

The daemon itself runs under ``twistd banyan-kproxy --config FILE``; this command
does what an operator wants without starting it, and on the user's device writes the
kubeconfig (``kubeconfig``) and is kubectl's exec credential plugin (``credential``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from banyan_kproxy import __version__
from banyan_kproxy.config import ConfigError, load_config


def check_config(path: str) -> int:
    """
    Print ``ok`` for a valid file, or each problem on its own line; return the exit status.
    """
    try:
        load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    from banyan_kproxy.tls import ServerTLS, TLSConfigError

    config = load_config(path)
    if config.proxy is not None:
        try:
            ServerTLS.from_files(config.proxy.tls_cert_file, config.proxy.tls_key_file)
        except TLSConfigError as e:
            print(f"{path}: [proxy] tls_cert_file: {e}", file=sys.stderr)
            return 1
    print("ok")
    return 0


def kubeconfig(path: str) -> int:
    """
    Write the ``[kubeconfig] path`` for the file at ``path``; return the exit status.
    """
    from banyan_kproxy.connect.kubeconfig import KubeconfigError, write_kubeconfig

    try:
        written = write_kubeconfig(load_config(path))
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except KubeconfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


def credential(path: str, print_token: bool) -> int:
    """
    Be kubectl's exec credential plugin for the file at ``path``; return the exit status.
    """
    from banyan_kproxy.connect.credential import credential_command

    try:
        config = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"banyan-kproxy credential: {problem}", file=sys.stderr)
        return 1
    if config.oidc_client is None:
        print(f"banyan-kproxy credential: {path}: no [oidc_client] section: it says where "
              "ID tokens come from", file=sys.stderr)
        return 1
    return credential_command(config.oidc_client, print_token)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banyan-kproxy",
        description="Zero-trust OIDC access to Kubernetes API servers. "
        "Run the daemon with: twistd -n banyan-kproxy --config FILE",
    )
    parser.add_argument("--version", action="version", version=f"banyan-kproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", help="the INI file")
    kube = commands.add_parser(
        "kubeconfig",
        help="write the [kubeconfig] path (default ~/.kube/banyan): the cluster through the "
        "local connect service, with this program as kubectl's credential plugin",
    )
    kube.add_argument("--config", required=True, metavar="FILE", help="the INI file")
    cred = commands.add_parser(
        "credential",
        help="kubectl's exec credential plugin: print an ExecCredential with a fresh ID token",
    )
    cred.add_argument("--config", required=True, metavar="FILE", help="the INI file")
    cred.add_argument(
        "--print-token",
        action="store_true",
        help="show the ID token's claims (not the token) and its expiry, for troubleshooting",
    )
    demo = commands.add_parser(
        "demo",
        help="run the proxy on loopback with a development issuer, in front of the current "
        "kubeconfig's cluster or a built-in stand-in",
    )
    demo.add_argument("--dir", default=".demo", help="where certificates and files go (default .demo)")
    demo.add_argument(
        "--stand-in",
        action="store_true",
        help="always use the built-in Kubernetes API stand-in, even when a cluster answers",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line; return the exit status.
    """
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "kubeconfig":
        return kubeconfig(args.config)
    if args.command == "credential":
        return credential(args.config, args.print_token)
    if args.command == "demo":
        from banyan_kproxy.demo import run_demo

        return run_demo(args.dir, force_stand_in=args.stand_in)
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
