"""The coordinator's side of SuperNode registration: Flower's `flwr supernode register|unregister` against
the SuperLink's control API (over TLS, with the consortium's CA), plus our registry of which name holds
which key.

Flower keeps the registered keys in the SuperLink's state and names each node; `registry.json` in the
provisioning folder records the same for the coordinator's tools (`flwr supernode ls` does not list
names), for revocation, and for `llnm-server start`, which registers every active site again when the
SuperLink starts (its in-memory state forgets them at every stop).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from fl_server.provisioning import CA_CERT, FLWR_HOME, REGISTRY, write_flwr_connection
from fl_server.records import timestamp
from fl_server.site_registry import SiteRegistry
from shared_model.config import ConfigError
from shared_model.environment import offline_environment


def _flwr() -> str:
    from fl_server.deployment import flwr_binary

    return flwr_binary("flwr")


def require_provisioned(provision_dir: Path) -> None:
    if not (provision_dir / CA_CERT).is_file():
        raise ConfigError(f"{provision_dir}: not a provisioning folder (no {CA_CERT}); run `llnm-server provision`")


def flwr_json(provision_dir: Path, args: list[str], *, superlink: str | None = None) -> dict[str, Any]:
    """Run `flwr <args> --format json` with the provisioning folder's connection; its JSON answer, or an error
    carrying Flower's own message."""
    require_provisioned(provision_dir)
    with tempfile.TemporaryDirectory(prefix="llnm-flwr-") as tmp:
        home = provision_dir / FLWR_HOME
        if superlink:
            home = write_flwr_connection(Path(tmp), superlink, provision_dir / CA_CERT)
        env = offline_environment(FLWR_HOME=str(home))
        proc = subprocess.run([_flwr(), *args, "--format", "json"], env=env, capture_output=True, text=True,
                              timeout=120)
    text = proc.stdout.strip()
    try:
        answer = json.loads(text[text.index("{"):]) if "{" in text else {}
    except json.JSONDecodeError:
        answer = {}
    if not answer.get("success"):
        reason = str(answer.get("error-message") or proc.stderr.strip() or text or f"exit code {proc.returncode}")
        raise ConfigError(f"flwr {' '.join(args)}: {reason.strip()}")
    return answer


def register_site(provision_dir: Path, name: str, public_key_file: Path, *,
                  superlink: str | None = None) -> dict[str, Any]:
    from fl_server.consortium import load_consortium
    from fl_server.provisioning import CONSORTIUM_FILE
    from shared_model.protocol.site_kit import load_site_public_key

    require_provisioned(provision_dir)
    consortium = load_consortium(provision_dir / CONSORTIUM_FILE)
    if name not in consortium.sites:
        raise ConfigError(f"site {name!r} is not in the consortium ({', '.join(consortium.sites)}); add it to the "
                          "consortium file and run `llnm-server provision` again (the others keep their kits)")
    line, fingerprint = load_site_public_key(public_key_file)
    with registry_lock(provision_dir):
        return _register(provision_dir, name, line, fingerprint, public_key_file, superlink)


def registry_lock(provision_dir: Path) -> FileLock:
    """Held while registry.json is read, changed at the SuperLink and written: concurrent registrations of
    different sites must not lose each other's entries."""
    return FileLock(str(provision_dir / REGISTRY) + ".lock", timeout=300)


def _register(provision_dir: Path, name: str, line: bytes, fingerprint: str, public_key_file: Path,
              superlink: str | None) -> dict[str, Any]:
    registry = SiteRegistry(provision_dir)
    current = registry.active(name)
    if current:
        raise ConfigError(f"site {name!r} is already registered (key {current['fingerprint']}, node "
                          f"{current['node_id']}); to replace its key, `llnm-server revoke-site {name}` first")
    for other, entry in registry.sites.items():
        if entry.get("fingerprint") == fingerprint and not entry.get("revoked_at"):
            raise ConfigError(f"{public_key_file}: this key is already registered for site {other!r}; every site "
                              "needs its own key pair")
    with tempfile.TemporaryDirectory() as tmp:
        # Flower reads the key from a file; give it exactly the validated line.
        pub = Path(tmp) / "site.pub"
        pub.write_bytes(line + b"\n")
        answer = flwr_json(provision_dir, ["supernode", "register", str(pub), "--name", name], superlink=superlink)
    entry = {"public_key": line.decode(), "fingerprint": fingerprint, "node_id": int(answer["node-id"]),
             "registered_at": timestamp(), "revoked_at": None}
    registry.sites[name] = entry
    registry.save()
    return entry


def revoke_site(provision_dir: Path, name: str, *, superlink: str | None = None) -> dict[str, Any]:
    require_provisioned(provision_dir)
    with registry_lock(provision_dir):
        return _revoke(provision_dir, name, superlink)


def _revoke(provision_dir: Path, name: str, superlink: str | None) -> dict[str, Any]:
    registry = SiteRegistry(provision_dir)
    entry = registry.active(name)
    if entry is None:
        known = registry.names()
        raise ConfigError(f"site {name!r} is not registered" + (f" (registered: {', '.join(known)})" if known else ""))
    flwr_json(provision_dir, ["supernode", "unregister", str(entry["node_id"])], superlink=superlink)
    entry["revoked_at"] = timestamp()
    registry.save()
    return entry


def restore_registrations(provision_dir: Path, superlink: str) -> list[str]:
    """Register every active site of registry.json with a SuperLink that has just started.

    An in-memory SuperLink forgets its registered keys when it stops; registry.json is the coordinator's record
    of them, so `llnm-server start` puts them back (a SuperLink with a database already has them: Flower answers
    that the key is in use, which is fine). Returns the names registered anew.
    """
    with registry_lock(provision_dir):
        return _restore(provision_dir, superlink)


def _restore(provision_dir: Path, superlink: str) -> list[str]:
    registry = SiteRegistry(provision_dir)
    restored = []
    for name in registry.names():
        entry = registry.sites[name]
        with tempfile.TemporaryDirectory() as tmp:
            pub = Path(tmp) / "site.pub"
            pub.write_text(entry["public_key"] + "\n", encoding="utf-8")
            try:
                answer = flwr_json(provision_dir, ["supernode", "register", str(pub), "--name", name],
                                   superlink=superlink)
            except ConfigError as exc:
                if "already in use" in str(exc):
                    continue
                raise
        entry["node_id"] = int(answer["node-id"])
        restored.append(name)
    if restored:
        registry.save()
    return restored
