"""One-time TLS identities for CRIU's page traffic between the two nodes of a migration.

Each node makes its own key and self-signed certificate for one migration only and keeps the
key to itself; the certificates (public) cross the authenticated SSH channel, and each CRIU
trusts exactly the peer's certificate (``--tls-cacert`` = the peer's). CRIU's TLS (GnuTLS)
requires and verifies a certificate on both ends, so only the two processes of this
migration can talk on the page port. The name check is off (``--tls-no-cn-verify``): trust is
pinned to a certificate that nobody else has, which says more than any name.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vzbackup.criu.driver import TLSFiles

VALIDITY = datetime.timedelta(days=1)
CERT, KEY, PEER = "cert.pem", "key.pem", "peer.pem"


def fingerprint(pem: str) -> str:
    """SHA-256 of the DER certificate, hex."""
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@dataclass
class Identity:
    """This node's key and certificate for one migration, in a private directory."""

    dir: Path

    @classmethod
    def create(cls, role: str, under: Path | None = None) -> Identity:
        """A new identity in a private directory below *under* (the node's run dir, so a
        killed migration's leftovers go with the node's runtime state)."""
        if under is not None:
            under.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix=f"vzb-tls-{role}-", dir=under))  # 0700
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vzbackup-migrate-{role}")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=True,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        (d / KEY).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(d)

    @property
    def cert_pem(self) -> str:
        return (self.dir / CERT).read_text()

    def trust(self, peer_pem: str, expect_fingerprint: str | None = None) -> None:
        """Trust exactly the peer's certificate (checked against its fingerprint if given)."""
        if expect_fingerprint is not None and fingerprint(peer_pem) != expect_fingerprint:
            raise ValueError("the peer's TLS certificate does not match its fingerprint")
        (self.dir / PEER).write_text(peer_pem)

    def criu_args(self) -> list[str]:
        """CRIU command-line options for TLS with the peer."""
        return ["--tls", "--tls-cert", str(self.dir / CERT), "--tls-key", str(self.dir / KEY),
                "--tls-cacert", str(self.dir / PEER), "--tls-no-cn-verify"]

    def files(self) -> TLSFiles:
        """The same for a CRIU dump through pycriu."""
        return TLSFiles(str(self.dir / CERT), str(self.dir / KEY), str(self.dir / PEER))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
