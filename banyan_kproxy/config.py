"""
The INI configuration: parsed into frozen attrs values, validated before anything listens.

One file, ``configparser`` with ``interpolation=None``, UTF-8.  Unknown sections and
keys are errors.  Every problem is a `ConfigError` naming the file, the section and the
key.  No other module touches ``configparser``.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Iterator, Mapping

import attr
from attr import frozen


class ConfigError(Exception):
    """
    One or more problems with a configuration file, each naming file, section and key.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@frozen
class Address:
    """
    A host and port to listen on or connect to.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


#: ``[proxy] drain_timeout`` when not set, seconds.
DEFAULT_DRAIN_TIMEOUT = 20.0


@frozen
class ProxyConfig:
    """
    ``[proxy]``: the TLS endpoint kubectl talks to.
    """

    listen: Address
    tls_cert_file: str
    tls_key_file: str
    health_listen: Address | None = None
    reuse_port: bool = False
    # On stop (SIGTERM): how long requests in flight and tunnels may take to finish.
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT


@frozen
class OIDCConfig:
    """
    ``[oidc]``: how ID tokens are verified and mapped to a Kubernetes identity.
    """

    issuer_url: str
    client_id: str
    username_claim: str = "sub"
    username_prefix: str = ""
    groups_claim: str = ""
    groups_prefix: str = ""
    signing_algs: tuple[str, ...] = ("RS256",)
    required_claims: tuple[tuple[str, str], ...] = ()
    ca_file: str | None = None
    # How often the JWKS is re-fetched, and the least time between two
    # fetches caused by unknown key ids (so forged kids cannot hammer the issuer).
    jwks_refresh_interval: float = 3600.0
    jwks_min_refetch_interval: float = 10.0
    # Leeway for exp / nbf / iat, seconds.
    leeway: float = 30.0
    # Entries in the verified-token cache.
    token_cache_size: int = 10000


@frozen
class UpstreamConfig:
    """
    ``[upstream]``: the real kube-apiserver and the proxy's own credential for it.
    """

    server: str
    ca_file: str | None = None
    token_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    # Longest wait for response headers; watches and other long-running
    # requests are not limited once their headers arrive.
    response_header_timeout: float = 120.0
    connect_timeout: float = 10.0
    # Persistent connections kept per upstream host (at least the expected concurrency).
    max_connections: int = 256
    # How often ``GET /readyz`` checks that the apiserver answers, for ``/ready``
    # and ``/metrics``; 0 = only what requests see.
    probe_interval: float = 5.0


@frozen
class ImpersonationConfig:
    """
    ``[impersonation]``: what is added to the impersonated identity.
    """

    client_ip: bool = False
    extra: tuple[tuple[str, str], ...] = ()
    allow_client_impersonation: bool = False


@frozen
class TokenPassthroughConfig:
    """
    ``[token_passthrough]``: tokens that are not this issuer's ID tokens are checked
    with a TokenReview at the apiserver and, if valid, forwarded as they are.
    """

    enabled: bool = False
    audiences: tuple[str, ...] = ()
    # How long a TokenReview answer is remembered, and how many entries.
    cache_ttl: float = 10.0
    cache_size: int = 10000
    # TokenReview calls per second (sustained) and in a burst, for all callers together.
    review_qps: float = 20.0
    review_burst: int = 40


@frozen
class AuditConfig:
    """
    ``[audit]``: audit events for every request, batched to the configured sinks.
    """

    policy_file: str | None = None
    webhook_config_file: str | None = None
    log_file: str | None = None
    spool_dir: str = "/var/lib/banyan-kproxy/audit"
    spool_max_bytes: int = 1 << 30
    batch_max_wait: float = 300.0
    batch_max_size: int = 400
    batch_buffer_size: int = 10000
    batch_throttle_qps: float = 4.0
    batch_throttle_burst: int = 4
    initial_backoff: float = 30.0
    truncate_enabled: bool = True
    truncate_max_event_size: int = 100 * 1024
    truncate_max_batch_size: int = 10 * 1024 * 1024


@frozen
class BanyanConfig:
    """
    ``[banyan]``: audit events to the Banyan REST API.
    """

    service_name: str
    refresh_token_file: str
    restapi_url: str = "https://net.banyanops.com"
    events_path: str = "/api/v1/kube_audit_events"


@frozen
class GatewayService:
    """
    One registered service of the gateway: a domain the devices ask for, the
    backend it is dialled at ("backend DNS override"), and optionally which client
    identities may use it.
    """

    domain: str
    port: int
    backend: Address
    # fnmatch patterns matched (case-insensitively) against the client
    # certificate's subject CN and its DNS / email SANs; empty: every trusted client.
    clients: tuple[str, ...] = ()


@frozen
class GatewayConfig:
    """
    ``[gateway]``: the edge access tier, an mTLS CONNECT terminator.
    """

    listen: Address
    tls_cert_file: str
    tls_key_file: str
    client_ca_file: str
    services: tuple[GatewayService, ...]
    reuse_port: bool = False
    health_listen: Address | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0
    max_connections_per_client: int = 64
    max_connections: int = 10000
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT


@frozen
class ConnectConfig:
    """
    ``[connect]``: the device-side CONNECT proxy kubectl reaches through ``proxy-url``.
    """

    listen: Address = Address("127.0.0.1", 8443)
    # http://host:port or https://host:port (optionally user:password@); None: direct.
    next_hop: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    ca_file: str | None = None
    allow: tuple[tuple[str, int], ...] = ()
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0


@frozen
class OIDCClientConfig:
    """
    ``[oidc_client]``: where the device gets ID tokens for kubectl (refresh-token grant).
    """

    issuer_url: str
    client_id: str
    refresh_token_file: str
    client_secret_file: str | None = None
    ca_file: str | None = None
    # Where the current ID token is cached (0600); default beside the refresh token.
    cache_file: str | None = None
    # A cached token is refreshed this long before it expires.
    refresh_before: float = 60.0


#: Kubernetes object-name rule for cluster names (seed, "Common Issues").
CLUSTER_NAME_RULE = "at most 63 characters, only lowercase letters, digits and '-'"


@frozen
class KubeconfigConfig:
    """
    ``[kubeconfig]``: the kubeconfig ``banyan-kproxy kubeconfig`` writes.
    """

    server: str
    path: str = "~/.kube/banyan"
    cluster_name: str = "testcluster"
    ca_file: str | None = None


@frozen
class Config:
    """
    A whole validated configuration file.
    """

    path: str
    proxy: ProxyConfig | None = None
    oidc: OIDCConfig | None = None
    upstream: UpstreamConfig | None = None
    impersonation: ImpersonationConfig = attr.Factory(ImpersonationConfig)
    token_passthrough: TokenPassthroughConfig = attr.Factory(TokenPassthroughConfig)
    audit: AuditConfig | None = None
    banyan: BanyanConfig | None = None
    gateway: GatewayConfig | None = None
    connect: ConnectConfig | None = None
    oidc_client: OIDCClientConfig | None = None
    kubeconfig: KubeconfigConfig | None = None


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

#: Signing algorithms an operator may allow: asymmetric only; never ``none`` or HMAC.
ALLOWED_SIGNING_ALGS = frozenset(
    f"{family}{bits}" for family in ("RS", "ES", "PS") for bits in (256, 384, 512)
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Problem(Exception):
    """
    A single key's value is wrong; the message says why.
    """


def parse_duration(text: str) -> float:
    """
    ``300s``, ``5m``, ``250ms``, ``1h`` or a bare number of seconds, as seconds.
    """
    match = _DURATION.match(text)
    if match is None:
        raise _Problem(f"{text!r} is not a duration (a number with ms, s, m or h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_bool(text: str) -> bool:
    """
    ``true``/``false`` (also yes/no, on/off, 1/0).
    """
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _Problem(f"{text!r} is not true or false")


def parse_address(text: str) -> Address:
    """
    ``host:port`` or ``[v6-host]:port``.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Problem(f"{text!r} is not [ipv6-address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise _Problem(f"{text!r} is not host:port (use [addr]:port for IPv6)")
    if not host:
        raise _Problem(f"{text!r} has no host")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _Problem(f"{text!r} has no valid port (0-65535)")
    return Address(host, int(port))


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """
    ``k=v, k2=v2`` as ordered pairs; a key may repeat.
    """
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise _Problem(f"{item!r} is not key=value")
        pairs.append((key, value))
    return tuple(pairs)


def parse_list(text: str) -> tuple[str, ...]:
    """
    A comma- or whitespace-separated list.
    """
    return tuple(part for part in re.split(r"[,\s]+", text.strip()) if part)


def parse_https_url(text: str) -> str:
    """
    An ``https://`` URL with a host.
    """
    text = text.strip()
    if not re.match(r"^https://[^/\s?#]+", text):
        raise _Problem(f"{text!r} is not an https:// URL")
    return text


def parse_positive_int(text: str) -> int:
    """
    A whole number of at least 1.
    """
    if not text.strip().isdigit() or int(text) < 1:
        raise _Problem(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _readable_file(path: str, base: str) -> str:
    path = os.path.expanduser(path.strip())
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(base)), path)
    if not os.path.isfile(path):
        raise _Problem(f"file {path} does not exist")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _Problem(f"file {path} cannot be read: {e.strerror}") from None
    return path


class _Section:
    """
    Reads one section's keys, collecting problems instead of stopping at the first.
    """

    def __init__(self, loader: _Loader, name: str, known: set[str]) -> None:
        self._loader = loader
        self.name = name
        self._values: Mapping[str, str] = loader.parser[name] if loader.parser.has_section(name) else {}
        for key in self._values:
            if key not in known:
                self.problem(key, f"unknown key (known keys: {', '.join(sorted(known))})")

    def problem(self, key: str, message: str) -> None:
        self._loader.problems.append(f"{self._loader.path}: [{self.name}] {key}: {message}")

    def raw(self, key: str) -> str | None:
        """
        The stripped value, or None when the key is absent or empty.
        """
        value = self._values.get(key)
        if value is None or not value.strip():
            return None
        return value.strip()

    def get(self, key: str, parse: Callable[[str], object], default: object = None, required: bool = False) -> object:
        value = self.raw(key)
        if value is None:
            if required:
                self.problem(key, "is required")
            return default
        try:
            return parse(value)
        except _Problem as e:
            self.problem(key, str(e))
            return default

    def file(self, key: str, required: bool = False) -> str | None:
        return self.get(key, lambda v: _readable_file(v, self._loader.path), required=required)  # type: ignore[return-value]


class _Loader:
    def __init__(self, path: str, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.parser = parser
        self.problems: list[str] = []

    def section(self, name: str, known: set[str]) -> _Section:
        return _Section(self, name, known)


_SECTIONS: dict[str, set[str]] = {
    "proxy": {"listen", "tls_cert_file", "tls_key_file", "health_listen", "reuse_port", "drain_timeout"},
    "oidc": {
        "issuer_url", "client_id", "username_claim", "username_prefix", "groups_claim",
        "groups_prefix", "signing_algs", "required_claims", "ca_file",
        "jwks_refresh_interval", "jwks_min_refetch_interval", "leeway", "token_cache_size",
    },
    "upstream": {
        "server", "ca_file", "token_file", "client_cert_file", "client_key_file",
        "response_header_timeout", "connect_timeout", "max_connections", "probe_interval",
    },
    "impersonation": {"client_ip", "extra", "allow_client_impersonation"},
    "token_passthrough": {
        "enabled", "audiences", "cache_ttl", "cache_size", "review_qps", "review_burst",
    },
    "audit": {
        "policy_file", "webhook_config_file", "log_file", "spool_dir", "spool_max_bytes",
        "batch_max_wait", "batch_max_size", "batch_buffer_size", "batch_throttle_qps",
        "batch_throttle_burst", "initial_backoff", "truncate_enabled",
        "truncate_max_event_size", "truncate_max_batch_size",
    },
    "banyan": {"service_name", "refresh_token_file", "restapi_url", "events_path"},
    "gateway": {
        "listen", "tls_cert_file", "tls_key_file", "client_ca_file", "services", "reuse_port",
        "health_listen", "connect_timeout", "idle_timeout", "max_connections_per_client",
        "max_connections", "drain_timeout",
    },
    "connect": {
        "listen", "next_hop", "client_cert_file", "client_key_file", "ca_file", "allow",
        "connect_timeout", "idle_timeout",
    },
    "oidc_client": {
        "issuer_url", "client_id", "client_secret_file", "refresh_token_file", "ca_file",
        "cache_file", "refresh_before",
    },
    "kubeconfig": {"path", "cluster_name", "server", "ca_file"},
}

#: The sections that make the daemon run something.
ROLES = ("proxy", "gateway", "connect")

#: Where an in-cluster pod finds its service account.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _parse_algs(text: str) -> tuple[str, ...]:
    algs = parse_list(text)
    bad = [a for a in algs if a not in ALLOWED_SIGNING_ALGS]
    if bad:
        raise _Problem(
            f"{', '.join(bad)} not allowed; choose from {', '.join(sorted(ALLOWED_SIGNING_ALGS))}"
            " (none and HMAC are never accepted)"
        )
    if not algs:
        raise _Problem("no algorithm given")
    return algs


def _header_safe(text: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in text) and text == text.strip()


def _parse_extra(text: str) -> tuple[tuple[str, str], ...]:
    pairs = parse_pairs(text)
    for key, value in pairs:
        if not _header_safe(key) or not _header_safe(value):
            raise _Problem(f"{key}={value} must be printable ASCII")
    return pairs


def _proxy(loader: _Loader) -> ProxyConfig | None:
    if not loader.parser.has_section("proxy"):
        return None
    s = loader.section("proxy", _SECTIONS["proxy"])
    listen = s.get("listen", parse_address, required=True)
    cert = s.file("tls_cert_file", required=True)
    key = s.file("tls_key_file", required=True)
    health = s.get("health_listen", parse_address)
    reuse = s.get("reuse_port", parse_bool, default=False)
    drain = s.get("drain_timeout", parse_duration, default=DEFAULT_DRAIN_TIMEOUT)
    if listen is None or cert is None or key is None:
        return None
    return ProxyConfig(listen, cert, key, health, reuse, drain)  # type: ignore[arg-type]


def _oidc(loader: _Loader) -> OIDCConfig | None:
    if not loader.parser.has_section("oidc"):
        return None
    s = loader.section("oidc", _SECTIONS["oidc"])
    defaults = OIDCConfig("https://x", "x")
    issuer = s.get("issuer_url", parse_https_url, required=True)
    client_id = s.get("client_id", str, required=True)
    values = {
        "username_claim": s.get("username_claim", str, defaults.username_claim),
        "username_prefix": s._values.get("username_prefix", "").strip(),
        "groups_claim": s.get("groups_claim", str, defaults.groups_claim),
        "groups_prefix": s._values.get("groups_prefix", "").strip(),
        "signing_algs": s.get("signing_algs", _parse_algs, defaults.signing_algs),
        "required_claims": s.get("required_claims", parse_pairs, ()),
        "ca_file": s.file("ca_file"),
        "jwks_refresh_interval": s.get("jwks_refresh_interval", parse_duration, defaults.jwks_refresh_interval),
        "jwks_min_refetch_interval": s.get(
            "jwks_min_refetch_interval", parse_duration, defaults.jwks_min_refetch_interval
        ),
        "leeway": s.get("leeway", parse_duration, defaults.leeway),
        "token_cache_size": s.get("token_cache_size", parse_positive_int, defaults.token_cache_size),
    }
    for key in ("username_prefix", "groups_prefix"):
        if not _header_safe(values[key]):  # type: ignore[arg-type]
            s.problem(key, "must be printable ASCII without surrounding spaces")
    if issuer is None or client_id is None:
        return None
    return OIDCConfig(issuer, client_id, **values)  # type: ignore[arg-type]


def _upstream(loader: _Loader, environ: Mapping[str, str], sa_dir: str) -> UpstreamConfig | None:
    if not loader.parser.has_section("upstream"):
        return None
    s = loader.section("upstream", _SECTIONS["upstream"])
    server = s.get("server", parse_https_url)
    token_file = s.file("token_file")
    cert = s.file("client_cert_file")
    key = s.file("client_key_file")
    ca_file = s.file("ca_file")
    defaults = UpstreamConfig("https://x")
    timeouts = {
        "response_header_timeout": s.get(
            "response_header_timeout", parse_duration, defaults.response_header_timeout
        ),
        "connect_timeout": s.get("connect_timeout", parse_duration, defaults.connect_timeout),
        "max_connections": s.get("max_connections", parse_positive_int, defaults.max_connections),
        "probe_interval": s.get("probe_interval", parse_duration, defaults.probe_interval),
    }
    if (cert is None) != (key is None) and s.raw("client_cert_file") and s.raw("client_key_file"):
        pass  # one of them failed to read; its problem is already recorded
    elif (s.raw("client_cert_file") is None) != (s.raw("client_key_file") is None):
        s.problem("client_cert_file", "client_cert_file and client_key_file go together")
    if server is None and s.raw("server") is None:
        # In-cluster defaults, as client-go's rest.InClusterConfig.
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            s.problem(
                "server",
                "is empty and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set "
                "(not running in a cluster): set server = https://host:port",
            )
            return None
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        if s.raw("ca_file") is None:
            ca_file = _in_cluster_file(s, "ca_file", os.path.join(sa_dir, "ca.crt"))
        if s.raw("token_file") is None and cert is None:
            token_file = _in_cluster_file(s, "token_file", os.path.join(sa_dir, "token"))
    if server is None:
        return None
    if token_file is None and cert is None and s.raw("token_file") is None and s.raw("client_cert_file") is None:
        s.problem("token_file", "the proxy needs its own credential: set token_file or client_cert_file")
    return UpstreamConfig(server, ca_file, token_file, cert, key, **timeouts)  # type: ignore[arg-type]


def _in_cluster_file(s: _Section, key: str, path: str) -> str | None:
    if not os.path.isfile(path):
        s.problem(key, f"is empty and the in-cluster default {path} does not exist")
        return None
    return path


def _impersonation(loader: _Loader) -> ImpersonationConfig:
    s = loader.section("impersonation", _SECTIONS["impersonation"])
    return ImpersonationConfig(
        client_ip=s.get("client_ip", parse_bool, False),  # type: ignore[arg-type]
        extra=s.get("extra", _parse_extra, ()),  # type: ignore[arg-type]
        allow_client_impersonation=s.get("allow_client_impersonation", parse_bool, False),  # type: ignore[arg-type]
    )


def parse_positive_float(text: str) -> float:
    """
    A number greater than zero.
    """
    try:
        value = float(text)
    except ValueError:
        raise _Problem(f"{text!r} is not a number") from None
    if not value > 0:
        raise _Problem(f"{text!r} must be greater than zero")
    return value


def parse_size(text: str) -> int:
    """
    A byte count with an optional K, M or G (powers of 1024) suffix.
    """
    match = re.match(r"^\s*(\d+)\s*([KMG]i?B?)?\s*$", text, re.IGNORECASE)
    if match is None:
        raise _Problem(f"{text!r} is not a size (bytes, or a number with K, M or G)")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def _token_passthrough(loader: _Loader) -> TokenPassthroughConfig:
    s = loader.section("token_passthrough", _SECTIONS["token_passthrough"])
    d = TokenPassthroughConfig()
    return TokenPassthroughConfig(
        enabled=s.get("enabled", parse_bool, d.enabled),  # type: ignore[arg-type]
        audiences=s.get("audiences", parse_list, d.audiences),  # type: ignore[arg-type]
        cache_ttl=s.get("cache_ttl", parse_duration, d.cache_ttl),  # type: ignore[arg-type]
        cache_size=s.get("cache_size", parse_positive_int, d.cache_size),  # type: ignore[arg-type]
        review_qps=s.get("review_qps", parse_positive_float, d.review_qps),  # type: ignore[arg-type]
        review_burst=s.get("review_burst", parse_positive_int, d.review_burst),  # type: ignore[arg-type]
    )


def _audit(loader: _Loader) -> AuditConfig | None:
    if not loader.parser.has_section("audit"):
        return None
    s = loader.section("audit", _SECTIONS["audit"])
    d = AuditConfig()
    spool_dir = s.raw("spool_dir") or d.spool_dir
    spool_dir = os.path.join(os.path.dirname(os.path.abspath(loader.path)), os.path.expanduser(spool_dir))
    log_file = s.raw("log_file")
    if log_file is not None:
        log_file = os.path.join(os.path.dirname(os.path.abspath(loader.path)), os.path.expanduser(log_file))
    return AuditConfig(
        policy_file=s.file("policy_file"),
        webhook_config_file=s.file("webhook_config_file"),
        log_file=log_file,
        spool_dir=spool_dir,
        spool_max_bytes=s.get("spool_max_bytes", parse_size, d.spool_max_bytes),  # type: ignore[arg-type]
        batch_max_wait=s.get("batch_max_wait", parse_duration, d.batch_max_wait),  # type: ignore[arg-type]
        batch_max_size=s.get("batch_max_size", parse_positive_int, d.batch_max_size),  # type: ignore[arg-type]
        batch_buffer_size=s.get(
            "batch_buffer_size", parse_positive_int, d.batch_buffer_size
        ),  # type: ignore[arg-type]
        batch_throttle_qps=s.get(
            "batch_throttle_qps", parse_positive_float, d.batch_throttle_qps
        ),  # type: ignore[arg-type]
        batch_throttle_burst=s.get(
            "batch_throttle_burst", parse_positive_int, d.batch_throttle_burst
        ),  # type: ignore[arg-type]
        initial_backoff=s.get("initial_backoff", parse_duration, d.initial_backoff),  # type: ignore[arg-type]
        truncate_enabled=s.get("truncate_enabled", parse_bool, d.truncate_enabled),  # type: ignore[arg-type]
        truncate_max_event_size=s.get(
            "truncate_max_event_size", parse_size, d.truncate_max_event_size
        ),  # type: ignore[arg-type]
        truncate_max_batch_size=s.get(
            "truncate_max_batch_size", parse_size, d.truncate_max_batch_size
        ),  # type: ignore[arg-type]
    )


def _banyan(loader: _Loader) -> BanyanConfig | None:
    if not loader.parser.has_section("banyan"):
        return None
    s = loader.section("banyan", _SECTIONS["banyan"])
    d = BanyanConfig("x", "x")
    service_name = s.get("service_name", str, required=True)
    refresh = s.file("refresh_token_file", required=True)
    url = s.get("restapi_url", parse_https_url, d.restapi_url)
    path = s.raw("events_path") or d.events_path
    if not path.startswith("/"):
        s.problem("events_path", f"{path!r} must start with /")
    if service_name is None or refresh is None:
        return None
    return BanyanConfig(service_name, refresh, url, path)  # type: ignore[arg-type]


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def parse_destination(text: str) -> tuple[str, int]:
    """
    ``domain:port`` (or ``[v6]:port``) as a lower-cased host and a port.
    """
    address = parse_address(text)
    host = address.host.lower()
    if ":" not in host and not _DOMAIN.match(host):
        raise _Problem(f"{text!r} does not name a valid host")
    if address.port == 0:
        raise _Problem(f"{text!r} needs a port")
    return host, address.port


def parse_services(text: str) -> tuple[GatewayService, ...]:
    """
    One service per line or comma: ``domain:port=backend-host:port`` with an optional
    `` clients=pattern|pattern``.
    """
    services = []
    seen = set()
    for item in re.split(r"[\n,]+", text):
        item = item.strip()
        if not item:
            continue
        spec, _, options = item.partition(" ")
        target, sep, backend = spec.partition("=")
        if not sep:
            raise _Problem(f"{item!r} is not domain:port=backend-host:port")
        domain, port = parse_destination(target)
        if (domain, port) in seen:
            raise _Problem(f"{domain}:{port} is registered twice")
        seen.add((domain, port))
        clients: tuple[str, ...] = ()
        for option in options.split():
            key, eq, value = option.partition("=")
            if key != "clients" or not eq or not value:
                raise _Problem(f"{option!r} in {item!r}: only clients=pattern|pattern is understood")
            clients = tuple(p for p in value.split("|") if p)
        services.append(GatewayService(domain, port, parse_address(backend), clients))
    if not services:
        raise _Problem("no service given")
    return tuple(services)


def parse_destinations(text: str) -> tuple[tuple[str, int], ...]:
    """
    A list of ``host:port`` destinations.
    """
    return tuple(parse_destination(item) for item in parse_list(text))


def parse_proxy_url(text: str) -> str:
    """
    An ``http://`` or ``https://`` CONNECT proxy URL with a host and port.
    """
    from urllib.parse import urlsplit

    url = urlsplit(text.strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        raise _Problem(f"{text!r} is not an http:// or https:// proxy URL")
    try:
        _ = url.port
    except ValueError:
        raise _Problem(f"{text!r} has an invalid port") from None
    if url.path not in ("", "/") or url.query or url.fragment:
        raise _Problem(f"{text!r} must not have a path, query or fragment")
    return text.strip()


def parse_cluster_name(text: str) -> str:
    """
    A kubeconfig cluster/context name that kubectl can use: Kubernetes object-name
    rules (seed, "Common Issues").
    """
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", text):
        raise _Problem(f"{text!r} is not a valid cluster name: use {CLUSTER_NAME_RULE}")
    return text


def _gateway(loader: _Loader) -> GatewayConfig | None:
    if not loader.parser.has_section("gateway"):
        return None
    s = loader.section("gateway", _SECTIONS["gateway"])
    d = GatewayConfig(Address("x", 1), "", "", "", ())
    listen = s.get("listen", parse_address, required=True)
    cert = s.file("tls_cert_file", required=True)
    key = s.file("tls_key_file", required=True)
    ca = s.file("client_ca_file", required=True)
    services = s.get("services", parse_services, required=True)
    values = {
        "reuse_port": s.get("reuse_port", parse_bool, d.reuse_port),
        "health_listen": s.get("health_listen", parse_address),
        "connect_timeout": s.get("connect_timeout", parse_duration, d.connect_timeout),
        "idle_timeout": s.get("idle_timeout", parse_duration, d.idle_timeout),
        "max_connections_per_client": s.get(
            "max_connections_per_client", parse_positive_int, d.max_connections_per_client
        ),
        "max_connections": s.get("max_connections", parse_positive_int, d.max_connections),
        "drain_timeout": s.get("drain_timeout", parse_duration, d.drain_timeout),
    }
    if None in (listen, cert, key, ca, services):
        return None
    return GatewayConfig(listen, cert, key, ca, services, **values)  # type: ignore[arg-type]


def _connect(loader: _Loader) -> ConnectConfig | None:
    if not loader.parser.has_section("connect"):
        return None
    s = loader.section("connect", _SECTIONS["connect"])
    d = ConnectConfig()
    cert, key = s.file("client_cert_file"), s.file("client_key_file")
    if (s.raw("client_cert_file") is None) != (s.raw("client_key_file") is None):
        s.problem("client_cert_file", "client_cert_file and client_key_file go together")
    next_hop = s.get("next_hop", parse_proxy_url)
    allow = s.get("allow", parse_destinations, ())
    if not allow:
        s.problem("allow", "is required: the destinations this proxy may tunnel to")
    return ConnectConfig(
        listen=s.get("listen", parse_address, d.listen),  # type: ignore[arg-type]
        next_hop=next_hop,  # type: ignore[arg-type]
        client_cert_file=cert,
        client_key_file=key,
        ca_file=s.file("ca_file"),
        allow=allow,  # type: ignore[arg-type]
        connect_timeout=s.get("connect_timeout", parse_duration, d.connect_timeout),  # type: ignore[arg-type]
        idle_timeout=s.get("idle_timeout", parse_duration, d.idle_timeout),  # type: ignore[arg-type]
    )


def _oidc_client(loader: _Loader) -> OIDCClientConfig | None:
    if not loader.parser.has_section("oidc_client"):
        return None
    s = loader.section("oidc_client", _SECTIONS["oidc_client"])
    issuer = s.get("issuer_url", parse_https_url, required=True)
    client_id = s.get("client_id", str, required=True)
    refresh = s.file("refresh_token_file", required=True)
    cache = s.raw("cache_file")
    if cache is not None:
        cache = os.path.join(os.path.dirname(os.path.abspath(loader.path)), os.path.expanduser(cache))
    values = {
        "client_secret_file": s.file("client_secret_file"),
        "ca_file": s.file("ca_file"),
        "cache_file": cache,
        "refresh_before": s.get("refresh_before", parse_duration, 60.0),
    }
    if None in (issuer, client_id, refresh):
        return None
    return OIDCClientConfig(issuer, client_id, refresh, **values)  # type: ignore[arg-type]


def _kubeconfig(loader: _Loader) -> KubeconfigConfig | None:
    if not loader.parser.has_section("kubeconfig"):
        return None
    s = loader.section("kubeconfig", _SECTIONS["kubeconfig"])
    server = s.get("server", parse_https_url, required=True)
    values = {
        "path": os.path.expanduser(s.raw("path") or "~/.kube/banyan"),
        "cluster_name": s.get("cluster_name", parse_cluster_name, "testcluster"),
        "ca_file": s.file("ca_file"),
    }
    if server is None:
        return None
    return KubeconfigConfig(server, **values)  # type: ignore[arg-type]


def _read(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, inline_comment_prefixes=(";", "#"))
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except FileNotFoundError:
        raise ConfigError([f"{path}: the configuration file does not exist"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: is not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except configparser.Error as e:
        message = " ".join(str(e).split())
        raise ConfigError([f"{path}: {message}"]) from None
    return parser


def load_config(
    path: str,
    environ: Mapping[str, str] | None = None,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> Config:
    """
    Read and validate the INI file at ``path``.

    @raise ConfigError: listing every problem, each naming file, section and key.
    """
    parser = _read(path)
    loader = _Loader(path, parser)
    for name in parser.sections():
        if name not in _SECTIONS:
            loader.problems.append(
                f"{path}: [{name}]: unknown section (known sections: {', '.join(_SECTIONS)})"
            )
    proxy = _proxy(loader)
    oidc = _oidc(loader)
    upstream = _upstream(loader, os.environ if environ is None else environ, service_account_dir)
    impersonation = _impersonation(loader)
    token_passthrough = _token_passthrough(loader)
    audit = _audit(loader)
    banyan = _banyan(loader)
    if banyan is not None and audit is None:
        loader.problems.append(f"{path}: [banyan]: needs an [audit] section (the spool and batching)")
    if parser.has_section("proxy"):
        for needed in ("oidc", "upstream"):
            if not parser.has_section(needed):
                loader.problems.append(f"{path}: [{needed}]: section is required with [proxy]")
    gateway = _gateway(loader)
    connect = _connect(loader)
    oidc_client = _oidc_client(loader)
    kubeconfig = _kubeconfig(loader)
    if not any(parser.has_section(role) for role in ROLES) and not (
        parser.has_section("oidc_client") or parser.has_section("kubeconfig")
    ):
        loader.problems.append(
            f"{path}: no role is configured: add a [proxy], [gateway] or [connect] section"
        )
    if loader.problems:
        raise ConfigError(loader.problems)
    return Config(
        path, proxy, oidc, upstream, impersonation, token_passthrough, audit, banyan,
        gateway, connect, oidc_client, kubeconfig,
    )


def iter_sections() -> Iterator[tuple[str, set[str]]]:
    """
    The known sections and their keys, for documentation and tests.
    """
    return iter(_SECTIONS.items())
