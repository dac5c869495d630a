"""
Fresh ID tokens for kubectl: the exec credential plugin ``banyan-kproxy credential``.

kubectl runs the plugin named in the kubeconfig's ``users[].user.exec`` whenever it
holds no unexpired credential, and reads one ``client.authentication.k8s.io/v1``
``ExecCredential`` from its standard output (``status.token``,
``status.expirationTimestamp``).  The plugin answers from a cache file (0600) while
the cached ID token is fresh; otherwise it takes an exclusive ``flock`` on a lock
file beside the cache (so that many kubectl processes started at once refresh only
once), looks again, and if still needed runs the OAuth 2.0 refresh-token grant at
the token endpoint the issuer's discovery document names.  A refresh token the
issuer rotates is saved back atomically (0600) before the new ID token is cached.

A refresh token the issuer refuses, a wrong client id, an unreachable issuer: each
is a `CredentialError` whose message tells the user what to do, printed as such,
never a traceback.  Tokens are never printed except as the ExecCredential itself.
"""

from __future__ import annotations

import base64
import datetime
import errno
import fcntl
import hashlib
import json
import os
import sys
from typing import IO, Any
from urllib.parse import quote_plus, urlsplit

import attr
import jwt
from attr import define, frozen
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater

from banyan_kproxy.config import OIDCClientConfig
from banyan_kproxy.connect.files import write_private_file

#: The ExecCredential API kubectl >= 1.22 speaks (and the kubeconfig names).
EXEC_API_VERSION = "client.authentication.k8s.io/v1"

#: The default cache file is the refresh token file's name with this appended.
CACHE_SUFFIX = ".id-token.json"

#: What to tell a user whose refresh token was refused (seed, Step 1.2).
NEW_REFRESH_TOKEN = (
    "Get a new refresh token (Banyan Command Center: your initials > My Profile > "
    "Refresh Token), save it in {path}, and run kubectl again."
)


class CredentialError(Exception):
    """
    A problem the user can fix; the message says what happened and what to do.
    """


@frozen
class CachedToken:
    """
    An ID token as cached: when it expires and when it was obtained (POSIX seconds),
    whom it was obtained from, and a fingerprint of the refresh token that got it (so
    that replacing the refresh token file invalidates the cache).
    """

    id_token: str
    expiry: float
    obtained: float
    issuer_url: str
    client_id: str
    refresh_fingerprint: str

    def fresh_until(self, refresh_before: float) -> float:
        """
        Until when the token is handed out: ``refresh_before`` before it expires, or
        halfway through its life when it lives shorter than twice that.
        """
        margin = min(refresh_before, max(0.0, self.expiry - self.obtained) / 2)
        return self.expiry - margin

    def to_json(self) -> bytes:
        """
        The cache file's content.
        """
        return json.dumps(attr.asdict(self), indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> CachedToken | None:
        """
        The cached token in ``data``, or None when it is not a cache file's content.
        """
        try:
            values = json.loads(data)
            return cls(
                id_token=str(values["id_token"]),
                expiry=float(values["expiry"]),
                obtained=float(values["obtained"]),
                issuer_url=str(values["issuer_url"]),
                client_id=str(values["client_id"]),
                refresh_fingerprint=str(values["refresh_fingerprint"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


def fingerprint(refresh_token: str) -> str:
    """
    A short digest that tells refresh tokens apart without revealing them.
    """
    return hashlib.sha256(refresh_token.encode("utf-8")).hexdigest()[:16]


def cache_path(config: OIDCClientConfig) -> str:
    """
    The ID token cache file: ``cache_file``, or beside the refresh token file.
    """
    return config.cache_file or (config.refresh_token_file + CACHE_SUFFIX)


def lock_path(config: OIDCClientConfig) -> str:
    """
    The file locked while a refresh is under way: the cache file's name plus ``.lock``.
    """
    return cache_path(config) + ".lock"


def rfc3339(seconds: float) -> str:
    """
    A POSIX time as RFC 3339 UTC with whole seconds (``2024-05-01T10:00:00Z``).
    """
    moment = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def exec_credential(token: CachedToken, refresh_before: float) -> dict[str, Any]:
    """
    The ``ExecCredential`` kubectl reads: the token and when to ask again.
    """
    return {
        "apiVersion": EXEC_API_VERSION,
        "kind": "ExecCredential",
        "spec": {},
        "status": {
            "token": token.id_token,
            "expirationTimestamp": rfc3339(token.fresh_until(refresh_before)),
        },
    }


def unverified_claims(id_token: str) -> dict[str, Any]:
    """
    The claims of ``id_token`` without checking its signature (the proxy does that).

    @raise CredentialError: when it is not a JWT.
    """
    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise CredentialError(f"the identity provider returned an ID token that is not a JWT ({e})") from None
    if not isinstance(claims, dict):
        raise CredentialError("the identity provider returned an ID token whose claims are not an object")
    return claims


def describe_claims(id_token: str, now: float) -> str:
    """
    What ``--print-token`` shows: the token's header and claims (never the token),
    its lifetime, and what the proxy checks (seed, "Common Issues").
    """
    header = jwt.get_unverified_header(id_token)
    claims = unverified_claims(id_token)
    lines = [
        "The ID token kubectl is given (the token itself is not shown).",
        "header: " + json.dumps({k: header[k] for k in ("alg", "kid", "typ") if k in header}),
        "claims:",
        json.dumps(claims, indent=2, sort_keys=True),
    ]
    exp = claims.get("exp")
    if isinstance(exp, int | float):
        left = exp - now
        state = f"valid for {int(left)}s more" if left > 0 else f"EXPIRED {int(-left)}s ago"
        lines.append(f"expires: {rfc3339(exp)} ({state})")
    lines.append(
        "The proxy accepts it only when `iss` equals its [oidc] issuer_url and `aud` holds "
        "its [oidc] client_id; the user name comes from its username_claim (e.g. email) "
        "and the groups from its groups_claim (e.g. roles)."
    )
    return "\n".join(lines)


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return cleaned[:limit]


@define
class TokenSource:
    """
    ID tokens for ``config``'s client: cached, refreshed under a lock.

    ``http`` is a treq ``HTTPClient`` (or ``StubTreq``); ``clock`` bounds every
    request with ``request_timeout`` and the wait for the lock with ``lock_timeout``.
    """

    config: OIDCClientConfig
    http: Any
    clock: Any
    request_timeout: float = 30.0
    lock_timeout: float = 60.0
    lock_poll: float = 0.05
    #: Refreshes this object made (tests count them).
    refreshes: int = 0

    async def get(self) -> CachedToken:
        """
        A fresh ID token: from the cache, or by a refresh (at most one at a time
        across processes sharing the cache).
        """
        refresh_token = self.read_refresh_token()
        cached = self.cached(refresh_token)
        if cached is not None:
            return cached
        fd = await self._lock()
        try:
            # Another process may have refreshed while this one waited.
            refresh_token = self.read_refresh_token()
            cached = self.cached(refresh_token)
            if cached is not None:
                return cached
            token = await self.refresh(refresh_token)
            self._write_cache(token)
            return token
        finally:
            os.close(fd)

    def read_refresh_token(self) -> str:
        """
        The refresh token from ``refresh_token_file`` (surrounding white space removed).
        """
        path = self.config.refresh_token_file
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialError(f"cannot read the refresh token file {path}: {e}") from None
        if not token:
            raise CredentialError(
                f"the refresh token file {path} is empty. " + NEW_REFRESH_TOKEN.format(path=path)
            )
        return token

    def cached(self, refresh_token: str) -> CachedToken | None:
        """
        The cached token, if it is still fresh and was obtained for this issuer,
        client and refresh token.
        """
        try:
            with open(cache_path(self.config), "rb") as f:
                token = CachedToken.from_json(f.read())
        except OSError:
            return None
        if token is None:
            return None
        if (token.issuer_url, token.client_id, token.refresh_fingerprint) != (
            self.config.issuer_url, self.config.client_id, fingerprint(refresh_token),
        ):
            return None
        if self.clock.seconds() >= token.fresh_until(self.config.refresh_before):
            return None
        return token

    async def refresh(self, refresh_token: str) -> CachedToken:
        """
        Run the refresh-token grant; save a rotated refresh token; return the new ID token.
        """
        endpoint, auth_methods = await self._token_endpoint()
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                "client_id": self.config.client_id}
        headers = {b"Accept": [b"application/json"]}
        secret = self._client_secret()
        if secret is not None:
            if "client_secret_basic" in auth_methods or "client_secret_post" not in auth_methods:
                pair = f"{quote_plus(self.config.client_id)}:{quote_plus(secret)}"
                headers[b"Authorization"] = [b"Basic " + base64.b64encode(pair.encode("utf-8"))]
            else:
                form["client_secret"] = secret
        code, body = await self._call("the token endpoint", endpoint, "POST", data=form, headers=headers)
        self.refreshes += 1
        if code != 200:
            raise self._refused(endpoint, code, body)
        try:
            answer = json.loads(body)
            id_token = answer["id_token"]
            if not isinstance(id_token, str) or not id_token:
                raise TypeError("id_token is not a string")
        except (ValueError, TypeError, KeyError):
            raise CredentialError(
                f"the token endpoint {endpoint} answered without an id_token: is the client "
                f"{self.config.client_id!r} allowed the openid scope?"
            ) from None
        now = self.clock.seconds()
        claims = unverified_claims(id_token)
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            expires_in = answer.get("expires_in")
            exp = now + float(expires_in) if isinstance(expires_in, int | float) else now
        rotated = answer.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != refresh_token:
            path = self.config.refresh_token_file
            try:
                write_private_file(path, rotated.encode("utf-8") + b"\n")
            except OSError as e:
                raise CredentialError(
                    f"the identity provider rotated the refresh token but {path} cannot be "
                    f"written ({e.strerror or e}); the old one is no longer valid. "
                    + NEW_REFRESH_TOKEN.format(path=path)
                ) from None
            refresh_token = rotated
        return CachedToken(
            id_token=id_token,
            expiry=float(exp),
            obtained=now,
            issuer_url=self.config.issuer_url,
            client_id=self.config.client_id,
            refresh_fingerprint=fingerprint(refresh_token),
        )

    def _client_secret(self) -> str | None:
        path = self.config.client_secret_file
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialError(f"cannot read the client secret file {path}: {e}") from None

    async def _token_endpoint(self) -> tuple[str, list[str]]:
        issuer = self.config.issuer_url
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        code, body = await self._call("the issuer's discovery document", url, "GET")
        if code != 200:
            raise CredentialError(
                f"the identity provider's discovery document {url} answered HTTP {code}: "
                "check [oidc_client] issuer_url"
            )
        try:
            document = json.loads(body)
            endpoint = document["token_endpoint"]
            named = document.get("issuer")
        except (ValueError, TypeError, KeyError):
            raise CredentialError(f"{url} is not an OpenID discovery document with a token_endpoint") from None
        if named != issuer:
            raise CredentialError(
                f"the identity provider at {url} calls itself {named!r}, not {issuer!r}: set "
                f"[oidc_client] issuer_url = {named} (and the proxy's [oidc] issuer_url likewise)"
            )
        if not isinstance(endpoint, str) or urlsplit(endpoint).scheme != "https":
            raise CredentialError(f"the token_endpoint in {url} is not an https:// URL: {endpoint!r}")
        methods = document.get("token_endpoint_auth_methods_supported") or []
        return endpoint, [m for m in methods if isinstance(m, str)]

    async def _call(self, what: str, url: str, method: str, **kwargs: Any) -> tuple[int, bytes]:
        import treq

        async def call() -> tuple[int, bytes]:
            response = await self.http.request(method, url, **kwargs)
            return response.code, await treq.content(response)

        attempt = Deferred.fromCoroutine(call())
        attempt.addTimeout(self.request_timeout, self.clock)
        try:
            return await attempt
        except (TimeoutError, CancelledError):
            raise CredentialError(
                f"no answer from {what} at {url} within {self.request_timeout:g}s"
            ) from None
        except Exception as e:  # noqa: BLE001 - network errors become one readable line
            raise CredentialError(f"cannot reach {what} at {url}: {_printable(str(e))}") from None

    def _refused(self, endpoint: str, code: int, body: bytes) -> CredentialError:
        try:
            answer = json.loads(body)
            error = str(answer.get("error", ""))
            description = str(answer.get("error_description", ""))
        except (ValueError, AttributeError):
            error, description = "", ""
        detail = _printable(f"{error}: {description}" if description else error) or f"HTTP {code}"
        path = self.config.refresh_token_file
        if error == "invalid_grant":
            return CredentialError(
                f"the identity provider refused the refresh token in {path} ({detail}): it has "
                "expired or been revoked. " + NEW_REFRESH_TOKEN.format(path=path)
            )
        if error in ("invalid_client", "unauthorized_client") or code == 401:
            return CredentialError(
                f"the identity provider refused the client ({detail}): check [oidc_client] "
                f"client_id ({self.config.client_id!r}) and client_secret_file"
            )
        return CredentialError(f"the token endpoint {endpoint} answered HTTP {code} ({detail}); try again later")

    async def _lock(self) -> int:
        path = lock_path(self.config)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise CredentialError(
                f"cannot create the lock file {path} ({e.strerror or e}): set [oidc_client] "
                "cache_file to a writable place"
            ) from None
        deadline = self.clock.seconds() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise CredentialError(f"cannot lock {path}: {e.strerror or e}") from None
            if self.clock.seconds() >= deadline:
                os.close(fd)
                raise CredentialError(
                    f"another banyan-kproxy credential has held {path} for over "
                    f"{self.lock_timeout:g}s; try again"
                )
            await deferLater(self.clock, self.lock_poll, lambda: None)

    def _write_cache(self, token: CachedToken) -> None:
        path = cache_path(self.config)
        try:
            write_private_file(path, token.to_json())
        except OSError as e:
            raise CredentialError(
                f"cannot write the token cache {path} ({e.strerror or e}): set [oidc_client] "
                "cache_file to a writable place"
            ) from None


async def run_credential(
    source: TokenSource, print_token: bool, out: IO[str], err: IO[str]
) -> int:
    """
    Print the ExecCredential (or, with ``print_token``, the token's claims) to
    ``out``; a `CredentialError` goes to ``err`` as one message.  The exit status.
    """
    try:
        token = await source.get()
        if print_token:
            out.write(describe_claims(token.id_token, source.clock.seconds()) + "\n")
        else:
            out.write(json.dumps(exec_credential(token, source.config.refresh_before)) + "\n")
        out.flush()
    except CredentialError as e:
        err.write(f"banyan-kproxy credential: {e}\n")
        err.flush()
        return 1
    return 0


def credential_command(config: OIDCClientConfig, print_token: bool) -> int:
    """
    ``banyan-kproxy credential``: run `run_credential` on a reactor of its own and
    return the exit status.
    """
    from treq.client import HTTPClient
    from twisted.internet import reactor
    from twisted.internet.task import react
    from twisted.web.client import Agent, HTTPConnectionPool

    from banyan_kproxy.tls import TLSConfigError, https_policy

    try:
        policy = https_policy(config.ca_file)
    except TLSConfigError as e:
        sys.stderr.write(f"banyan-kproxy credential: [oidc_client] ca_file: {e}\n")
        return 1
    status = []

    def main(reactor: Any) -> Deferred[None]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        source = TokenSource(config, http, reactor)
        return Deferred.fromCoroutine(run_credential(source, print_token, sys.stdout, sys.stderr)).addCallback(
            status.append
        )

    try:
        react(main, [], _reactor=reactor)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return status[0] if status else 1
