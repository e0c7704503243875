"""The coordinator's Flower ServerApp (Message API).

In a deployment (`llnm-server run`), Flower starts this app on the SuperLink host and hands it the run
config: `experiment` (the resolved experiment configuration as JSON) and `run-dir` (where the run
directory lives on the coordinator's machine). In simulation (`llnm-server simulate`) the same loop is
started in-process by `make_server_app`.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_server.config import ExperimentConfig, parse_config
from fl_server.federation import Federation, QuorumNotMet
from fl_server.privacy.ledger import SiteBudgetExhausted
from fl_server.run_dir import RunDirectory

log = logging.getLogger("llnm.server")


def run_experiment(grid: Grid, exp: ExperimentConfig, run_dir: RunDirectory) -> None:
    # One live ServerApp per run directory: a second (a `resume` beside a live run) is refused, naming the first.
    with run_dir.hold():
        handler = run_dir.attach_log()
        try:
            Federation(grid, exp, run_dir).run()
        except (QuorumNotMet, SiteBudgetExhausted) as exc:
            # Expected ways for a run to stop: the message says what happened and what to do, and `run.json`
            # (status "stopped") is what `llnm-server run`/`simulate` report from. Not re-raised, so that Flower
            # does not print a traceback for it.
            log.error("run stopped: %s", exc)
            run_dir.update_run_info(status="stopped", error=str(exc))
        except Exception as exc:
            log.exception("run stopped: %s", exc)
            run_dir.update_run_info(status="stopped", error=str(exc))
            raise
        finally:
            RunDirectory.detach_log(handler)


def make_server_app(exp: ExperimentConfig, run_dir: RunDirectory) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_experiment(grid, exp, run_dir)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    raw = str(context.run_config.get("experiment", ""))
    run_dir = str(context.run_config.get("run-dir", ""))
    if not raw or not run_dir:
        raise RuntimeError("run config must carry 'experiment' (JSON) and 'run-dir'; launch with `llnm-server run`")
    exp = parse_config(json.loads(raw), source="run config 'experiment'")
    rd = RunDirectory(run_dir)
    # Flower's run id: the one each site's audit log records.
    rd.update_run_info(flwr_run_id=int(context.run_id))
    run_experiment(grid, exp, rd)
