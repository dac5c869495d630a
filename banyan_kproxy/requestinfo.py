"""
What kube-apiserver makes of a request line before it authorizes or audits it.

This is kube-apiserver's ``RequestInfoFactory.NewRequestInfo``
(``k8s.io/apiserver/pkg/endpoints/request/requestinfo.go``) in Python: the
Kubernetes verb (``get``, ``list``, ``watch``, ``create``, ``update``, ``patch``,
``delete``, ``deletecollection``, ``proxy``; the lower-case HTTP method for
non-resource requests), API group and version, namespace, resource, subresource and
name.  The audit events use it for ``verb`` and ``objectRef``, and the audit policy
matches on it, so both agree with what the apiserver itself records for the same
request.

Where the apiserver decodes ``ListOptions`` from the query (a ``get`` without a name
becomes ``list`` or ``watch``, and ``fieldSelector=metadata.name=x`` names the
object), the same rules are followed: ``watch`` is true for any value but ``0`` and
``false`` (``Convert_Slice_string_To_bool``), a field selector is parsed with the
apiserver's escaping rules, and a query that would fail to decode (a malformed
``limit``, ``timeoutSeconds`` or ``fieldSelector``) leaves the name unset.  One
simplification: a malformed ``labelSelector``, which would also fail the decode, is
not checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from urllib.parse import unquote, unquote_plus

from attr import frozen

__all__ = [
    "RequestInfo",
    "request_info",
    "parse_request",
    "parse_query",
    "is_long_running",
    "LONG_RUNNING_VERBS",
    "LONG_RUNNING_SUBRESOURCES",
]

#: Path segments that name a verb rather than a resource (``/api/v1/watch/pods``).
_SPECIAL_VERBS = frozenset({"proxy", "watch"})
#: Special verbs after which the third part is not a subresource.
_SPECIAL_VERBS_NO_SUBRESOURCES = frozenset({"proxy"})
#: Subresources of a namespace, as opposed to namespaced resources.
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
#: Prefixes of resource requests; ``api`` has no group segment.
_API_PREFIXES = frozenset({"api", "apis"})
_GROUPLESS_API_PREFIXES = frozenset({"api"})

_METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}

#: kube-apiserver's ``LongRunningFunc``: these verbs and subresources hold a response open.
LONG_RUNNING_VERBS = frozenset({"watch", "proxy"})
LONG_RUNNING_SUBRESOURCES = frozenset({"attach", "exec", "proxy", "log", "portforward"})


@frozen
class RequestInfo:
    """
    What kube-apiserver's ``RequestInfoFactory`` makes of a request line.

    ``path`` is the percent-decoded path.  ``parts`` are the path segments from the
    resource on (``pods``, ``name``, ``subresource``, ...).
    """

    resource_request: bool
    path: str
    verb: str
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: tuple[str, ...] = ()


def parse_query(query: str) -> dict[str, tuple[str, ...]]:
    """
    A query string as Go's ``url.ParseQuery`` reads it: ``&``-separated pairs,
    ``+`` as space, pairs holding ``;`` skipped, values in order per key.
    """
    args: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if not pair or ";" in pair:
            continue
        key, _, value = pair.partition("=")
        args.setdefault(unquote_plus(key), []).append(unquote_plus(value))
    return {key: tuple(values) for key, values in args.items()}


def parse_request(method: str, uri: str) -> RequestInfo:
    """
    Classify a request from its method and request target (``/path?query``).

    The query is only parsed when the verb depends on it (a ``get`` without a name).
    """
    path, _, query = uri.partition("?")
    path, _, _ = path.partition("#")
    if "%" in path:
        path = unquote(path)
    return _classify(method, path, lambda: parse_query(query))


def _query_bool(values: Sequence[str]) -> bool:
    """
    ``Convert_Slice_string_To_bool``: absent, ``0`` and ``false`` are false; anything
    else, the empty string included, is true.
    """
    if not values:
        return False
    return not (values[0] == "0" or values[0].lower() == "false")


class _BadQuery(Exception):
    """
    The query would not decode as ``ListOptions``.
    """


def _split_terms(selector: str) -> list[str]:
    """
    ``fields.splitTerms``: comma-separated, a backslash escapes the next character.
    """
    terms = []
    start = 0
    in_slash = False
    for i, c in enumerate(selector):
        if in_slash:
            in_slash = False
        elif c == "\\":
            in_slash = True
        elif c == ",":
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return terms


def _unescape_value(value: str) -> str:
    """
    ``fields.UnescapeValue``: ``\\\\``, ``\\,`` and ``\\=`` are escapes; a bare
    ``,`` or ``=`` or any other escape is an error.
    """
    out = []
    in_slash = False
    for c in value:
        if in_slash:
            if c not in "\\,=":
                raise _BadQuery(f"invalid escape sequence \\{c}")
            out.append(c)
            in_slash = False
        elif c == "\\":
            in_slash = True
        elif c in ",=":
            raise _BadQuery(f"unescaped {c}")
        else:
            out.append(c)
    if in_slash:
        raise _BadQuery("trailing backslash")
    return "".join(out)


def _field_selector_exact(selector: str, field: str) -> str | None:
    """
    ``fields.ParseSelector(selector).RequiresExactMatch(field)``; raises `_BadQuery`
    when the selector does not parse.
    """
    if not selector:
        return None
    found = None
    for term in sorted(_split_terms(selector)):
        if not term:
            continue
        for i in range(len(term)):
            rest = term[i:]
            op = next((o for o in ("!=", "==", "=") if rest.startswith(o)), None)
            if op is not None:
                lhs, rhs = term[:i], term[i + len(op):]
                break
        else:
            raise _BadQuery(f"cannot understand {term!r}")
        value = _unescape_value(rhs)
        if op != "!=" and lhs == field and found is None:
            found = value
    return found


def _check_int(values: Sequence[str]) -> None:
    """
    An ``int64`` query parameter as ``strconv.ParseInt(s, 10, 64)`` accepts it.
    """
    if not values:
        return
    text = values[0]
    digits = text[1:] if text[:1] in "+-" else text
    if not digits.isascii() or not digits.isdigit() or not -(2**63) <= int(text) < 2**63:
        raise _BadQuery(f"{text!r} is not an integer")


def _valid_path_segment_name(name: str) -> bool:
    """
    ``path.IsValidPathSegmentName``: not ``.`` or ``..``, no ``/`` or ``%``.
    """
    return name not in (".", "..") and "/" not in name and "%" not in name


def _list_verb_and_name(args: Mapping[str, Sequence[str]]) -> tuple[str, str]:
    """
    ``list`` or ``watch``, and the name a ``metadata.name`` field selector fixes.
    """
    try:
        _check_int(args.get("limit", ()))
        _check_int(args.get("timeoutSeconds", ()))
        selector = args.get("fieldSelector", ())
        name = _field_selector_exact(selector[0], "metadata.name") if selector else None
    except _BadQuery:
        # The apiserver resets the options, keeping only ``watch``.
        return ("watch" if _query_bool(args.get("watch", ())) else "list"), ""
    verb = "watch" if _query_bool(args.get("watch", ())) else "list"
    if name is not None and _valid_path_segment_name(name):
        return verb, name
    return verb, ""


def request_info(method: str, path: str, args: Mapping[str, Sequence[str]]) -> RequestInfo:
    """
    Classify a request as kube-apiserver does before authorizing it.

    ``path`` is percent-decoded; ``args`` is the decoded query.
    ``/api/v1/namespaces/default/pods?watch=1`` is a resource request (verb ``watch``,
    resource ``pods``, namespace ``default``); ``/api/v1/namespaces/default`` names
    the namespace ``default`` in the namespace ``default``; ``/healthz`` and
    ``/apis/apps/v1`` are non-resource requests whose verb is the method in lower case.
    """
    return _classify(method, path, lambda: args)


def _classify(method: str, path: str, query: Callable[[], Mapping[str, Sequence[str]]]) -> RequestInfo:
    stripped = path.strip("/")
    parts = stripped.split("/") if stripped else []
    if len(parts) < 3 or parts[0] not in _API_PREFIXES:
        return RequestInfo(False, path=path, verb=method.lower())
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix not in _GROUPLESS_API_PREFIXES:
        if len(parts) < 3:
            return RequestInfo(False, path=path, verb=method.lower())
        group, parts = parts[0], parts[1:]
    version, parts = parts[0], parts[1:]
    if parts[0] in _SPECIAL_VERBS:
        if len(parts) < 2:
            # The apiserver answers this with an error; it is still a resource request.
            return RequestInfo(
                True, path=path, verb=method.lower(), api_prefix=prefix, api_group=group,
                api_version=version,
            )
        verb, parts = parts[0], parts[1:]
    else:
        verb = _METHOD_VERBS.get(method, "")
    namespace = ""
    if parts[0] == "namespaces":
        if len(parts) > 1:
            namespace = parts[1]
            if len(parts) > 2 and parts[2] not in _NAMESPACE_SUBRESOURCES:
                parts = parts[2:]
    resource = parts[0] if parts else ""
    name = parts[1] if len(parts) >= 2 else ""
    subresource = (
        parts[2] if len(parts) >= 3 and verb not in _SPECIAL_VERBS_NO_SUBRESOURCES else ""
    )
    if not name and verb == "get":
        verb, name = _list_verb_and_name(query())
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(
        True,
        path=path,
        verb=verb,
        api_prefix=prefix,
        api_group=group,
        api_version=version,
        namespace=namespace,
        resource=resource,
        subresource=subresource,
        name=name,
        parts=tuple(parts),
    )


def is_long_running(info: RequestInfo) -> bool:
    """
    kube-apiserver's ``BasicLongRunningRequestCheck``: watches, proxies, exec, attach,
    port-forward and logs hold their response open (and get a ``ResponseStarted``
    audit event).
    """
    if info.verb in LONG_RUNNING_VERBS:
        return True
    if info.resource_request:
        return info.subresource in LONG_RUNNING_SUBRESOURCES
    return info.path.startswith("/debug/pprof/")
