"""`registry.json` in the provisioning folder: which public key belongs to which site, its Flower node id, and
when it was registered or revoked. Written by `register-site` and `revoke-site` (`fl_server.control`), read by
`llnm-server start` to register the sites again and to name the keys the SuperLink refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fl_server.provisioning import REGISTRY
from shared_model.config import ConfigError
from shared_model.fileio import atomic_write_json

__all__ = ["REGISTRY_FORMAT", "SiteRegistry"]

REGISTRY_FORMAT = "llnm-fl site registry"


class SiteRegistry:
    """`registry.json`: site name -> public key, its fingerprint, Flower node id, registered/revoked times."""

    def __init__(self, provision_dir: Path) -> None:
        self.path = provision_dir / REGISTRY
        self.data: dict[str, Any] = {"format": REGISTRY_FORMAT, "sites": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{self.path}: not valid JSON ({exc})") from None

    @property
    def sites(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("sites", {})

    def active(self, name: str) -> dict[str, Any] | None:
        entry = self.sites.get(name)
        return entry if entry and not entry.get("revoked_at") else None

    def names(self) -> list[str]:
        return sorted(n for n in self.sites if self.active(n))

    def save(self) -> None:
        atomic_write_json(self.path, self.data, indent=2)
