"""`llnm-server`: the command the consortium's coordinator runs.

The coordinator's own sub-commands live in `fl_server/cmd_<name>.py`; the research commands (`simulate`,
`baseline`, `evaluate-predictions`) run both roles on one machine and live in `fl_research`, named here by
module path only: `fl_server` never imports `fl_research`, and an installation without it just lacks them.
"""

from __future__ import annotations

import sys

from shared_model.cli_support import Command, dispatch

COMMANDS: dict[str, Command] = {
    "provision": Command("fl_server.cmd_provision",
                         "Make the consortium's CA, the SuperLink's certificate and one onboarding kit per site."),
    "register-site": Command("fl_server.cmd_register_site", "Register a site's public key with the SuperLink."),
    "revoke-site": Command("fl_server.cmd_revoke_site", "Unregister a site's key; its SuperNode is refused."),
    "app-hash": Command("fl_server.cmd_app_hash", "SHA-256 of the Flower app bundle that `run` submits."),
    "start": Command("fl_server.cmd_start", "Start a real flower-superlink where the config says."),
    "run": Command("fl_server.cmd_run", "Launch a federated experiment on a running deployment."),
    "simulate": Command("fl_research.cmd_simulate",
                        "Run a federated experiment in Flower's simulation engine, one virtual SuperNode per site."),
    "report": Command("fl_server.cmd_report",
                      "Write RUN_DIR/report.html (offline: curves, per-site metrics, privacy) and report.json."),
    "resume": Command("fl_server.cmd_resume", "Continue a stopped or crashed run from its last complete round."),
    "stop": Command("fl_server.cmd_stop",
                    "Stop a running experiment (on its SuperLink, or its simulation); resume it later."),
    "status": Command("fl_server.cmd_status",
                      "Rounds done, per-site metrics of the last round and the privacy guarantee of a run."),
    "baseline": Command("fl_research.cmd_baseline",
                        "Pooled or local-only reference training on a folder of site folders."),
    "evaluate-predictions": Command("fl_research.cmd_evaluate_predictions",
                                    "Evaluation metrics of a CSV of scores and labels, per group."),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("llnm-server", "llnm-fl tools for the coordinator.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
