"""
Micro scenarios of issue 8: token verification and the audit pipeline.  A program
that reports, never a test.

**Token verification**, in this process, with the daemon's own
`banyan_kproxy.identity.verifier.OIDCVerifier` (the seed's claim mapping: user from
``email``, groups from ``roles``, both prefixed ``banyan:``) trusting a development
issuer (`banyan_kproxy.testing.issuer.OIDCIssuer`, its JWKS loaded through a
``StubTreq``), for RS256 (RSA 2048) and ES256 (P-256) tokens:

- *uncached*: every check is of a token not seen before (a different ``jti`` each),
  so it pays for parsing, the signature and the claims; baseline: PyJWT's
  ``jwt.decode`` of the same tokens with the key object preloaded (signature,
  ``exp``, ``iss``, ``aud``) — the least a verifier built on PyJWT can cost;
- *cached*: the same token again, through ``verify`` (what the proxy calls: SHA-256
  of the token, a dictionary lookup, ``exp``, a fired ``Deferred``); baseline: a bare
  dictionary lookup.

Each figure is the best of three rounds (as ``timeit`` does), with the garbage
collector left on, as it is in the daemon.

**Audit pipeline**: ``benchmarks/audit_throughput.py`` (`audit_throughput.measure`):
the request-path cost of auditing, events accepted per second into the fsync'd spool,
and events delivered to a loopback webhook, each against its baseline.

Run: ``PYTHONPATH=. python benchmarks/micro.py [--quick] [--only token|audit]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# As bench.py does: this folder and the checkout on sys.path, `report` by its name.
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import report  # noqa: E402

#: The baselines' target names.
PYJWT = "PyJWT decode, preloaded key"
BARE_DICT = "bare dict lookup"

_METRICS = {
    ("RS256", False): report.METRIC_TOKEN_UNCACHED_RS256,
    ("RS256", True): report.METRIC_TOKEN_CACHED_RS256,
    ("ES256", False): report.METRIC_TOKEN_UNCACHED_ES256,
    ("ES256", True): report.METRIC_TOKEN_CACHED_ES256,
}

CLIENT_ID = "external-services"
ROUNDS = 3


def _best_of(rounds: int, batch: Sequence[Any], check: Callable[[Any], Any]) -> float:
    """
    Microseconds per call of ``check`` over ``batch``, the best of ``rounds``.
    """
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for item in batch:
            check(item)
        best = min(best, time.perf_counter() - started)
    return best / len(batch) * 1e6


def _verifier(alg: str) -> tuple[Any, Any]:
    """
    A started `OIDCVerifier` with its keys loaded, and the issuer it trusts.
    """
    from twisted.internet.task import Clock

    from banyan_kproxy.identity.verifier import OIDCVerifier
    from banyan_kproxy.testing.issuer import OIDCIssuer

    issuer = OIDCIssuer("https://issuer.bench.example/v2", alg=alg, fresh_keys=True)
    clock = Clock()
    clock.advance(time.time())  # the issuer stamps tokens with the wall clock
    http = issuer.stub_treq()
    verifier = OIDCVerifier(
        issuer.config(
            client_id=CLIENT_ID, username_claim="email", username_prefix="banyan:",
            groups_claim="roles", groups_prefix="banyan:", signing_algs=(alg,),
        ),
        http,
        clock,
    )
    verifier.start()
    http.flush()
    if not verifier.ready:
        raise RuntimeError(f"the verifier did not load the {alg} JWKS: {verifier.last_error}")
    return verifier, issuer


_serial = itertools.count()


def _tokens(issuer: Any, count: int) -> list[str]:
    """
    ``count`` ID tokens as the Banyan issuer mints them, each with a ``jti`` never
    used before (RS256 signatures are deterministic: equal claims, equal tokens).
    """
    return [
        issuer.token(
            {
                "email": "alice@example.com", "email_verified": True, "jti": f"bench-{next(_serial)}",
                "roles": ["any-employee-personal-device", "all-admins-corporate-device"],
            },
            subject="alice@example.com", audience=CLIENT_ID, expires_in=3600,
        )
        for _ in range(count)
    ]


def token_verification(quick: bool) -> list[Any]:
    """
    Cached and uncached checks of RS256 and ES256 tokens, against their baselines.
    """
    uncached_count = 300 if quick else 2000
    cached_count = 50000 if quick else 200000
    measurements: list[Any] = []
    for alg in ("RS256", "ES256"):
        measurements += _token_checks(alg, uncached_count, cached_count)
    return measurements


def _token_checks(alg: str, uncached_count: int, cached_count: int) -> list[Any]:
    import hashlib

    import jwt

    from banyan_kproxy.identity import VerifiedToken

    verifier, issuer = _verifier(alg)
    try:
        # One set of fresh tokens per round, so no round hits the cache.
        rounds = [_tokens(issuer, uncached_count) for _ in range(ROUNDS)]
        results: list[Any] = []

        def verify(token: str) -> None:
            results.append(verifier.verify(token).result)

        uncached = min(_best_of(1, batch, verify) for batch in rounds)
        if not all(isinstance(r, VerifiedToken) for r in results):
            raise RuntimeError(f"{alg}: some tokens were refused: {results[:1]!r}")
        if verifier.cached_tokens < ROUNDS * uncached_count:
            raise RuntimeError(f"{alg}: only {verifier.cached_tokens} tokens were cached")

        key = issuer.private_key.public_key()

        def decode(token: str) -> None:
            jwt.decode(token, key, algorithms=[alg], audience=CLIENT_ID, issuer=issuer.issuer_url)

        baseline_uncached = _best_of(ROUNDS, rounds[0], decode)

        token = rounds[0][0]
        repeated = [token] * cached_count

        def verify_cached(token: str) -> None:
            verifier.verify(token)

        cached = _best_of(ROUNDS, repeated, verify_cached)
        lookup_only = _best_of(ROUNDS, repeated, verifier.cached)
        table = {hashlib.sha256(token.encode()).digest(): results[0]}
        digest = next(iter(table))
        baseline_cached = _best_of(ROUNDS, [digest] * cached_count, table.get)

        def hash_and_get(token: str) -> None:
            table.get(hashlib.sha256(token.encode()).digest())

        hash_and_lookup = _best_of(ROUNDS, repeated, hash_and_get)
    finally:
        verifier.stop()
    M = report.Measurement
    scenario = report.SCENARIO_TOKEN
    size = f"{len(token):,}-byte token"
    return [
        M(scenario, report.KPROXY, _METRICS[alg, False], uncached, "µs", baseline=PYJWT,
          higher_is_better=False,
          note=f"{1e6 / uncached:,.0f}/s; verify() of a token not seen before; {size}"),
        M(scenario, PYJWT, _METRICS[alg, False], baseline_uncached, "µs", baseline=None,
          higher_is_better=False, note=f"{1e6 / baseline_uncached:,.0f}/s"),
        M(scenario, report.KPROXY, _METRICS[alg, True], cached, "µs", baseline=BARE_DICT,
          higher_is_better=False,
          note=f"{1e6 / cached:,.0f}/s; verify() of a cached token; cached() alone "
               f"{lookup_only:.2f} µs, sha256 + dict.get {hash_and_lookup:.2f} µs"),
        M(scenario, BARE_DICT, _METRICS[alg, True], baseline_cached, "µs", baseline=None,
          higher_is_better=False, note=f"{1e6 / baseline_cached:,.0f}/s"),
    ]


def audit(quick: bool) -> list[Any]:
    """
    The audit pipeline (audit_throughput.py), shorter when ``quick``.
    """
    import audit_throughput

    if quick:
        return audit_throughput.measure(seconds=2.0, events=20000)
    return audit_throughput.measure(seconds=5.0, events=50000)


def run(workdir: str, quick: bool) -> list[Any]:
    """
    Both micro scenarios (``workdir`` is not needed: the audit spool goes to a
    temporary directory of its own).
    """
    measurements: list[Any] = []
    for name, scenario in (("token", token_verification), ("audit", audit)):
        try:
            measurements += scenario(quick)
        except Exception as e:  # noqa: BLE001 - report the other one
            print(f"# {name} scenario FAILED: {e!r}", file=sys.stderr)
    return measurements


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the micro scenarios and print the table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, shorter audit runs")
    parser.add_argument("--only", choices=("token", "audit"))
    args = parser.parse_args(argv)
    measurements: list[Any] = []
    if args.only in (None, "token"):
        measurements += token_verification(args.quick)
    if args.only in (None, "audit"):
        measurements += audit(args.quick)
    print(report.render_table(measurements))


if __name__ == "__main__":
    main()
