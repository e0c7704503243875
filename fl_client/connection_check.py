"""Before a SuperNode starts: does the SuperLink speak the transport this site is about to use?

Flower's SuperNode retries a failed connection forever without saying why, so a site joining a TLS
SuperLink in plain HTTP (or the reverse, or with the wrong CA) would wait silently. One TLS handshake
tells these cases apart in a second, and the error says what to change.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reachable: bool
    message: str


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _speaks_tls(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """(True, "") if a TLS handshake completes without verifying anything; (False, why) otherwise."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return True, ""
    except (ssl.SSLError, ConnectionResetError, TimeoutError, OSError) as exc:
        return False, str(exc)


def probe_superlink(address: str, *, ca_file: Path | None, timeout: float = 5.0) -> ProbeResult:
    """Check `address` for the transport implied by `ca_file` (TLS checked against that CA) or its absence
    (plain HTTP)."""
    host, port = _split(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return ProbeResult(True, False, f"nothing answers at {address} yet ({exc.strerror or exc}); the SuperNode "
                                        "will keep retrying until the SuperLink is up")
    if ca_file is None:
        tls, _ = _speaks_tls(host, port, timeout)
        if tls:
            return ProbeResult(False, True, f"the SuperLink at {address} uses TLS but this site was started with "
                                            "--insecure (plain HTTP); join with the consortium's kit "
                                            "(--kit DIR --key FILE) or --root-certificates CA.crt")
        return ProbeResult(True, True, f"{address} speaks plain HTTP")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return ProbeResult(True, True, f"{address}: TLS certificate verified against {ca_file}")
    except ssl.SSLCertVerificationError as exc:
        return ProbeResult(False, True, f"the SuperLink at {address} presents a certificate that {ca_file} does "
                                        f"not vouch for ({exc.verify_message}); check that the kit is this "
                                        "consortium's and that the address's host is on the SuperLink's "
                                        "certificate (superlink.hosts in the consortium file)")
    except (ssl.SSLError, ConnectionResetError, OSError) as exc:
        tls, _ = _speaks_tls(host, port, timeout)
        if not tls:
            return ProbeResult(False, True, f"the SuperLink at {address} does not speak TLS (it was started with "
                                            "--insecure, plain HTTP) but this site expects TLS; ask the "
                                            "coordinator to start it with `llnm-server start --provision DIR`, "
                                            f"or join a loopback development SuperLink with --insecure ({exc})")
        return ProbeResult(False, True, f"TLS handshake with {address} failed: {exc}")
