"""Before connecting: does the SuperLink speak the transport this side is about to use?

Flower's SuperNode retries a failed connection forever without saying why, so a site joining a TLS
SuperLink in plain HTTP (or the reverse, or with the wrong CA) would wait silently; `flwr run` only says the
SuperLink is unavailable. One TLS handshake tells these cases apart in a second. Used by `llnm-site join`
and `llnm-server run`, which each add what their user should change.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

OK = "ok"
DOWN = "down"  # nothing listens (yet)
SERVER_TLS = "server-uses-tls"  # this side would talk plain HTTP to a TLS SuperLink
SERVER_PLAIN = "server-is-plain"  # this side expects TLS from a plain-HTTP SuperLink
UNTRUSTED = "untrusted-certificate"  # TLS, but the CA does not vouch for the certificate (or the host name)
TLS_ERROR = "tls-error"


@dataclass(frozen=True)
class ProbeResult:
    kind: str
    message: str

    @property
    def ok(self) -> bool:
        return self.kind in (OK, DOWN)


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port), with an error naming what is wrong."""
    text = str(address).strip()
    if "://" in text:
        raise ValueError(f"{address!r}: give HOST:PORT without a scheme")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r}: expected HOST:PORT")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{address!r}: port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"{address!r}: port {number} is outside 1-65535")
    return host, number


def free_local_port() -> int:
    """A TCP port the operating system reports free on loopback now (another program may still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs; `0.0.0.0` and every other address are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """True if a TLS handshake completes when nothing is verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def probe_superlink(address: str, *, ca_file: Path | None, timeout: float = 5.0) -> ProbeResult:
    """Check `address` for the transport implied by `ca_file` (TLS verified against that CA) or by its absence
    (plain HTTP)."""
    host, port = split_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return ProbeResult(DOWN, f"nothing answers at {address} ({exc.strerror or exc})")
    if ca_file is None:
        if _speaks_tls(host, port, timeout):
            return ProbeResult(SERVER_TLS, f"the SuperLink at {address} uses TLS, but plain HTTP (--insecure) was "
                                           "asked for")
        return ProbeResult(OK, f"{address} speaks plain HTTP")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return ProbeResult(OK, f"{address}: TLS certificate verified against {ca_file}")
    except ssl.SSLCertVerificationError as exc:
        return ProbeResult(UNTRUSTED, f"the SuperLink at {address} presents a certificate that {ca_file} does not "
                                      f"vouch for ({exc.verify_message}); check that this is the consortium's CA "
                                      "and that the address's host is on the SuperLink's certificate "
                                      "(superlink.hosts in the consortium file)")
    except (ssl.SSLError, OSError) as exc:
        if not _speaks_tls(host, port, timeout):
            return ProbeResult(SERVER_PLAIN, f"the SuperLink at {address} does not speak TLS (it was started with "
                                             f"--insecure, plain HTTP), but TLS was expected ({exc})")
        return ProbeResult(TLS_ERROR, f"TLS handshake with {address} failed: {exc}")
