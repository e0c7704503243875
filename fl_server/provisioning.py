"""Certificates and onboarding kits for a consortium (`llnm-server provision`).

What is made, with the `cryptography` package (no openssl scripts):

* a certificate authority (ECDSA P-384), kept by the coordinator: `ca/ca.key` never leaves `DIR`;
* the SuperLink's TLS certificate, signed by that CA, valid for the host names and IPs of the consortium
  file, and its key (`superlink/`);
* one onboarding kit per hospital (`kits/<site>/`): the CA certificate, the SuperLink address, a
  node-config template and instructions. A kit holds nothing secret: the hospital makes its own key pair
  with `llnm-site keygen` and sends only the public key.

Provisioning again with a longer site list keeps the CA, the SuperLink certificate (unless its hosts
changed) and the existing kits, so adding a hospital gives nobody else new credentials.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_server.consortium import ConsortiumConfig
from shared_model.config import ConfigError
from shared_model.protocol.site_kit import KIT_FILE, certificate_sha256

CA_CERT = Path("ca/ca.crt")
CA_KEY = Path("ca/ca.key")
SERVER_CA = Path("superlink/ca.crt")
SERVER_CERT = Path("superlink/server.crt")
SERVER_KEY = Path("superlink/server.key")
KITS = Path("kits")
REGISTRY = Path("registry.json")
FLWR_HOME = Path("flwr-home")
CONSORTIUM_FILE = Path("consortium.yaml")
CONNECTION = "llnm"


@dataclass
class ProvisionReport:
    out: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def note(self, path: Path, created: bool) -> None:
        (self.created if created else self.kept).append(str(path.relative_to(self.out)))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """A secret file readable by its owner only, created with those permissions (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_if_changed(path: Path, data: bytes, report: ProvisionReport) -> None:
    if path.is_file() and path.read_bytes() == data:
        report.note(path, False)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    report.note(path, True)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} consortium CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str],
                            days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    # A leaf certificate cannot outlive the CA that signs it.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def load_ca(cert_path: Path, key_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An existing CA (the coordinator's own, or one made by an earlier `provision`), checked to be a pair."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cert_path}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: the CA key must be an elliptic-curve key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ConfigError(f"{key_path} is not the private key of {cert_path}")
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ConfigError(f"{cert_path}: not a CA certificate (basicConstraints CA:FALSE)")
    except x509.ExtensionNotFound:
        raise ConfigError(f"{cert_path}: not a CA certificate (no basicConstraints)") from None
    return key, cert


def provision(cfg: ConsortiumConfig, out: Path, *, ca_cert: Path | None = None,
              ca_key: Path | None = None) -> ProvisionReport:
    """Create or update the provisioning folder `out`; returns what was created and what was kept."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = ProvisionReport(out)
    days = cfg.certificate_days

    # ---- the certificate authority ----
    if ca_cert or ca_key:
        if not (ca_cert and ca_key):
            raise ConfigError("an existing CA needs both --ca-cert and --ca-key")
        key, cert = load_ca(ca_cert, ca_key)
        if (out / CA_CERT).is_file() and (out / CA_CERT).read_bytes() != _pem_cert(cert):
            raise ConfigError(f"{out / CA_CERT}: this folder was provisioned with another CA; use a new --out")
        _write_if_changed(out / CA_CERT, _pem_cert(cert), report)
        if not (out / CA_KEY).is_file():
            _write_private(out / CA_KEY, _pem_key(key))
            report.note(out / CA_KEY, True)
    elif (out / CA_CERT).is_file() or (out / CA_KEY).is_file():
        key, cert = load_ca(out / CA_CERT, out / CA_KEY)
        report.note(out / CA_CERT, False)
    else:
        key, cert = make_ca(cfg.name, days)
        _write_private(out / CA_KEY, _pem_key(key))
        (out / CA_CERT).write_bytes(_pem_cert(cert))
        report.note(out / CA_KEY, True)
        report.note(out / CA_CERT, True)

    # ---- the SuperLink's certificate: kept unless its hosts changed or another CA signed it ----
    hosts = cfg.superlink.certificate_hosts()
    server_ok = False
    if (out / SERVER_CERT).is_file() and (out / SERVER_KEY).is_file():
        current = x509.load_pem_x509_certificate((out / SERVER_CERT).read_bytes())
        server_ok = (sorted(certificate_hosts(current)) == sorted(hosts) and current.issuer == cert.subject
                     and current.not_valid_after_utc > _now() + dt.timedelta(days=1))
    if server_ok:
        report.note(out / SERVER_CERT, False)
    else:
        skey, scert = make_server_certificate(key, cert, hosts, days)
        _write_private(out / SERVER_KEY, _pem_key(skey))
        (out / SERVER_CERT).write_bytes(_pem_cert(scert))
        report.note(out / SERVER_CERT, True)
        report.note(out / SERVER_KEY, True)
    _write_if_changed(out / SERVER_CA, _pem_cert(cert), report)

    # ---- the coordinator's own Flower CLI connection (register-site, revoke-site, run) ----
    write_flwr_connection(out / FLWR_HOME, cfg.superlink.address, out / CA_CERT, report)

    # ---- one kit per site ----
    ca_sha = certificate_sha256(out / CA_CERT)
    for site in cfg.sites:
        kit = out / KITS / site
        _write_if_changed(kit / "ca.crt", _pem_cert(cert), report)
        _write_if_changed(kit / KIT_FILE, (json.dumps({
            "format": "llnm-fl site kit", "version": 1, "consortium": cfg.name, "site": site,
            "superlink": cfg.superlink.address, "ca_certificate": "ca.crt", "ca_sha256": ca_sha,
        }, indent=2) + "\n").encode(), report)
        _write_if_changed(kit / "README.md", kit_instructions(cfg, site, ca_sha).encode(), report)
    _write_if_changed(out / CONSORTIUM_FILE, _consortium_yaml(cfg).encode(), report)
    return report


def connection_toml(address: str, root_certificates: str | None) -> str:
    """Flower's config.toml with one default connection `llnm`: TLS checked against `root_certificates` (an
    absolute path, as Flower requires), or plain HTTP when it is None."""
    transport = (f"root-certificates = {json.dumps(root_certificates)}" if root_certificates
                 else "insecure = true")
    return "\n".join(["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                      f"address = {json.dumps(address)}", transport, ""])


def write_flwr_connection(home: Path, address: str, ca_cert: Path, report: ProvisionReport | None = None) -> Path:
    """A FLWR_HOME whose default connection is this consortium's SuperLink over TLS."""
    text = connection_toml(address, str(ca_cert.resolve()))
    path = home / "config.toml"
    if report is not None:
        _write_if_changed(path, text.encode(), report)
    else:
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return home


def _consortium_yaml(cfg: ConsortiumConfig) -> str:
    import yaml

    return "# The consortium this folder was provisioned for (llnm-server provision).\n" + \
        yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def kit_instructions(cfg: ConsortiumConfig, site: str, ca_sha: str) -> str:
    return f"""# Joining the {cfg.name} consortium as `{site}`

This kit holds nothing secret: the CA certificate (`ca.crt`) and the SuperLink address
(`{cfg.superlink.address}`, also in `kit.json`). The commands below assume llnm-fl's virtual environment is
active (`source .venv/bin/activate`); docs/operator.md has every step with its checks.

1. Check that `ca.crt` is the one your coordinator announced (SHA-256 of the certificate, DER):
   `{ca_sha}`
2. Make this site's key pair on the hospital's machine (the private key never leaves it):
   `llnm-site keygen --out keys/ --name {site}`
3. Send **only** `keys/{site}.pub` to the coordinator, who registers it under the name `{site}`:
   `llnm-server register-site --provision CONSORTIUM_DIR --name {site} --public-key {site}.pub`
4. Check your data: `llnm-site check /path/to/{site}`
5. Approve the app the coordinator will run (its hash comes from `llnm-server app-hash`; compare it
   with the FAB if you are sent one): `llnm-site approve HASH --state-dir /var/lib/llnm`
6. Join, with your own privacy policy (docs/privacy.md, "The recommended site policy"); `--print-command`
   prints the raw `flower-supernode` command with its node config instead:

       llnm-site join --kit . --key keys/{site}.key --data /path/to/{site} --state-dir /var/lib/llnm \\
           --max-patient-epsilon 10 --max-run-epsilon 3 --min-noise-multiplier 0.5

Keep `keys/{site}.key` secret. If it leaks, ask the coordinator to
`llnm-server revoke-site --provision CONSORTIUM_DIR {site}`, make a new pair and register again. What each
round received and sent is in the site's audit log: `llnm-site audit --state-dir /var/lib/llnm`; what every run
cost its patients: `llnm-site privacy --data /path/to/{site} --state-dir /var/lib/llnm`.
"""
