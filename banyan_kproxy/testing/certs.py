"""
Certificates generated at run time with ``cryptography``, for tests and the demo.

A `CertificateAuthority` signs server certificates (``serverAuth``, with DNS and IP
subject alternative names), client certificates (``clientAuth``; Kubernetes reads
the common name as the user name and each organization as a group) and intermediate
CAs.  Keys are EC P-256 so that generating a few per test stays fast.  Works with
cryptography 39 (naive ``datetime`` accessors) and with current releases.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable

from attr import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

IPLike = str | ipaddress.IPv4Address | ipaddress.IPv6Address
PathLike = str | os.PathLike[str]


def not_valid_after(certificate: x509.Certificate) -> datetime.datetime:
    """
    The certificate's notAfter as an aware UTC ``datetime`` on any cryptography version.
    """
    aware = getattr(certificate, "not_valid_after_utc", None)
    if aware is not None:
        return aware
    return certificate.not_valid_after.replace(tzinfo=datetime.UTC)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organizations: Iterable[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: float,
    ca: bool,
) -> x509.CertificateBuilder:
    now = _now()
    not_after = now + datetime.timedelta(days=days)
    not_before = min(now, not_after) - datetime.timedelta(hours=1)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )


@frozen
class IssuedCertificate:
    """
    A leaf certificate and its private key, both PEM.

    ``intermediates_pem`` holds the CA certificates between the leaf and the root
    (empty when a root signed it); ``ca_cert_pem`` is the root, for trust bundles.
    """

    cert_pem: bytes
    key_pem: bytes
    ca_cert_pem: bytes
    intermediates_pem: bytes = b""

    @property
    def chain_pem(self) -> bytes:
        """
        The leaf followed by any intermediates: what a server or client presents.
        """
        return self.cert_pem + self.intermediates_pem

    @property
    def certificate(self) -> x509.Certificate:
        """
        The leaf certificate as a ``cryptography`` object.
        """
        return x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, directory: PathLike, name: str) -> tuple[str, str]:
        """
        Write ``<name>.crt`` (`chain_pem`) and ``<name>.key`` (mode 0600) into
        ``directory``, overwriting files already there; return their paths.
        """
        directory = os.fspath(directory)
        cert_path = os.path.join(directory, name + ".crt")
        key_path = os.path.join(directory, name + ".key")
        with open(cert_path, "wb") as f:
            f.write(self.chain_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        return cert_path, key_path


@frozen
class CertificateAuthority:
    """
    A CA that issues server, client and intermediate CA certificates.

    A root is self-signed (`generate`).  An intermediate (`issue_intermediate`)
    keeps the CA certificates between itself and the root in ``intermediates_pem``
    and the root in ``root_pem``, so what it issues carries the whole chain.
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    intermediates_pem: bytes = b""
    root_pem: bytes | None = None

    @classmethod
    def generate(cls, common_name: str = "banyan-kproxy test CA") -> CertificateAuthority:
        """
        A new root CA with a fresh P-256 key, valid from an hour ago for ten years.
        """
        key = _new_key()
        certificate = _builder(
            _name(common_name), key.public_key(), None, key, 3650, ca=True
        ).sign(key, hashes.SHA256())
        return cls(key=key, certificate=certificate)

    @property
    def cert_pem(self) -> bytes:
        """
        This CA's own certificate, PEM.
        """
        return _pem(self.certificate)

    @property
    def trust_pem(self) -> bytes:
        """
        The root certificate, PEM: what clients put in their trust bundle.
        """
        return self.cert_pem if self.root_pem is None else self.root_pem

    def write_cert(self, directory: PathLike, name: str = "ca") -> str:
        """
        Write the root certificate (`trust_pem`) to ``<directory>/<name>.crt`` and
        return the path.
        """
        path = os.path.join(os.fspath(directory), name + ".crt")
        with open(path, "wb") as f:
            f.write(self.trust_pem)
        return path

    def issue_intermediate(self, common_name: str) -> CertificateAuthority:
        """
        A new CA signed by this one.
        """
        key = _new_key()
        certificate = _builder(
            _name(common_name), key.public_key(), self.certificate, self.key, 1825, ca=True
        ).sign(self.key, hashes.SHA256())
        above = b"" if self.root_pem is None else self.cert_pem + self.intermediates_pem
        return CertificateAuthority(
            key=key,
            certificate=certificate,
            intermediates_pem=above,
            root_pem=self.trust_pem,
        )

    def issue(
        self,
        common_name: str,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[IPLike] = (),
        email_addresses: Iterable[str] = (),
        organizations: Iterable[str] = (),
        client: bool = False,
        not_valid_after_days: float = 365,
    ) -> IssuedCertificate:
        """
        Sign a new leaf certificate with a fresh P-256 key.

        Server certificates (the default) carry the ``serverAuth`` usage and the
        given names (DNS, IP, email) as subject alternative names.  Client certificates carry
        ``clientAuth``; Kubernetes reads their CN as the user and each O as a group.
        A negative ``not_valid_after_days`` gives an already expired certificate.
        """
        key = _new_key()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = _builder(
            _name(common_name, organizations),
            key.public_key(),
            self.certificate,
            self.key,
            not_valid_after_days,
            ca=False,
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(str(i))) for i in ip_addresses]
        names += [x509.RFC822Name(e) for e in email_addresses]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        intermediates = b"" if self.root_pem is None else self.cert_pem + self.intermediates_pem
        return IssuedCertificate(
            cert_pem=_pem(certificate),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            ca_cert_pem=self.trust_pem,
            intermediates_pem=intermediates,
        )
