"""
Integration tests: the real daemon (``twistd -n banyan-kproxy``) between the real
``kubectl`` and the Kubernetes API stand-in, replaying the seed's Step 4 and 5.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from banyan_kproxy.testing.stack import ADMIN_ROLE, READER_ROLE, LoopbackStack

FORBIDDEN_SERVICES = (
    'Error from server (Forbidden): services is forbidden: User "banyan:myuser@example.com" '
    'cannot list resource "services" in API group "" in the namespace "default"'
)
LOGGED_OUT = "error: You must be logged in to the server"


def kubectl_binary(version: str | None) -> str:
    """
    The kubectl binary for ``version`` (``1.29`` …) or the default one.
    """
    default = shutil.which("kubectl")
    if default is None:
        raise SkipTest("kubectl is not on PATH")
    if version is None:
        return default
    path = os.path.join(os.path.dirname(os.path.realpath(default)), f"kubectl.{version}")
    if not os.path.exists(path):
        raise SkipTest(f"{path} does not exist")
    return path


class StackTestCase(TestCase):
    """
    Starts a L{LoopbackStack} for each test and stops it afterwards.
    """

    timeout = 120

    def make_stack(self) -> LoopbackStack:
        """
        The stack this test case runs (subclasses configure more).
        """
        return LoopbackStack(reactor, os.path.abspath(self.mktemp()))

    def setUp(self) -> Deferred[None]:
        self.stack = self.make_stack()
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

        async def start() -> None:
            try:
                await self.stack.start()
            except BaseException:
                await self.stack.stop()
                raise

        return ensureDeferred(start())

    def tearDown(self) -> Deferred[Any]:
        return ensureDeferred(self.stack.stop())

    async def kubectl(self, kubeconfig: str, *args: str, version: str | None = None) -> tuple[str, int]:
        """
        Run kubectl to completion (bounded by the test's timeout); its output and exit code.
        """
        binary = kubectl_binary(version)
        env = {"HOME": self.home, "KUBECONFIG": kubeconfig, "PATH": os.environ.get("PATH", "")}
        out, err, code = await getProcessOutputAndValue(
            binary, ("--request-timeout=20s",) + args, env=env, reactor=reactor
        )
        return (out + err).decode("utf-8", "replace").strip(), code

    def users(self) -> str:
        return self.stack.write_kubeconfig(
            "kubeconfig",
            {
                "reader": self.stack.token("myuser@example.com", [READER_ROLE]),
                "admin": self.stack.token("admin@example.com", [ADMIN_ROLE]),
            },
        )


class SeedStep4Tests(StackTestCase):
    """
    The seed's RBAC walk-through, with several kubectl releases.
    """

    async def _check_rbac(self, version: str | None) -> None:
        self.stack.standin.add_pod("web-1")
        kubeconfig = self.users()
        output, code = await self.kubectl(kubeconfig, "--context", "reader", "get", "pods", version=version)
        self.assertEqual(code, 0, output)
        self.assertIn("web-1", output)
        self.assertTrue(output.startswith("NAME"), output)

        output, code = await self.kubectl(
            kubeconfig, "--context", "reader", "get", "services", version=version
        )
        self.assertEqual(output, FORBIDDEN_SERVICES)
        self.assertEqual(code, 1)

        for what in ("pods", "services"):
            output, code = await self.kubectl(kubeconfig, "--context", "admin", "get", what, version=version)
            self.assertEqual(code, 0, output)

        # What reached the apiserver: impersonation of the verified user only.
        seen = [r for r in self.stack.standin.requests if r.path.endswith("/services")]
        self.assertEqual(seen[0].user, "banyan:myuser@example.com")
        self.assertIn("banyan:any-employee-personal-device", seen[0].groups)

    def test_default_kubectl(self) -> Deferred[None]:
        """
        With the default kubectl, a reader lists pods, is refused services with the
        apiserver's exact Forbidden message, and an admin may do both.
        """
        return ensureDeferred(self._check_rbac(None))

    def test_kubectl_1_29(self) -> Deferred[None]:
        """
        The same with kubectl 1.29.
        """
        return ensureDeferred(self._check_rbac("1.29"))

    def test_kubectl_1_33(self) -> Deferred[None]:
        """
        The same with kubectl 1.33.
        """
        return ensureDeferred(self._check_rbac("1.33"))


class RefusedTokenTests(StackTestCase):
    """
    Tokens the proxy must refuse, as kubectl users see them.
    """

    def test_refused(self) -> Deferred[None]:
        """
        An expired token, a token signed by another key, one for another audience and
        one signed with ``none`` all make kubectl say the user must log in, and no
        request reaches the apiserver.
        """

        async def run() -> None:
            from banyan_kproxy.testing.issuer import OIDCIssuer

            stranger = OIDCIssuer(self.stack.issuer.issuer_url)
            stranger.kid = self.stack.issuer.kid  # same kid, different key
            claims = {"email": "myuser@example.com", "email_verified": True, "roles": [ADMIN_ROLE]}
            tokens = {
                "expired": self.stack.token(
                    "myuser@example.com", [ADMIN_ROLE], expires_in=-3600
                ),
                "other-key": stranger.token(claims, audience="external-services", kid=self.stack.issuer.kid),
                "other-audience": self.stack.token(
                    "myuser@example.com", [ADMIN_ROLE], audience="someone-else"
                ),
                "alg-none": self.stack.issuer.unsigned_token(claims, audience="external-services"),
            }
            kubeconfig = self.stack.write_kubeconfig("kubeconfig", tokens)
            before = len(self.stack.standin.requests)
            for context in tokens:
                output, code = await self.kubectl(kubeconfig, "--context", context, "get", "pods")
                last = output.splitlines()[-1]
                self.assertEqual(
                    last,
                    f"{LOGGED_OUT} (the server has asked for the client to provide credentials)",
                    f"{context}: {output}",
                )
                self.assertEqual(code, 1)
            self.assertEqual(len(self.stack.standin.requests), before)
            log = self.stack.daemon_output
            for token in tokens.values():
                self.assertNotIn(token.split(".")[2] or token, log)
            for reason in ("expired", "signature", "audience", "algorithm"):
                self.assertIn(f"token rejected ({reason})", log)

        return ensureDeferred(run())


POD_YAML = """\
apiVersion: v1
kind: Pod
metadata:
  name: created-through-proxy
  namespace: default
spec:
  containers:
  - name: app
    image: nginx:1.27
"""


class WriteTests(StackTestCase):
    """
    Requests with bodies go through the proxy whole.
    """

    def test_create(self) -> Deferred[None]:
        """
        An admin's ``kubectl create -f`` reaches the apiserver with its body and as the
        admin; the reader's is refused by RBAC with the apiserver's message.
        """

        async def run() -> None:
            kubeconfig = self.users()
            manifest = os.path.join(self.home, "pod.yaml")
            with open(manifest, "w") as f:
                f.write(POD_YAML)
            output, code = await self.kubectl(kubeconfig, "--context", "reader", "create", "-f", manifest)
            self.assertEqual(code, 1)
            self.assertEqual(
                output.splitlines()[-1],
                'Error from server (Forbidden): error when creating "' + manifest + '": pods is '
                'forbidden: User "banyan:myuser@example.com" cannot create resource "pods" in API '
                'group "" in the namespace "default"',
            )
            output, code = await self.kubectl(kubeconfig, "--context", "admin", "create", "-f", manifest)
            self.assertEqual((output, code), ("pod/created-through-proxy created", 0))
            pod = self.stack.standin.get_object("pods", "created-through-proxy", "default")
            self.assertEqual(pod["spec"]["containers"][0]["image"], "nginx:1.27")
            [post] = [r for r in self.stack.standin.requests if r.method == "POST"
                      and r.user == "banyan:admin@example.com"]
            self.assertEqual(post.groups[-1], "system:authenticated")

        return ensureDeferred(run())


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class WatchTests(StackTestCase):
    """
    Watches stream through the proxy.
    """

    def test_get_pods_watch(self) -> Deferred[None]:
        """
        ``kubectl get pods -w`` prints a pod created after the watch began.
        """

        async def run() -> None:
            self.stack.standin.add_pod("before-1")
            kubeconfig = self.users()
            collector = _Collect()
            binary = kubectl_binary(None)
            env = {"HOME": self.home, "KUBECONFIG": kubeconfig, "PATH": os.environ.get("PATH", "")}
            process = reactor.spawnProcess(
                collector, binary, [binary, "--context", "reader", "get", "pods", "-w"], env=env
            )
            try:
                await self.wait_for(lambda: any(
                    "watch=true" in r.query or "watch=1" in r.query for r in self.stack.standin.requests
                ), "the watch to reach the apiserver")
                await self.wait_for(lambda: b"before-1" in collector.output, "the initial list")
                self.stack.standin.add_pod("after-1")
                await self.wait_for(lambda: b"after-1" in collector.output, "the new pod")
            finally:
                if not collector.ended.called:
                    process.signalProcess("TERM")
                    await collector.ended
            self.assertIn(b"after-1", collector.output)

        return ensureDeferred(run())

    def test_logs_follow(self) -> Deferred[None]:
        """
        ``kubectl logs -f`` prints log lines written after it started.
        """

        async def run() -> None:
            self.stack.standin.add_pod("web-1", logs="first line\n")
            kubeconfig = self.users()
            collector = _Collect()
            binary = kubectl_binary(None)
            env = {"HOME": self.home, "KUBECONFIG": kubeconfig, "PATH": os.environ.get("PATH", "")}
            process = reactor.spawnProcess(
                collector, binary, [binary, "--context", "reader", "logs", "-f", "web-1"], env=env
            )
            try:
                await self.wait_for(lambda: b"first line" in collector.output, "the first line")
                self.stack.standin.append_pod_log("web-1", "second line\n")
                await self.wait_for(lambda: b"second line" in collector.output, "the second line")
            finally:
                if not collector.ended.called:
                    process.signalProcess("TERM")
                    await collector.ended
            self.assertEqual(collector.output, b"first line\nsecond line\n")

        return ensureDeferred(run())

    async def wait_for(self, condition: Any, what: str, timeout: float = 20.0) -> None:
        """
        Poll ``condition`` every 50 ms until it holds or ``timeout`` passes.
        """
        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.05, lambda: None)


DEPLOYER_RBAC = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: deployer-reads-pods
  namespace: default
subjects:
- kind: ServiceAccount
  name: deployer
  namespace: default
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: pod-reader-default
"""


class PassthroughTests(StackTestCase):
    """
    ``[token_passthrough]``: service-account tokens go through with their own identity.
    """

    def make_stack(self) -> LoopbackStack:
        from banyan_kproxy.testing.kubeapi import UserInfo

        self.sa_token = "sa-" + os.urandom(16).hex()
        return LoopbackStack(
            reactor, os.path.abspath(self.mktemp()),
            extra_ini="[token_passthrough]\nenabled = true\n",
            standin_tokens={self.sa_token: UserInfo.service_account("default", "deployer")},
            standin_rbac=[DEPLOYER_RBAC],
        )

    def test_service_account_token(self) -> Deferred[None]:
        """
        A token the issuer did not mint but the apiserver's TokenReview accepts goes
        upstream as it is, without impersonation, and RBAC decides for that account.
        """

        async def run() -> None:
            self.stack.standin.add_pod("web-1")
            kubeconfig = self.stack.write_kubeconfig("kubeconfig", {"deployer": self.sa_token})
            output, code = await self.kubectl(kubeconfig, "get", "pods")
            self.assertEqual(code, 0, output)
            self.assertIn("web-1", output)
            output, code = await self.kubectl(kubeconfig, "get", "services")
            self.assertEqual(
                output.splitlines()[-1],
                'Error from server (Forbidden): services is forbidden: User '
                '"system:serviceaccount:default:deployer" cannot list resource "services" in API '
                'group "" in the namespace "default"',
            )
            listed = [r for r in self.stack.standin.requests if r.path == "/api/v1/namespaces/default/pods"]
            self.assertEqual(listed[-1].requester.name, "system:serviceaccount:default:deployer")
            self.assertEqual(listed[-1].header_values("impersonate-user"), [])
            reviews = [r for r in self.stack.standin.requests if r.path.endswith("/tokenreviews")]
            # Answers are cached: one review for all of kubectl's requests.
            self.assertEqual(len(reviews), 1)
            self.assertIn('outcome="passthrough"', await self.metrics())

            kubeconfig = self.stack.write_kubeconfig("bad", {"nobody": "not-a-valid-token"})
            output, code = await self.kubectl(kubeconfig, "get", "pods")
            self.assertTrue(output.splitlines()[-1].startswith(LOGGED_OUT), output)

        return ensureDeferred(run())

    def test_kubectl_create_token(self) -> Deferred[None]:
        """
        A token minted with ``kubectl create token`` (through the proxy, by an admin)
        works through the proxy as that service account.
        """

        async def run() -> None:
            self.stack.standin.add_service_account("deployer")
            self.stack.standin.add_pod("web-1")
            output, code = await self.kubectl(self.users(), "--context", "admin", "create", "token", "deployer")
            self.assertEqual(code, 0, output)
            token = output.strip()
            self.assertTrue(token.startswith("sa."), output)
            kubeconfig = self.stack.write_kubeconfig("minted", {"deployer": token})
            output, code = await self.kubectl(kubeconfig, "get", "pods")
            self.assertEqual(code, 0, output)
            self.assertIn("web-1", output)
            listed = [r for r in self.stack.standin.requests if r.path == "/api/v1/namespaces/default/pods"]
            self.assertEqual(listed[-1].requester.name, "system:serviceaccount:default:deployer")

        return ensureDeferred(run())

    async def metrics(self) -> str:
        import treq

        response = await treq.get(self.stack.health_url + "/metrics", persistent=False, timeout=5)
        return await treq.text_content(response)


class ClientImpersonationTests(StackTestCase):
    """
    ``kubectl --as`` with ``allow_client_impersonation = true``.
    """

    def make_stack(self) -> LoopbackStack:
        return LoopbackStack(
            reactor, os.path.abspath(self.mktemp()),
            extra_ini="[impersonation]\nallow_client_impersonation = true\n",
        )

    def test_as(self) -> Deferred[None]:
        """
        An admin may act as the reader and then gets the reader's Forbidden; the
        apiserver sees the reader with the admin recorded as original user; the
        reader may not act as anyone and gets the impersonation Forbidden.
        """

        async def run() -> None:
            kubeconfig = self.users()
            output, code = await self.kubectl(
                kubeconfig, "--context", "admin", "--as", "banyan:myuser@example.com",
                "--as-group", "banyan:any-employee-personal-device", "get", "services",
            )
            self.assertEqual(output.splitlines()[-1], FORBIDDEN_SERVICES)
            seen = [r for r in self.stack.standin.requests if r.path.endswith("/services")][-1]
            self.assertEqual(seen.user, "banyan:myuser@example.com")
            self.assertEqual(dict(seen.extra)["originaluser.banyan-kproxy.io/user"],
                             ("banyan:admin@example.com",))
            output, code = await self.kubectl(
                kubeconfig, "--context", "reader", "--as", "banyan:admin@example.com", "get", "pods",
            )
            self.assertEqual(
                output.splitlines()[-1],
                'Error from server (Forbidden): users "banyan:admin@example.com" is forbidden: User '
                '"banyan:myuser@example.com" cannot impersonate resource "users" in API group "" at '
                "the cluster scope",
            )

        return ensureDeferred(run())
