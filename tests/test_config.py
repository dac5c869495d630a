"""
Tests for L{banyan_kproxy.config}: the INI contract and its error messages.
"""

from __future__ import annotations

import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.config import (
    Address,
    ConfigError,
    load_config,
    parse_address,
    parse_duration,
)


class ConfigFiles:
    """
    Writes INI files (and the files they name) into a test's temporary directory.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.dir = FilePath(case.mktemp())
        self.dir.makedirs()
        for name in ("tls.crt", "tls.key", "token", "ca.crt"):
            self.dir.child(name).setContent(b"x\n")

    def path(self, name: str) -> str:
        return self.dir.child(name).path

    def write(self, text: str) -> str:
        ini = self.dir.child("kproxy.ini")
        ini.setContent(text.replace("$DIR", self.dir.path).encode("utf-8"))
        return ini.path


MINIMAL = """\
[proxy]
listen = 127.0.0.1:8443
tls_cert_file = $DIR/tls.crt
tls_key_file = $DIR/tls.key

[oidc]
issuer_url = https://example.trust.banyanops.com/v2
client_id = external-services

[upstream]
server = https://10.0.0.1:6443
token_file = $DIR/token
"""


class LoadConfigTests(SynchronousTestCase):
    """
    Tests for L{load_config}.
    """

    def setUp(self) -> None:
        self.files = ConfigFiles(self)

    def problems(self, text: str, **kwargs: object) -> list[str]:
        path = self.files.write(text)
        error = self.assertRaises(ConfigError, load_config, path, **kwargs)
        return error.problems

    def test_minimal(self) -> None:
        """
        The three required sections give a proxy with the documented defaults.
        """
        config = load_config(self.files.write(MINIMAL))
        self.assertEqual(config.proxy.listen, Address("127.0.0.1", 8443))
        self.assertIsNone(config.proxy.health_listen)
        self.assertFalse(config.proxy.reuse_port)
        self.assertEqual(config.oidc.client_id, "external-services")
        self.assertEqual(config.oidc.signing_algs, ("RS256",))
        self.assertEqual(config.oidc.username_claim, "sub")
        self.assertEqual(config.upstream.token_file, self.files.path("token"))
        self.assertFalse(config.impersonation.allow_client_impersonation)

    def test_seed_values(self) -> None:
        """
        The seed's Helm values, written as INI keys, are all understood.
        """
        text = """\
[proxy]
listen = 0.0.0.0:8443
tls_cert_file = $DIR/tls.crt
tls_key_file = $DIR/tls.key
health_listen = 127.0.0.1:8080

[oidc]
issuer_url = https://example.trust.banyanops.com/v2
client_id = external-services
username_claim = email
username_prefix = banyan:
groups_claim = roles
groups_prefix = banyan:
signing_algs = RS256, ES256
required_claims = hd=example.com, tier=gold
ca_file = $DIR/ca.crt

[upstream]
server = https://10.0.0.1:6443
token_file = $DIR/token

[impersonation]
client_ip = true
extra = team=platform, team=sre
"""
        config = load_config(self.files.write(text))
        self.assertEqual(config.oidc.username_prefix, "banyan:")
        self.assertEqual(config.oidc.groups_claim, "roles")
        self.assertEqual(config.oidc.signing_algs, ("RS256", "ES256"))
        self.assertEqual(config.oidc.required_claims, (("hd", "example.com"), ("tier", "gold")))
        self.assertEqual(config.oidc.ca_file, self.files.path("ca.crt"))
        self.assertEqual(config.proxy.health_listen, Address("127.0.0.1", 8080))
        self.assertTrue(config.impersonation.client_ip)
        self.assertEqual(config.impersonation.extra, (("team", "platform"), ("team", "sre")))

    def test_unknown_key(self) -> None:
        """
        An unknown key is named with its file and section.
        """
        path = self.files.write(MINIMAL + "colour = blue\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(len(error.problems), 1)
        self.assertTrue(
            error.problems[0].startswith(f"{path}: [upstream] colour: unknown key"), error.problems
        )

    def test_unknown_section(self) -> None:
        """
        An unknown section is an error.
        """
        problems = self.problems(MINIMAL + "[proxxy]\nlisten = 1.2.3.4:5\n")
        self.assertEqual(len(problems), 1)
        self.assertIn("[proxxy]: unknown section", problems[0])

    def test_missing_file(self) -> None:
        """
        A file that does not exist is named with the key that names it.
        """
        os.remove(self.files.path("tls.key"))
        problems = self.problems(MINIMAL)
        self.assertEqual(
            problems,
            [
                f"{self.files.path('kproxy.ini')}: [proxy] tls_key_file: "
                f"file {self.files.path('tls.key')} does not exist"
            ],
        )

    def test_unreadable_file(self) -> None:
        """
        A file that exists but cannot be read is refused (as a user that is not root).
        """
        if os.getuid() == 0:
            # root reads every file; show the refusal with a directory instead.
            os.remove(self.files.path("token"))
            os.mkdir(self.files.path("token"))
            problems = self.problems(MINIMAL)
            self.assertEqual(len(problems), 1)
            self.assertIn("[upstream] token_file: file", problems[0])
            return
        os.chmod(self.files.path("token"), 0)
        problems = self.problems(MINIMAL)
        self.assertIn("cannot be read", problems[0])

    def test_bad_values_all_reported(self) -> None:
        """
        Every bad value is reported at once, one line each.
        """
        text = (
            MINIMAL.replace("127.0.0.1:8443", "localhost")
            .replace("client_id = external-services", "client_id = x\nsigning_algs = HS256, none\n")
            .replace("server = https://10.0.0.1:6443", "server = http://10.0.0.1:6443")
        ) + "response_header_timeout = soon\n"
        problems = self.problems(text)
        joined = "\n".join(problems)
        self.assertEqual(len(problems), 4, joined)
        self.assertIn("[proxy] listen: 'localhost' is not host:port", joined)
        self.assertIn("[oidc] signing_algs: HS256, none not allowed", joined)
        self.assertIn("[upstream] server: 'http://10.0.0.1:6443' is not an https:// URL", joined)
        self.assertIn("[upstream] response_header_timeout: 'soon' is not a duration", joined)

    def test_probe_interval(self) -> None:
        """
        ``[upstream] probe_interval`` is a duration, 5 s by default, 0 switching the
        probe off; anything else is refused naming the key.
        """
        def interval(text: str) -> float:
            return load_config(self.files.write(text)).upstream.probe_interval

        self.assertEqual(interval(MINIMAL), 5.0)
        self.assertEqual(interval(MINIMAL + "probe_interval = 250ms\n"), 0.25)
        self.assertEqual(interval(MINIMAL + "probe_interval = 0\n"), 0.0)
        self.assertIn(
            "[upstream] probe_interval: 'often' is not a duration",
            "\n".join(self.problems(MINIMAL + "probe_interval = often\n")),
        )

    def test_required_keys(self) -> None:
        """
        Missing required keys are named.
        """
        problems = self.problems("[proxy]\n[oidc]\n[upstream]\nserver = https://k:6443\n")
        joined = "\n".join(problems)
        for key in ("[proxy] listen", "[proxy] tls_cert_file", "[proxy] tls_key_file",
                    "[oidc] issuer_url", "[oidc] client_id"):
            self.assertIn(f"{key}: is required", joined)
        self.assertIn("[upstream] token_file: the proxy needs its own credential", joined)

    def test_no_role(self) -> None:
        """
        A file with no role section says so.
        """
        problems = self.problems("[impersonation]\nclient_ip = false\n")
        self.assertEqual(
            problems,
            [f"{self.files.path('kproxy.ini')}: no role is configured: add a [proxy], [gateway] "
             "or [connect] section"],
        )

    def test_syntax_error(self) -> None:
        """
        A line that is not INI is reported with the file name.
        """
        path = self.files.write("listen = 1\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertTrue(error.problems[0].startswith(path + ": "), error.problems)

    def test_in_cluster_defaults(self) -> None:
        """
        An empty ``server`` takes KUBERNETES_SERVICE_HOST/PORT and the service
        account's CA and token, as client-go's in-cluster configuration does.
        """
        sa = FilePath(self.mktemp())
        sa.makedirs()
        sa.child("ca.crt").setContent(b"ca")
        sa.child("token").setContent(b"tok")
        text = MINIMAL.replace("server = https://10.0.0.1:6443", "server =").replace(
            "token_file = $DIR/token", "token_file ="
        )
        config = load_config(
            self.files.write(text),
            environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            service_account_dir=sa.path,
        )
        self.assertEqual(config.upstream.server, "https://10.96.0.1:443")
        self.assertEqual(config.upstream.ca_file, sa.child("ca.crt").path)
        self.assertEqual(config.upstream.token_file, sa.child("token").path)

    def test_in_cluster_missing(self) -> None:
        """
        An empty ``server`` outside a cluster says how to fix it.
        """
        text = MINIMAL.replace("server = https://10.0.0.1:6443", "server =")
        problems = self.problems(text, environ={})
        self.assertIn("[upstream] server: is empty and KUBERNETES_SERVICE_HOST", problems[0])

    def test_client_certificate_pair(self) -> None:
        """
        A client certificate without its key is refused.
        """
        text = MINIMAL + "client_cert_file = $DIR/tls.crt\n"
        problems = self.problems(text)
        self.assertIn("client_cert_file and client_key_file go together", problems[0])

    def test_relative_paths(self) -> None:
        """
        Relative file paths are taken relative to the INI file's directory.
        """
        config = load_config(self.files.write(MINIMAL.replace("$DIR/tls.crt", "tls.crt")))
        self.assertEqual(config.proxy.tls_cert_file, self.files.path("tls.crt"))


class ParserTests(SynchronousTestCase):
    """
    Tests for the value parsers.
    """

    def test_durations(self) -> None:
        """
        Durations take ms, s, m and h suffixes or bare seconds.
        """
        self.assertEqual(
            [parse_duration(v) for v in ("300s", "5m", "250ms", "1h", "7")],
            [300.0, 300.0, 0.25, 3600.0, 7.0],
        )

    def test_addresses(self) -> None:
        """
        Addresses are host:port, with IPv6 hosts in brackets.
        """
        self.assertEqual(parse_address("0.0.0.0:8443"), Address("0.0.0.0", 8443))
        self.assertEqual(parse_address("[::]:8443"), Address("::", 8443))
        self.assertEqual(str(Address("::1", 80)), "[::1]:80")


class SampleFileTests(SynchronousTestCase):
    """
    The shipped sample configuration, etc/banyan-kproxy/kproxy.ini.
    """

    def sample(self, name: str = "kproxy.ini") -> str:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(here, "etc", "banyan-kproxy", name), encoding="utf-8") as f:
            return f.read()

    def samples(self) -> str:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc",
                            "banyan-kproxy")
        return "\n".join(self.sample(n) for n in sorted(os.listdir(here)) if n.endswith(".ini"))

    def test_documents_every_key(self) -> None:
        """
        Every key the daemon understands is written out (and so documented) in one of
        the sample files (kproxy.ini, gateway.ini, connect.ini); optional sections may
        be commented out.
        """
        from banyan_kproxy.config import iter_sections

        text = self.samples()
        missing = []
        for section, keys in iter_sections():
            # Every block of this section, written out or commented out, in any file.
            blocks = [
                part.partition("\n[")[0].partition("\n;[")[0]
                for marker in (f"\n[{section}]", f"\n;[{section}]")
                for part in text.split(marker)[1:]
            ]
            if not blocks:
                missing.append(f"[{section}]")
                continue
            for key in keys:
                if not any(f"\n{key} =" in b or f"\n;{key} =" in b for b in blocks):
                    missing.append(f"[{section}] {key}")
        self.assertEqual(missing, [])

    def test_loads(self) -> None:
        """
        The sample is a valid configuration once its files exist.
        """
        files = ConfigFiles(self)
        text = self.sample().replace("/etc/banyan-kproxy/", files.dir.path + "/")
        text = text.replace("/var/lib/banyan-kproxy/", files.dir.path + "/")
        for name in ("apiserver-ca.crt", "apiserver.token", "banyan-refresh-token"):
            files.dir.child(name).setContent(b"x\n")
        config = load_config(files.write(text))
        self.assertEqual(config.oidc.issuer_url, "https://example.trust.banyanops.com/v2")
        self.assertEqual(config.oidc.groups_prefix, "banyan:")
