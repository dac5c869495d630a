"""
Tests for `banyan_kproxy.requestinfo`: the verb and object reference kube-apiserver
records for a request line.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.audit.event import object_ref
from banyan_kproxy.requestinfo import is_long_running, parse_query, parse_request

NS = "/api/v1/namespaces/default"

#: (method, request target, verb, objectRef) as kube-apiserver's RequestInfoFactory and
#: audit.NewEventFromRequest give them; objectRef None means a non-resource request.
TABLE = [
    # Core group, namespaced collection and object.
    ("GET", f"{NS}/pods", "list", {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods/web-1", "get",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("HEAD", f"{NS}/pods/web-1", "get",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("POST", f"{NS}/pods", "create", {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("PUT", f"{NS}/pods/web-1", "update",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("PATCH", f"{NS}/pods/web-1", "patch",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("DELETE", f"{NS}/pods/web-1", "delete",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("DELETE", f"{NS}/pods?labelSelector=app%3Dweb", "deletecollection",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("OPTIONS", f"{NS}/pods", "", {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    # Watches: the query parameter (any value but 0/false, even empty) and the old path form.
    ("GET", f"{NS}/pods?watch=1&resourceVersion=10", "watch",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?watch=true", "watch",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?watch=", "watch", {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?watch=False", "list", {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?watch=0", "list", {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", "/api/v1/watch/namespaces/default/pods", "watch",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", "/api/v1/watch/namespaces/default/pods/web-1", "watch",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("GET", "/api/v1/watch/pods", "watch", {"resource": "pods", "apiVersion": "v1"}),
    # A single-object watch or list through a metadata.name field selector.
    ("GET", f"{NS}/pods?fieldSelector=metadata.name%3Dweb-1&watch=1", "watch",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?fieldSelector=status.phase%3DRunning,metadata.name%3D%3Dweb-1", "list",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?fieldSelector=metadata.name!%3Dweb-1", "list",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?fieldSelector=metadata.name%3Da%25b", "list",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?limit=many&fieldSelector=metadata.name%3Dweb-1", "list",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    ("GET", f"{NS}/pods?fieldSelector=metadata.name%3Dx%3Dy", "list",
     {"resource": "pods", "namespace": "default", "apiVersion": "v1"}),
    # Cluster-wide collections and cluster-scoped objects.
    ("GET", "/api/v1/pods", "list", {"resource": "pods", "apiVersion": "v1"}),
    ("GET", "/api/v1/nodes/node-1", "get", {"resource": "nodes", "name": "node-1", "apiVersion": "v1"}),
    ("GET", "/api/v1/namespaces", "list", {"resource": "namespaces", "apiVersion": "v1"}),
    # A namespace is named in itself; status and finalize are its subresources.
    ("GET", "/api/v1/namespaces/kube-system", "get",
     {"resource": "namespaces", "namespace": "kube-system", "name": "kube-system", "apiVersion": "v1"}),
    ("PUT", "/api/v1/namespaces/old/finalize", "update",
     {"resource": "namespaces", "namespace": "old", "name": "old", "apiVersion": "v1",
      "subresource": "finalize"}),
    ("GET", "/api/v1/namespaces/old/status", "get",
     {"resource": "namespaces", "namespace": "old", "name": "old", "apiVersion": "v1",
      "subresource": "status"}),
    # Subresources: logs, exec, attach, port-forward, eviction, proxy.
    ("GET", f"{NS}/pods/web-1/log?follow=true&container=app", "get",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1",
      "subresource": "log"}),
    ("POST", f"{NS}/pods/web-1/exec?command=sh&stdin=true&tty=true", "create",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1",
      "subresource": "exec"}),
    ("GET", f"{NS}/pods/web-1/exec?command=ls", "get",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1",
      "subresource": "exec"}),
    ("POST", f"{NS}/pods/web-1/attach?stdout=true", "create",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1",
      "subresource": "attach"}),
    ("GET", f"{NS}/pods/web-1/portforward?ports=8080", "get",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1",
      "subresource": "portforward"}),
    ("POST", f"{NS}/pods/web-1/eviction", "create",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1",
      "subresource": "eviction"}),
    ("GET", f"{NS}/services/web:http/proxy/metrics", "get",
     {"resource": "services", "namespace": "default", "name": "web:http", "apiVersion": "v1",
      "subresource": "proxy"}),
    ("GET", "/api/v1/proxy/namespaces/default/pods/web-1/healthz", "proxy",
     {"resource": "pods", "namespace": "default", "name": "web-1", "apiVersion": "v1"}),
    # Grouped resources.
    ("GET", "/apis/apps/v1/namespaces/default/deployments", "list",
     {"resource": "deployments", "namespace": "default", "apiGroup": "apps", "apiVersion": "v1"}),
    ("GET", "/apis/apps/v1/namespaces/default/deployments/web/scale", "get",
     {"resource": "deployments", "namespace": "default", "name": "web", "apiGroup": "apps",
      "apiVersion": "v1", "subresource": "scale"}),
    ("PATCH", "/apis/apps/v1/namespaces/default/deployments/web/status", "patch",
     {"resource": "deployments", "namespace": "default", "name": "web", "apiGroup": "apps",
      "apiVersion": "v1", "subresource": "status"}),
    ("GET", "/apis/apps/v1/watch/namespaces/default/deployments", "watch",
     {"resource": "deployments", "namespace": "default", "apiGroup": "apps", "apiVersion": "v1"}),
    ("DELETE", "/apis/batch/v1/namespaces/ci/jobs", "deletecollection",
     {"resource": "jobs", "namespace": "ci", "apiGroup": "batch", "apiVersion": "v1"}),
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin", "get",
     {"resource": "clusterroles", "name": "admin", "apiGroup": "rbac.authorization.k8s.io",
      "apiVersion": "v1"}),
    ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", "create",
     {"resource": "selfsubjectaccessreviews", "apiGroup": "authorization.k8s.io", "apiVersion": "v1"}),
    ("GET", "/apis/metrics.k8s.io/v1beta1/nodes", "list",
     {"resource": "nodes", "apiGroup": "metrics.k8s.io", "apiVersion": "v1beta1"}),
    # Percent-encoded names are decoded.
    ("GET", f"{NS}/configmaps/my%20config", "get",
     {"resource": "configmaps", "namespace": "default", "name": "my config", "apiVersion": "v1"}),
    # Non-resource requests: the verb is the HTTP method in lower case.
    ("GET", "/healthz", "get", None),
    ("GET", "/version?timeout=32s", "get", None),
    ("GET", "/api", "get", None),
    ("GET", "/api/v1", "get", None),
    ("GET", "/apis", "get", None),
    ("GET", "/apis/apps/v1", "get", None),
    ("GET", "/openapi/v3/apis/apps/v1", "get", None),
    ("POST", "/logs/kube-apiserver.log", "post", None),
]


class RequestInfoTableTests(SynchronousTestCase):
    """
    The verb and objectRef agree with what kube-apiserver records.
    """

    def test_table_is_large_enough(self) -> None:
        """
        The table covers well over 25 request shapes.
        """
        self.assertGreaterEqual(len(TABLE), 25)

    def test_table(self) -> None:
        """
        Every request shape in the table gets kube-apiserver's verb and objectRef.
        """
        mismatches = []
        for method, uri, verb, ref in TABLE:
            info = parse_request(method, uri)
            got = (info.verb, object_ref(info))
            if got != (verb, ref):
                mismatches.append(f"{method} {uri}: got {got}, expected {(verb, ref)}")
        self.assertEqual(mismatches, [])

    def test_parts(self) -> None:
        """
        Parts start at the resource, as the apiserver's RequestInfo.Parts.
        """
        info = parse_request("GET", f"{NS}/services/web/proxy/a/b")
        self.assertEqual(info.parts, ("services", "web", "proxy", "a", "b"))
        self.assertEqual(info.path, f"{NS}/services/web/proxy/a/b")
        self.assertEqual(info.api_prefix, "api")

    def test_special_verb_without_resource(self) -> None:
        """
        ``/api/v1/watch`` alone is a resource request the apiserver cannot classify:
        no resource, the method's verb.
        """
        info = parse_request("GET", "/api/v1/watch")
        self.assertTrue(info.resource_request)
        self.assertEqual((info.verb, info.resource), ("get", ""))


class QueryTests(SynchronousTestCase):
    """
    Query strings are read as Go's ``url.ParseQuery`` reads them.
    """

    def test_plus_and_repeats(self) -> None:
        """
        ``+`` is a space, keys repeat in order, and pairs holding ``;`` are skipped.
        """
        self.assertEqual(
            parse_query("a=1+2&a=3&b&c=%3D;x&d=4"),
            {"a": ("1 2", "3"), "b": ("",), "d": ("4",)},
        )


class LongRunningTests(SynchronousTestCase):
    """
    Long-running requests are those kube-apiserver's LongRunningFunc names.
    """

    def test_long_running(self) -> None:
        """
        Watches, proxies, exec, attach, port-forward and logs are long-running;
        plain gets, lists and non-resource requests are not.
        """
        long = [
            ("GET", f"{NS}/pods?watch=1"),
            ("GET", "/api/v1/watch/pods"),
            ("POST", f"{NS}/pods/p/exec"),
            ("POST", f"{NS}/pods/p/attach"),
            ("GET", f"{NS}/pods/p/portforward"),
            ("GET", f"{NS}/pods/p/log"),
            ("GET", f"{NS}/services/s/proxy/x"),
            ("GET", "/api/v1/proxy/namespaces/default/pods/p"),
            ("GET", "/debug/pprof/heap"),
        ]
        short = [
            ("GET", f"{NS}/pods"),
            ("GET", f"{NS}/pods/p"),
            ("PATCH", f"{NS}/pods/p/status"),
            ("GET", "/healthz"),
            ("GET", "/logs/x"),
        ]
        self.assertEqual([u for m, u in long if not is_long_running(parse_request(m, u))], [])
        self.assertEqual([u for m, u in short if is_long_running(parse_request(m, u))], [])
