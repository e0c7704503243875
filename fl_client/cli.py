"""`llnm-site`: the command a hospital's site operator runs (sub-commands in `fl_client/cmd_<name>.py`)."""

from __future__ import annotations

import sys

from shared_model.cli_support import Command, dispatch

COMMANDS: dict[str, Command] = {
    "check": Command("fl_client.cmd_check", "Validate a site folder against the data contract (never modifies it)."),
    "import": Command("fl_research.cmd_import",
                      "Import a public data set (uci-dtc, ddti) as simulated site folders that pass check."),
    "inspect": Command("fl_client.cmd_inspect",
                       "Print what an ultrasound image file holds (frames, photometric, calibration) as JSON."),
    "keygen": Command("fl_client.cmd_keygen",
                      "Make this site's key pair for SuperNode authentication (send only the .pub)."),
    "approve": Command("fl_client.cmd_approve", "Approve an app (by hash or .fab) to run on this site's data."),
    "audit": Command("fl_client.cmd_audit", "Summarise this site's audit log: what was received and sent, per run."),
    "join": Command("fl_client.cmd_join", "Join a federation: start a real flower-supernode for this site."),
    "evaluate": Command("fl_client.cmd_evaluate", "Evaluate a global model checkpoint on this site's own patients."),
    "explain": Command("fl_client.cmd_explain",
                       "Explain a global model on this site's own patients (Grad-CAM++, attention, feature groups)."),
    "segment": Command("fl_client.cmd_segment",
                       "Predict nodule and thyroid masks for this site's views with a segmenter (never into the "
                       "site folder)."),
    "privacy": Command("fl_client.cmd_privacy",
                       "Show this site's lifetime privacy ledger: runs, epsilon per run, lifetime epsilon, budget."),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("llnm-site", "llnm-fl tools for a hospital site.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
