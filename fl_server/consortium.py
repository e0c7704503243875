"""The consortium file (`llnm-server provision --config CONSORTIUM.yaml`): who the hospitals are and
where they reach the SuperLink. It is long-lived, unlike an experiment's config: certificates and site
kits are made from it once, and adding a hospital later means adding its name and provisioning again.

    name: thyroid-llnm
    superlink:
      address: superlink.example.org:9093   # what the hospitals dial (HOST:PORT)
      hosts: [superlink.example.org, 10.0.0.5]   # names and IPs the SuperLink's certificate is valid for
    sites: [site-a, site-b, site-c]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from shared_model.config import ConfigError, Schema, format_validation_error
from shared_model.naming import SITE_NAME_PATTERN, SITE_NAME_RULE
from shared_model.protocol.connection_check import split_address

NAME_PATTERN = r"^" + SITE_NAME_PATTERN.pattern + "$"  # the consortium is named like a site


class ConsortiumSuperLink(Schema):
    """The SuperLink: the address the hospitals dial and the names its TLS certificate is valid for."""

    address: str = Field(description="HOST:PORT the hospitals (and the coordinator's tools) dial")
    # Host names and IP addresses written into the SuperLink certificate's subjectAltName. The address's host
    # is always added; so are localhost and 127.0.0.1, which the coordinator's own tools use on the SuperLink
    # machine.
    hosts: list[str] = Field(default_factory=list)
    listen: str = Field(default="0.0.0.0", description="interface `llnm-server start` listens on")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        host, port = split_address(v)
        return f"{host}:{port}"

    def certificate_hosts(self) -> list[str]:
        host, _ = split_address(self.address)
        seen: list[str] = []
        for h in [host, *self.hosts, "localhost", "127.0.0.1"]:
            if h not in seen:
                seen.append(h)
        return seen

    @property
    def port(self) -> int:
        return split_address(self.address)[1]


class ConsortiumConfig(Schema):
    """A consortium: who the hospitals are and where they reach the SuperLink (`llnm-server provision`)."""

    name: str = Field(pattern=NAME_PATTERN, description="the consortium's name (written like a site name): the "
                      "name of its certificate authority and of the consortium in every site kit")
    superlink: ConsortiumSuperLink
    sites: list[str] = Field(min_length=1, description="the hospitals' site names: each gets an onboarding kit; "
                             "a hospital added later is added here and provisioned again")
    certificate_days: int = Field(default=825, ge=1, le=3650, description="validity in days of the certificates "
                                  "`llnm-server provision` makes (the consortium's CA and the SuperLink's)")

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if not SITE_NAME_PATTERN.fullmatch(s)]
        if bad:
            raise ValueError(f"site names must be {SITE_NAME_RULE}: {bad}")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"site names are listed twice: {dup}")
        return v

    @model_validator(mode="after")
    def _hosts(self) -> ConsortiumConfig:
        for h in self.superlink.hosts:
            if not h or " " in h:
                raise ValueError(f"superlink.hosts: {h!r} is not a host name or IP address")
        return self


def load_consortium(path: str | Path) -> ConsortiumConfig:
    p = Path(path)
    try:
        data: Any = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: consortium file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with name, superlink and sites; found "
                          f"{'an empty file' if data is None else type(data).__name__}")
    try:
        return ConsortiumConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(p), exc)) from None
