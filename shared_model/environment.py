"""The environment every llnm-fl process runs in: offline.

Flower must not install the Flower app's dependencies at run time, and the frozen text encoder must come
from the local Hugging Face cache (a hospital's machine may have no internet access at all). The Makefile
exports the same variables for `make`'s commands.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: The variables that keep Flower and Hugging Face offline.
OFFLINE_VARIABLES: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def offline_environment(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child process: `base` (default: this process's) with the offline variables set
    (they win over `base`), then `extra`."""
    return {**(os.environ if base is None else base), **OFFLINE_VARIABLES, **extra}


def use_offline_environment() -> None:
    """Set the offline variables in this process where they are not set already (an explicit value stays)."""
    for name, value in OFFLINE_VARIABLES.items():
        os.environ.setdefault(name, value)
