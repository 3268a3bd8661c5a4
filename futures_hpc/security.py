"""TLS material for networked backends.

Every executor whose workers connect over a network creates one certificate per run. The key and
the certificate are written with mode 0600 into a directory of mode 0700 that the workers can read
(the run's log directory on a shared file system for batch backends), and both the scheduler and
the workers require TLS with that certificate as the only trusted authority: a client without it
cannot connect, and a plain-TCP client is refused.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from distributed.security import Security

#: File names inside the run's TLS directory.
CERTIFICATE_FILE = "run-certificate.pem"
KEY_FILE = "run-key.pem"


@dataclass(frozen=True)
class RunCredentials:
    """The per-run TLS files and the :class:`distributed.security.Security` built on them.

    Attributes
    ----------
    security : distributed.security.Security
        For the scheduler and the client (``require_encryption=True``).
    certificate_path, key_path : pathlib.Path
        The PEM files, mode 0600.

    """

    security: Security
    certificate_path: Path
    key_path: Path

    def worker_environment(self, inline: bool = False) -> dict[str, str]:
        """Dask configuration for a worker process, as environment variables.

        Parameters
        ----------
        inline : bool
            Put the PEM contents themselves in the variables (for workers that share no file
            system with the client, such as ECS tasks) instead of the file paths.

        Returns
        -------
        dict of str to str
            ``DASK_DISTRIBUTED__COMM__...`` variables that make a worker use TLS with these
            credentials.

        """
        if inline:
            certificate = self.certificate_path.read_text()
            key = self.key_path.read_text()
        else:
            certificate = str(self.certificate_path)
            key = str(self.key_path)
        prefix = "DASK_DISTRIBUTED__COMM__"
        return {
            prefix + "REQUIRE_ENCRYPTION": "True",
            prefix + "DEFAULT_SCHEME": "tls",
            prefix + "TLS__CA_FILE": certificate,
            prefix + "TLS__WORKER__CERT": certificate,
            prefix + "TLS__WORKER__KEY": key,
            prefix + "TLS__CLIENT__CERT": certificate,
            prefix + "TLS__CLIENT__KEY": key,
        }


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file readable by its owner only (mode 0600)."""
    if path.exists():
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def _self_signed_certificate(days: int = 30) -> tuple[str, str]:
    """A fresh EC P-256 key and a certificate it signs, as PEM texts (certificate, key).

    As :meth:`distributed.security.Security.temporary`, but with an elliptic-curve key: the TLS
    handshake of every worker and client connection is several times cheaper than with RSA-2048.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    key_text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_text


def create_run_credentials(directory: str | os.PathLike[str]) -> RunCredentials:
    """Create a fresh key and self-signed certificate for one run and write them to ``directory``.

    Parameters
    ----------
    directory : path-like
        Created with mode 0700 if missing. It must be readable by the workers (for batch
        backends: on a file system shared with the compute nodes).

    Returns
    -------
    RunCredentials
        The files and the :class:`~distributed.security.Security` that uses them.

    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    certificate_text, key_text = _self_signed_certificate()
    certificate_path = directory / CERTIFICATE_FILE
    key_path = directory / KEY_FILE
    _write_private(certificate_path, certificate_text)
    _write_private(key_path, key_text)
    security = Security(
        require_encryption=True,
        tls_ca_file=str(certificate_path),
        tls_scheduler_cert=str(certificate_path),
        tls_scheduler_key=str(key_path),
        tls_worker_cert=str(certificate_path),
        tls_worker_key=str(key_path),
        tls_client_cert=str(certificate_path),
        tls_client_key=str(key_path),
    )
    return RunCredentials(security, certificate_path, key_path)
