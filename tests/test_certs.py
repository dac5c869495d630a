"""
Tests for `banyan_kproxy.testing.certs`: certificates generated for tests and the demo.
"""

from __future__ import annotations

import ipaddress
import os
import stat

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.testing.certs import CertificateAuthority, not_valid_after


class CertificateAuthorityTests(SynchronousTestCase):
    """
    What the test CA issues.
    """

    def setUp(self) -> None:
        self.ca = CertificateAuthority.generate("test root")

    def test_server_certificate(self) -> None:
        """
        A server certificate carries serverAuth and the DNS and IP names asked for.
        """
        issued = self.ca.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"])
        cert = issued.certificate
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertEqual(cert.issuer, self.ca.certificate.subject)
        self.assertEqual(issued.chain_pem, issued.cert_pem)

    def test_client_certificate(self) -> None:
        """
        A client certificate carries clientAuth, its CN as user and each O as group.
        """
        cert = self.ca.issue("alice", organizations=["dev", "ops"], client=True).certificate
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(
            [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)], ["dev", "ops"]
        )
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "alice")

    def test_intermediate_chain(self) -> None:
        """
        A certificate from an intermediate carries the intermediates in its chain and the root for trust.
        """
        middle = self.ca.issue_intermediate("middle")
        lower = middle.issue_intermediate("lower")
        issued = lower.issue("leaf")
        self.assertEqual(issued.chain_pem, issued.cert_pem + lower.cert_pem + middle.cert_pem)
        self.assertEqual(issued.ca_cert_pem, self.ca.cert_pem)
        self.assertEqual(lower.trust_pem, self.ca.cert_pem)
        self.assertEqual(issued.certificate.issuer, lower.certificate.subject)

    def test_expiry(self) -> None:
        """
        ``not_valid_after_days`` sets the expiry, in the past when negative.
        """
        import datetime

        now = datetime.datetime.now(datetime.UTC)
        expired = not_valid_after(self.ca.issue("old", not_valid_after_days=-1).certificate)
        self.assertLess(expired, now)
        fresh = not_valid_after(self.ca.issue("new", not_valid_after_days=2).certificate)
        self.assertGreater(fresh, now + datetime.timedelta(days=1))

    def test_write(self) -> None:
        """
        ``write`` puts the chain and a key readable only by its owner into the directory.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        issued = self.ca.issue("server")
        cert_path, key_path = issued.write(directory, "server")
        self.assertEqual(cert_path, os.path.join(directory, "server.crt"))
        with open(cert_path, "rb") as f:
            self.assertEqual(f.read(), issued.chain_pem)
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), issued.key_pem)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
