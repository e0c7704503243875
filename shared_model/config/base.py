"""The base of every configuration schema (pydantic): strict numbers, unknown keys refused, one-line errors.

`shared_model.config` (model, preprocessing, training, DP) and `shared_model.config.inputs` build on it; both
re-export what callers need, so importers rarely use this module directly.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

__all__ = ["ConfigError", "Float", "Int", "Schema", "format_validation_error", "parse_json"]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


# A count must be an integer: a YAML "64" or 64.5 is a mistake, not something to round. A rate may come as
# a string (PyYAML reads `2e-3` without a dot as one) but never as `true`; infinity and NaN are refused
# everywhere (`allow_inf_nan=False`).
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, BeforeValidator(_not_bool)]
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names its source and each offending key."""


class Schema(BaseModel):
    """Base of every configuration schema (the shared ones, the coordinator's experiment and consortium files):
    unknown keys are errors, NaN and infinity are refused; dict/JSON round trips."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: What the schema is called in error messages ("model config", ...).
    WHAT: ClassVar[str] = "configuration"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict of every field (tuples become lists)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[SchemaT], data: Any, source: str | None = None) -> SchemaT:
        """Validate a mapping; missing keys take the defaults, anything wrong raises `ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source or cls.WHAT}: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(source or cls.WHAT, exc)) from None


SchemaT = TypeVar("SchemaT", bound=Schema)


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem, each naming its dotted key: `- model.hiden_size: unknown key`."""
    lines = [f"{source}: invalid configuration:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  - {key}: {msg}{got_s}")
    return "\n".join(lines)


def parse_json(schema: type[SchemaT], text: str, source: str) -> SchemaT:
    """A schema from its JSON dump (what a round config carries)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    return schema.from_dict(data, source=source)
