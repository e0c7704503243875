"""`llnm-site`: the command a hospital's site operator runs (sub-commands in `fl_client/cmd_<name>.py`)."""

from __future__ import annotations

import sys

from shared_model.cli_support import dispatch

COMMANDS: dict[str, str] = {
    "check": "Validate a site folder against the data contract (never modifies it).",
    "inspect": "Print what an ultrasound image file holds (frames, photometric, calibration) as JSON.",
    "join": "Join a federation: start a real flower-supernode for this site.",
    "evaluate": "Evaluate a global model checkpoint on this site's own patients.",
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("llnm-site", "llnm-fl tools for a hospital site.", "fl_client", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
