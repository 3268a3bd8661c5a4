"""TLS material for every backend: one certificate per run, removed at the end of the run.

Every executor creates a fresh EC P-256 key and a self-signed certificate per run, and the
scheduler, the workers and the client require TLS with that certificate as the only trusted
authority: a client without it cannot connect, and a plain-TCP client is refused.

- Where the workers receive their configuration from this process (the local backend, whose
  worker processes are started by nannies in this process), the key and the certificate stay in
  memory: futures_hpc writes no file.
- Where the workers start elsewhere and read them from a shared file system (batch jobs, MPI
  ranks), they are written with mode 0600 into the run's ``tls`` directory (mode 0700) and
  deleted when the executor closes, by :func:`remove_run_credentials`. If the process is killed
  before that (SIGKILL), the next executor started by the same user on the same host, or
  ``futures-hpc cancel``, deletes them, found through the run's discovery record.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
from distributed.security import Security

from .errors import OptionError

logger = logging.getLogger("futures_hpc")

#: File names inside the run's TLS directory.
CERTIFICATE_FILE = "run-certificate.pem"
KEY_FILE = "run-key.pem"
#: Name of the run's TLS directory inside its log directory.
TLS_DIRECTORY = "tls"


@dataclass(frozen=True)
class RunCredentials:
    """The per-run key and certificate, and the :class:`distributed.security.Security` on them.

    Attributes
    ----------
    security : distributed.security.Security
        For the scheduler, the workers and the client (``require_encryption=True``).
    certificate_pem, key_pem : str
        The certificate and the private key, as PEM texts.
    certificate_path, key_path : pathlib.Path or None
        The PEM files (mode 0600), or None when the credentials exist in memory only.

    """

    security: Security
    certificate_pem: str = field(repr=False)
    key_pem: str = field(repr=False)
    certificate_path: Path | None = None
    key_path: Path | None = None

    @property
    def in_memory(self) -> bool:
        """Whether no file holds the credentials."""
        return self.key_path is None

    def worker_environment(self, inline: bool = False) -> dict[str, str]:
        """Dask configuration for a worker process, as environment variables.

        Parameters
        ----------
        inline : bool
            Put the PEM contents themselves in the variables (for workers that share no file
            system with the client, such as ECS tasks) instead of the file paths. Always the
            case for credentials held in memory only.

        Returns
        -------
        dict of str to str
            ``DASK_DISTRIBUTED__COMM__...`` variables that make a worker use TLS with these
            credentials.

        """
        if inline or self.in_memory:
            certificate, key = self.certificate_pem, self.key_pem
        else:
            certificate, key = str(self.certificate_path), str(self.key_path)
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

    def remove_files(self) -> None:
        """Delete the key and certificate files and their directory (nothing if in memory)."""
        remove_run_credentials(self.certificate_path, self.key_path)


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


def _security_for(certificate: str, key: str) -> Security:
    """TLS for every role with ``certificate`` as the only authority (paths or PEM texts)."""
    return Security(
        require_encryption=True,
        tls_ca_file=certificate,
        tls_scheduler_cert=certificate,
        tls_scheduler_key=key,
        tls_worker_cert=certificate,
        tls_worker_key=key,
        tls_client_cert=certificate,
        tls_client_key=key,
    )


def create_run_credentials(directory: str | os.PathLike[str] | None = None) -> RunCredentials:
    """Create a fresh key and self-signed certificate for one run.

    Parameters
    ----------
    directory : path-like, optional
        Where to write them (created with mode 0700 if missing); it must be readable by the
        workers (for batch backends: on a file system shared with the compute nodes). Without
        it, the credentials stay in memory: the :class:`~distributed.security.Security` holds
        the PEM texts themselves, for workers that receive it from this process.

    Returns
    -------
    RunCredentials
        The PEM texts, the files if any, and the :class:`~distributed.security.Security` that
        uses them.

    """
    certificate_text, key_text = _self_signed_certificate()
    if directory is None:
        return RunCredentials(_security_for(certificate_text, key_text), certificate_text,
                              key_text)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    certificate_path = directory / CERTIFICATE_FILE
    key_path = directory / KEY_FILE
    _write_private(certificate_path, certificate_text)
    _write_private(key_path, key_text)
    security = _security_for(str(certificate_path), str(key_path))
    return RunCredentials(security, certificate_text, key_text, certificate_path, key_path)


def remove_run_credentials(
    certificate_path: str | os.PathLike[str] | None,
    key_path: str | os.PathLike[str] | None,
) -> bool:
    """Delete a run's key and certificate files, and their directory once it is empty.

    Used by every path on which a run ends: the executor's close (normal exit, exception,
    Ctrl-C, interpreter exit), the SIGTERM handler, and the sweep of discovery records left by
    killed processes. Only files with the names this module gives them are touched, so a damaged
    record cannot make it delete anything else. Never raises.

    Parameters
    ----------
    certificate_path, key_path : path-like or None
        The files, as :class:`RunCredentials` or a discovery record names them.

    Returns
    -------
    bool
        Whether any file was deleted.

    """
    removed = False
    directories = set()
    for path, expected_name in ((key_path, KEY_FILE), (certificate_path, CERTIFICATE_FILE)):
        if not path:
            continue
        path = Path(path)
        if path.name != expected_name:
            logger.warning("not deleting %s: not a futures_hpc TLS file", path)
            continue
        directories.add(path.parent)
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("could not delete the TLS file %s: %r", path, error)
    for directory in directories:
        if directory.name == TLS_DIRECTORY:
            with contextlib.suppress(OSError):  # not empty, or gone already
                directory.rmdir()
    if removed:
        logger.debug("deleted the TLS files in %s", ", ".join(map(str, directories)))
    return removed


def run_credentials(
    security: Any, tls_directory: Callable[[], Path | None]
) -> RunCredentials | None:
    """The run's own credentials for ``security=`` (None, True, False or a ``Security``).

    None means the config key ``futures_hpc.security`` (default True). True makes a
    certificate and key for the run: kept in memory if ``tls_directory()`` is None, else
    written there (mode 0600). False, or the user's own ``Security``, needs none: None.

    Raises
    ------
    OptionError
        For any other value.

    """
    security = check_security(security)
    if security is None:
        security = dask.config.get("futures_hpc.security", True)
    return create_run_credentials(tls_directory()) if security is True else None


def check_security(value: Any) -> Any:
    """``value`` if it is a valid ``security=``: None, True, False or a ``Security``.

    Raises
    ------
    OptionError
        For any other value, naming it and what is allowed.

    """
    if value is None or isinstance(value, (bool, Security)):
        return value
    raise OptionError(
        f"security={value!r} is not allowed; security must be True (TLS with a key made for the "
        "run, the default), False (no TLS) or a distributed.security.Security"
    )


def dashboard_link_for(link: str | None, dashboard_address: str) -> str | None:
    """The dashboard's URL, saying ``localhost`` when the dashboard listens there only.

    The scheduler gives its own host name or address, which a browser would not reach when the
    dashboard is bound to localhost (the default).
    """
    host = dashboard_address.rpartition(":")[0]
    if link and host in ("localhost", "127.0.0.1"):
        parts = urllib.parse.urlsplit(link)
        netloc = f"{host}:{parts.port}" if parts.port else host
        link = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return link
