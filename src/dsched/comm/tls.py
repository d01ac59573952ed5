"""TLS settings for ``tls://`` comms, built exactly as distributed builds them.

``distributed.security.Security`` reads the same Dask config keys as the stock scheduler
(``distributed.comm.tls.ca-file``, ``distributed.comm.tls.<role>.cert`` / ``.key``,
``distributed.comm.tls.min-version`` / ``max-version`` / ``ciphers`` and
``distributed.comm.require-encryption``) and makes both SSL contexts (protocol.md §1.6):
``verify_mode=CERT_REQUIRED`` on both sides, so a peer without a certificate signed by the
cluster CA is refused during the TLS handshake (mutual TLS), and ``check_hostname=False``
(a dedicated cluster CA, peers addressed by IP). There is a context only when a CA file and
a certificate are both configured.

The scheduler uses one role, ``scheduler``, for both directions: the listener presents the
scheduler certificate to clients and workers, and its outgoing connections to workers and
nannies (gather, scatter, broadcast, restart) present it too.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

__all__ = ["TLSSettings"]

_MISSING_CONTEXT = (
    "a tls:// listener needs a CA file and a certificate (with its key): --tls-ca-file, "
    "--tls-cert, --tls-key, or the config keys distributed.comm.tls.ca-file, "
    "distributed.comm.tls.{role}.cert and distributed.comm.tls.{role}.key"
)


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """The SSL contexts of one role, and whether plain ``tcp://`` is refused."""

    listen_context: ssl.SSLContext | None = None  # server side of tls:// listeners
    connect_context: ssl.SSLContext | None = None  # client side of outgoing tls:// comms
    require_encryption: bool = False
    role: str = "scheduler"

    @classmethod
    def from_security(cls, security: Any = None, role: str = "scheduler") -> TLSSettings:
        """From a ``distributed.security.Security`` (or a dict of its keyword arguments);
        ``None`` reads everything from the Dask config, as ``Security()`` does.

        Raises ValueError when the configuration is unusable (missing or unreadable files,
        an unsupported TLS version).
        """
        from distributed.security import Security

        try:
            # distributed's Security is not annotated (no-untyped-call).
            if security is None:
                security = Security()  # type: ignore[no-untyped-call]
            elif isinstance(security, dict):
                security = Security(**security)  # type: ignore[no-untyped-call]
            listen_context = security.get_listen_args(role)["ssl_context"]
            connect_context = security.get_connection_args(role)["ssl_context"]
        except (OSError, ValueError, TypeError) as error:  # ssl.SSLError is an OSError
            raise ValueError(f"invalid TLS configuration: {error}") from error
        return cls(listen_context, connect_context, bool(security.require_encryption), role)

    @classmethod
    def from_options(
        cls,
        ca_file: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        role: str = "scheduler",
    ) -> TLSSettings:
        """What ``dask scheduler --tls-ca-file/--tls-cert/--tls-key`` does: the given files
        override the config keys, and, as in distributed, giving any of them makes
        encryption required unless ``distributed.comm.require-encryption`` is set."""
        given = {
            "tls_ca_file": ca_file,
            f"tls_{role}_cert": cert,
            f"tls_{role}_key": key,
        }
        return cls.from_security({k: v for k, v in given.items() if v is not None}, role)

    def listen_protocol(self, protocol: str | None = None) -> str:
        """The scheme to listen with: ``protocol`` ("tcp", "tls", "tls://", ...) or, if
        None, "tls" when encryption is required (as distributed picks it), else "tcp".

        Raises ValueError for an unsupported protocol, a tls:// listener without a
        certificate, or a tcp:// listener while encryption is required.
        """
        if protocol is None:
            protocol = "tls" if self.require_encryption else "tcp"
        scheme = protocol.removesuffix("://")
        if scheme not in ("tcp", "tls"):
            raise ValueError(f"protocol {protocol!r} is not supported (only tcp and tls)")
        if scheme == "tls" and self.listen_context is None:
            raise ValueError(_MISSING_CONTEXT.format(role=self.role))
        if scheme == "tcp" and self.require_encryption:
            raise ValueError(
                "encryption is required (distributed.comm.require-encryption, or TLS files "
                "were given): refusing to listen on tcp://; use --protocol tls"
            )
        return scheme
