"""What the coordinator hands a hospital and what the hospital hands back, defined once for both roles.

* The onboarding kit (`kits/<site>/` of `llnm-server provision`): `kit.json` names the site, the SuperLink
  address and the CA certificate with its SHA-256, so a tampered or stale certificate is caught.
* The site's key pair (`llnm-site keygen`): an ECDSA P-384 key in OpenSSH format, the form Flower's
  SuperNode authentication reads (`flower-supernode --auth-supernode-private-key`); only the `.pub`
  travels, to `llnm-server register-site`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared_model.config import ConfigError

KIT_FILE = "kit.json"
KIT_FORMAT = "llnm-fl site kit"


def certificate_sha256(path: Path) -> str:
    """SHA-256 of a PEM certificate's DER bytes (what `openssl x509 -fingerprint -sha256` shows)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class SiteKit:
    folder: Path
    site: str
    superlink: str
    ca_cert: Path
    consortium: str


def load_kit(folder: str | Path) -> SiteKit:
    """A site's onboarding kit, checked: the CA certificate must match the fingerprint in kit.json."""
    f = Path(folder)
    meta_path = f / KIT_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{f}: not an onboarding kit (no {KIT_FILE}); the coordinator makes kits with "
                          "`llnm-server provision`") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != KIT_FORMAT:
        raise ConfigError(f"{meta_path}: not an llnm-fl site kit")
    for key in ("site", "superlink", "ca_certificate", "ca_sha256"):
        if not meta.get(key):
            raise ConfigError(f"{meta_path}: missing {key!r}")
    ca = f / str(meta["ca_certificate"])
    if not ca.is_file():
        raise ConfigError(f"{ca}: the kit's CA certificate is missing")
    try:
        actual = certificate_sha256(ca)
    except ValueError as exc:
        raise ConfigError(f"{ca}: not a PEM certificate ({exc})") from None
    if actual != meta["ca_sha256"]:
        raise ConfigError(f"{ca}: SHA-256 {actual} does not match kit.json's ca_sha256 {meta['ca_sha256']}; "
                          "ask the coordinator for a fresh kit")
    return SiteKit(f.resolve(), str(meta["site"]), str(meta["superlink"]), ca.resolve(),
                   str(meta.get("consortium", "")))


# ---- site keys -------------------------------------------------------------------------------------------

def make_site_key() -> tuple[bytes, bytes]:
    """A new (private, public) pair in OpenSSH format: ECDSA on NIST P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def check_site_private_key(path: Path) -> None:
    """The site's private key is readable, unencrypted OpenSSH ECDSA (what the SuperNode signs with); warns when
    other users can read it."""
    import sys

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--key {path}: cannot read ({exc.strerror})") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--key {path}: not an unencrypted OpenSSH private key ({exc}); the .pub goes to the "
                          "coordinator, the private key is given here") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"--key {path}: Flower's node authentication needs an ECDSA key (llnm-site keygen)")
    if path.stat().st_mode & 0o077:
        print(f"warning: {path} is readable by other users; chmod 600 it", file=sys.stderr)


def load_site_public_key(path: Path) -> tuple[bytes, str]:
    """(OpenSSH public key line, SHA-256 fingerprint) of a site's `.pub` file, or an error saying what is wrong
    (a private key sent by mistake is refused and named as such)."""
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{path} is a PRIVATE key: a site sends only its .pub file; this private key has "
                          "left the hospital and must be replaced (llnm-site keygen)")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an OpenSSH public key ({exc}); make one with `llnm-site keygen`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path}: Flower's SuperNode authentication needs an elliptic-curve (ECDSA) key, "
                          f"not {type(key).__name__}; make one with `llnm-site keygen`")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line, public_key_fingerprint(line)


def public_key_fingerprint(openssh_line: bytes) -> str:
    """SHA256:<base64> of the key blob, as `ssh-keygen -lf` prints it."""
    import base64

    blob = base64.b64decode(openssh_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
