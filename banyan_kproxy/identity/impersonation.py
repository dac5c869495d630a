"""
``kubectl --as`` through the proxy: the client's own ``Impersonate-*`` headers, checked
the way kube-apiserver's impersonation filter checks them, but asked of the apiserver
with ``SubjectAccessReview``s on behalf of the verified user.

`RequestedImpersonation.from_headers` parses the headers exactly as the filter
(``k8s.io/apiserver/pkg/endpoints/filters/impersonation.go``) does: the first
``Impersonate-User``; every ``Impersonate-Group`` line, one group each (never split on
commas); every ``Impersonate-Extra-<key>`` line, the key lower-cased and then
percent-decoded; the first ``Impersonate-Uid``.  Groups, extras or a uid without a user
are an error (kube-apiserver answers those with a 500).

`ImpersonationAuthorizer.authorize` asks one ``SubjectAccessReview`` per check the
filter makes (verb ``impersonate`` on ``users`` or ``serviceaccounts``, ``groups``,
``userextras/<key>`` and ``uids``, named by the value), all at once, for the verified
user; only when every answer allows does it return the identity to impersonate, with
extras under ``originaluser.banyan-kproxy.io/`` naming the verified user so that the
apiserver's audit log shows who really asked.  A refusal carries the Forbidden message
the apiserver would have given the user.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import attr
from attr import frozen
from twisted.internet import task
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from banyan_kproxy.status import forbidden_message

from .claims import header_value_problem
from .model import Identity
from .token import show
from .tokenreview import REVIEW_TIMEOUT, ExpiringLRU, ReviewFailed, post_review

if TYPE_CHECKING:
    from ..proxy.upstream import Upstream

#: Where SubjectAccessReviews are created.
SUBJECT_ACCESS_REVIEW_PATH = b"/apis/authorization.k8s.io/v1/subjectaccessreviews"

#: The extra keys that record the verified user behind an impersonated request.  Domain
#: prefixed as Kubernetes asks of extra keys (``authentication.kubernetes.io/`` is
#: Kubernetes' own); lower case, because the apiserver lower-cases impersonated keys.
ORIGINAL_USER_EXTRA_PREFIX = "originaluser.banyan-kproxy.io/"
ORIGINAL_USER_EXTRA = ORIGINAL_USER_EXTRA_PREFIX + "user"
ORIGINAL_GROUPS_EXTRA = ORIGINAL_USER_EXTRA_PREFIX + "groups"
ORIGINAL_UID_EXTRA = ORIGINAL_USER_EXTRA_PREFIX + "uid"

GROUP_AUTHENTICATED = "system:authenticated"
GROUP_UNAUTHENTICATED = "system:unauthenticated"
USER_ANONYMOUS = "system:anonymous"

_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
_AUTHENTICATION_GROUP = "authentication.k8s.io"
_EXTRA_HEADER_PREFIX = b"impersonate-extra-"

# apimachinery's IsDNS1123Label / IsDNS1123Subdomain, which SplitUsername applies to a
# service account's namespace and name.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")

_log = Logger()


class ImpersonationError(Exception):
    """
    A request's impersonation cannot be honoured.

    ``code`` is the HTTP status to answer with and ``message`` the ``Status`` message
    (kube-apiserver's own wording where it has one).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class ImpersonationDenied(ImpersonationError):
    """
    The verified user may not impersonate what they asked for: a 403 whose message
    is the one kube-apiserver gives, and ``details`` for the Forbidden ``Status``
    (``name``, ``group`` when not core, ``kind`` = the resource).
    """

    def __init__(self, message: str, details: dict[str, str] | None = None) -> None:
        super().__init__(403, message)
        self.details = dict(details or {})

    def __repr__(self) -> str:
        return f"ImpersonationDenied({self.message!r})"


class ImpersonationUnavailable(ImpersonationError):
    """
    The apiserver could not be asked (no answer, an error, no permission to create
    SubjectAccessReviews): a 503.
    """

    def __init__(self, message: str) -> None:
        super().__init__(503, message)

    def __repr__(self) -> str:
        return f"ImpersonationUnavailable({self.message!r})"


@frozen
class ImpersonationCheck:
    """
    One authorization check the impersonation filter makes: may the requester
    ``impersonate`` this object?  Field names follow ``ResourceAttributes``.
    """

    resource: str
    name: str
    group: str = ""
    version: str = ""
    subresource: str = ""
    namespace: str = ""

    def resource_attributes(self) -> dict[str, str]:
        """
        The ``spec.resourceAttributes`` of the SubjectAccessReview (empty fields left
        out, as Go's ``omitempty`` does).
        """
        attributes = {
            "namespace": self.namespace,
            "verb": "impersonate",
            "group": self.group,
            "version": self.version,
            "resource": self.resource,
            "subresource": self.subresource,
            "name": self.name,
        }
        return {k: v for k, v in attributes.items() if v}

    def forbidden_message(self, requester: str, reason: str = "") -> str:
        """
        kube-apiserver's Forbidden message for this check denied to ``requester``.

        ``users "alice" is forbidden: User "bob" cannot impersonate resource "users" in
        API group "" at the cluster scope``, then ``: <reason>`` when the authorizer
        gave one.
        """
        return forbidden_message(
            requester,
            "impersonate",
            resource=self.resource,
            subresource=self.subresource,
            api_group=self.group,
            namespace=self.namespace,
            name=self.name,
            reason=reason,
        )

    def forbidden_details(self) -> dict[str, str]:
        """
        The ``details`` of the Forbidden ``Status`` for this check.
        """
        details = {"name": self.name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.resource
        return details


def _object_reference(kind: str, name: str, namespace: str = "", api_version: str = "",
                      field_path: str = "") -> str:
    """
    A ``v1.ObjectReference`` as Go's ``%v`` prints it (Kind Namespace Name UID
    APIVersion ResourceVersion FieldPath), as the filter's error message shows it.
    """
    return "{" + " ".join([kind, namespace, name, "", api_version, "", field_path]) + "}"


# -- parsing the client's headers -------------------------------------------------------


def _text(raw: bytes, what: str) -> str:
    """
    A header value as text, or a 400 when it cannot be carried on to the apiserver.
    """
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImpersonationError(400, f"{what} is not UTF-8") from None
    problem = header_value_problem(value)
    if problem is not None:
        raise ImpersonationError(400, f"{what} {show(value)} {problem}")
    return value


def _extra_key(encoded: bytes) -> str:
    """
    The extra key named by an ``Impersonate-Extra-<key>`` header: lower-cased, then
    percent-decoded as Go's ``url.PathUnescape`` does (kept encoded when that fails).
    """
    lowered = encoded.lower().decode("latin-1")
    if _BAD_PERCENT.search(lowered):
        key = lowered
    else:
        key = unquote_to_bytes(lowered).decode("utf-8", "surrogateescape")
    problem = header_value_problem(key)
    if problem is not None:
        raise ImpersonationError(400, f"Impersonate-Extra- key {show(key)} {problem}")
    return key


def split_service_account(user: str) -> tuple[str, str] | None:
    """
    ``(namespace, name)`` when ``user`` is a service account's user name
    (``system:serviceaccount:<namespace>:<name>``, both valid names), else ``None``.
    """
    if not user.startswith(_SERVICE_ACCOUNT_PREFIX):
        return None
    parts = user[len(_SERVICE_ACCOUNT_PREFIX):].split(":")
    if len(parts) != 2:
        return None
    namespace, name = parts
    if len(namespace) > 63 or not _DNS1123_LABEL.match(namespace):
        return None
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        return None
    return namespace, name


@frozen
class RequestedImpersonation:
    """
    The identity a client asked to act as with ``Impersonate-*`` headers.

    ``extra`` is a sequence of (key, values) pairs in the order the headers came;
    ``groups`` is exactly what was asked for (the defaults the apiserver adds are in
    `checks` and `identity`).
    """

    user: str
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    uid: str | None = None

    @classmethod
    def from_headers(cls, headers: Headers) -> RequestedImpersonation | None:
        """
        The impersonation ``headers`` ask for, or ``None`` when they ask for none.

        :raise ImpersonationError: 500 with kube-apiserver's message when groups,
            extras or a uid come without a user; 400 when a value cannot be carried
            in a header (control characters, not UTF-8, empty).
        """
        user_values = headers.getRawHeaders(b"impersonate-user", [])
        user = _text(user_values[0], "Impersonate-User") if user_values and user_values[0] else None
        groups = tuple(
            _text(v, "Impersonate-Group") for v in headers.getRawHeaders(b"impersonate-group", [])
        )
        extra: dict[str, list[str]] = {}
        for name, values in headers.getAllRawHeaders():
            lowered = name.lower()
            if not lowered.startswith(_EXTRA_HEADER_PREFIX):
                continue
            key = _extra_key(name[len(_EXTRA_HEADER_PREFIX):])
            extra.setdefault(key, []).extend(
                _text(v, f"Impersonate-Extra-{key}") for v in values
            )
        uid_values = headers.getRawHeaders(b"impersonate-uid", [])
        uid = _text(uid_values[0], "Impersonate-Uid") if uid_values and uid_values[0] else None
        has_extra = any(values for values in extra.values())
        if user is None:
            if not (groups or has_extra or uid):
                return None
            refs = [_object_reference("Group", g) for g in groups]
            refs += [
                _object_reference("UserExtra", v, api_version="authentication.k8s.io/v1",
                                  field_path=k)
                for k, values in extra.items()
                for v in values
            ]
            if uid:
                refs.append(_object_reference("UID", uid, api_version="authentication.k8s.io/v1"))
            raise ImpersonationError(
                500, f"requested [{' '.join(refs)}] without impersonating a user"
            )
        return cls(
            user=user,
            groups=groups,
            extra=tuple((k, tuple(v)) for k, v in extra.items() if v),
            uid=uid,
        )

    def checks(self) -> list[ImpersonationCheck]:
        """
        The checks kube-apiserver makes for this request, in its order: the user (as
        a service account when it is one), each group, each extra value, the uid.
        """
        out = []
        service_account = split_service_account(self.user)
        if service_account is not None:
            namespace, name = service_account
            out.append(ImpersonationCheck("serviceaccounts", name, namespace=namespace))
        else:
            out.append(ImpersonationCheck("users", self.user))
        out += [ImpersonationCheck("groups", group) for group in self.groups]
        out += [
            ImpersonationCheck(
                "userextras", value, group=_AUTHENTICATION_GROUP, version="v1", subresource=key
            )
            for key, values in self.extra
            for value in values
        ]
        if self.uid:
            out.append(
                ImpersonationCheck("uids", self.uid, group=_AUTHENTICATION_GROUP, version="v1")
            )
        return out

    def impersonated_groups(self) -> tuple[str, ...]:
        """
        The groups the apiserver gives the impersonated user: the requested ones (a
        service account's own groups when none were requested), plus
        ``system:authenticated`` (``system:unauthenticated`` for ``system:anonymous``)
        unless one of them is there already.
        """
        groups = list(self.groups)
        service_account = split_service_account(self.user)
        if service_account is not None and not groups:
            groups = ["system:serviceaccounts", f"system:serviceaccounts:{service_account[0]}"]
        if self.user != USER_ANONYMOUS:
            if GROUP_AUTHENTICATED not in groups and GROUP_UNAUTHENTICATED not in groups:
                groups.append(GROUP_AUTHENTICATED)
        elif GROUP_UNAUTHENTICATED not in groups:
            groups.append(GROUP_UNAUTHENTICATED)
        return tuple(groups)

    def identity(self, requester: Identity) -> Identity:
        """
        The identity to impersonate once allowed: this user, `impersonated_groups`,
        the requested extras and uid, and extras naming ``requester``.
        """
        original: list[tuple[str, tuple[str, ...]]] = [(ORIGINAL_USER_EXTRA, (requester.user,))]
        if requester.groups:
            original.append((ORIGINAL_GROUPS_EXTRA, tuple(requester.groups)))
        if requester.uid:
            original.append((ORIGINAL_UID_EXTRA, (requester.uid,)))
        return Identity(
            user=self.user,
            groups=self.impersonated_groups(),
            extra=tuple(self.extra) + tuple(original),
            uid=self.uid,
        )


# -- asking the apiserver ---------------------------------------------------------------


def _requester_key(requester: Identity) -> tuple[Any, ...]:
    groups = tuple(requester.groups)
    if GROUP_AUTHENTICATED not in groups:
        groups += (GROUP_AUTHENTICATED,)
    return (requester.user, groups, tuple(requester.extra), requester.uid or "")


@frozen
class _Decision:
    allowed: bool
    reason: str = ""


@attr.s(auto_attribs=True)
class ImpersonationAuthorizer:
    """
    Decides ``kubectl --as`` requests with SubjectAccessReviews at the apiserver.

    :param upstream: the apiserver, reached with the proxy's own credential (which
        needs ``create`` on ``subjectaccessreviews``).
    :param clock: times the decision cache and each review's ``timeout``.
    :param cache_ttl: seconds a decision (allowed or denied) is remembered.
    :param cache_size: most decisions remembered.
    :param cooperator: runs the request-body producers (``twisted.internet.task``'s
        global cooperator by default).
    """

    upstream: Upstream
    clock: IReactorTime
    cache_ttl: float = 10.0
    cache_size: int = 10000
    timeout: float = REVIEW_TIMEOUT
    cooperator: Any = attr.ib(default=attr.Factory(lambda: task))
    _cache: ExpiringLRU = attr.ib(init=False)
    #: SubjectAccessReviews sent so far (cached decisions not counted).
    calls: int = attr.ib(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._cache = ExpiringLRU(self.cache_size, self.cache_ttl)

    def authorize(self, requester: Identity, requested: RequestedImpersonation) -> Deferred[Identity]:
        """
        Whether ``requester`` may impersonate ``requested``.

        :return: a ``Deferred`` firing with the `Identity` to impersonate
            (`RequestedImpersonation.identity`), or failing with `ImpersonationDenied`
            (the message of the first check denied, in kube-apiserver's order) or
            `ImpersonationUnavailable`.  Every check is asked at once.
        """
        checks = requested.checks()
        for check in checks:
            if check.resource == "userextras" and check.subresource.startswith(
                ORIGINAL_USER_EXTRA_PREFIX
            ):
                return fail(
                    ImpersonationDenied(
                        check.forbidden_message(
                            requester.user,
                            f"banyan-kproxy sets the extras under {ORIGINAL_USER_EXTRA_PREFIX} itself",
                        ),
                        check.forbidden_details(),
                    )
                )
        key = _requester_key(requester)
        decisions = gatherResults(
            [self._decide(requester, key, check) for check in checks], consumeErrors=True
        )

        def judge(results: list[_Decision]) -> Identity:
            for check, decision in zip(checks, results, strict=True):
                if not decision.allowed:
                    raise ImpersonationDenied(
                        check.forbidden_message(requester.user, decision.reason),
                        check.forbidden_details(),
                    )
            return requested.identity(requester)

        def unwrap(failure: Failure) -> Failure:
            failure.trap(FirstError)
            return failure.value.subFailure

        return decisions.addCallbacks(judge, unwrap)

    def _decide(
        self, requester: Identity, key: tuple[Any, ...], check: ImpersonationCheck
    ) -> Deferred[_Decision]:
        cached = self._cache.get((key, check), self.clock.seconds())
        if cached is not None:
            return succeed(cached)
        self.calls += 1
        return Deferred.fromCoroutine(self._review(requester, key, check))

    async def _review(
        self, requester: Identity, key: tuple[Any, ...], check: ImpersonationCheck
    ) -> _Decision:
        user, groups, extra, uid = key
        spec: dict[str, Any] = {
            "resourceAttributes": check.resource_attributes(),
            "user": user,
            "groups": list(groups),
        }
        if extra:
            spec["extra"] = {k: list(v) for k, v in extra}
        if uid:
            spec["uid"] = uid
        review = {
            "kind": "SubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        try:
            answer = await post_review(
                self.upstream,
                SUBJECT_ACCESS_REVIEW_PATH,
                review,
                self.clock,
                timeout=self.timeout,
                cooperator=self.cooperator,
            )
        except ReviewFailed as e:
            _log.warn("Cannot check impersonation: {problem}", problem=str(e))
            raise ImpersonationUnavailable(f"cannot check impersonation: {e}") from None
        status = answer["status"]
        allowed = status.get("allowed") is True and status.get("denied") is not True
        reason = status.get("reason")
        decision = _Decision(allowed, reason if isinstance(reason, str) else "")
        error = status.get("evaluationError")
        if error and not allowed:
            _log.info(
                "SubjectAccessReview for {user} had an evaluation error: {error}",
                user=requester.user,
                error=show(error, 200),
            )
        self._cache.put((key, check), decision, self.clock.seconds())
        return decision
