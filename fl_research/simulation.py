"""`llnm-server simulate`: the embedded default, Flower's simulation engine on one machine.

One virtual SuperNode per site folder (partition id i -> the i-th site, sorted by folder name); the
ServerApp runs the same round loop as a deployment. Simulation reads every site folder on this machine,
so it is for synthetic or otherwise shareable data; real hospitals use `llnm-site join`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fl_server.config import ConfigError, ExperimentConfig
from fl_server.run_dir import RunDirectory
from shared_model.environment import use_offline_environment
from shared_model.sitedata.cache import default_cache_dir

log = logging.getLogger("llnm.server")


def discover_sites(root: str | Path | None, only: list[str] | None = None) -> list[Path]:
    """Site folders under `root` (a folder holding `patients.csv` is a site)."""
    if not root:
        raise ConfigError("no data: give --data CONSORTIUM_DIR or set data.root in the config (the configuration "
                          "sets no data.root)")
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data root {root}: not a folder (generate one with `llnm-synth --out {root}`)")
    sites = sorted(p for p in root.iterdir() if p.is_dir() and (p / "patients.csv").is_file())
    if only:
        missing = sorted(set(only) - {p.name for p in sites})
        if missing:
            raise ConfigError(f"data.sites: {missing} not found under {root} (found {[p.name for p in sites]})")
        sites = [p for p in sites if p.name in only]
    if not sites:
        raise ConfigError(f"data root {root}: no site folders (folders with patients.csv)")
    return sites


def simulate(exp: ExperimentConfig, run_dir: RunDirectory, *, data_root: str | Path | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run `exp` in Flower's simulation engine, recorded in a new `run_dir`; returns metrics.json's content.

    With `resume`, continue the run already in `run_dir` instead: `exp` is then its saved configuration
    (:meth:`RunDirectory.resume_config`) and `data_root` defaults to the one the run was started with.
    """
    from flwr.simulation import run_simulation

    from fl_client.client_app import make_client_app
    from fl_client.settings import CACHE_DIR, SITE_NODE_CONFIG, THREADS
    from fl_server.server_app import make_server_app

    if resume and not data_root:
        data_root = run_dir.run_info().get("data_root")
    sites = discover_sites(data_root or exp.data.root, exp.data.sites)
    root = Path(data_root or exp.data.root or "")
    if exp.federation.min_sites > len(sites):
        raise ConfigError(f"federation.min_sites={exp.federation.min_sites} but only {len(sites)} site(s) "
                          f"under {root}")
    if not resume:
        exp.data.root = str(root.resolve())
        run_dir.create(exp, {"mode": "simulation", "data_root": str(root.resolve()),
                             "sites": [p.name for p in sites], "status": "created"})
    run_dir.update_run_info(status="running")
    cache_dir = str(default_cache_dir(exp.data.cache_dir))
    sim = exp.simulation
    backend_config = {
        "client_resources": {"num_cpus": sim.cpus_per_site, "num_gpus": sim.gpus_per_site},
        "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False,
                      "log_to_driver": True, "logging_level": "warning"},
    }
    use_offline_environment()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's usage statistics would be reported over the network: nothing leaves this machine (and starting the
    # engine is about 2 s faster without it).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(exp, run_dir),
            # Each virtual site trains with as many torch threads as CPUs Ray reserved for it, so the
            # sites that run side by side do not oversubscribe the cores.
            client_app=make_client_app([str(p) for p in sites], {CACHE_DIR: cache_dir,
                                                                 THREADS: max(1, int(sim.cpus_per_site)),
                                                                 **sim.node_config,
                                                                 SITE_NODE_CONFIG: sim.site_node_config}),
            num_supernodes=len(sites),
            backend_config=backend_config,
        )
    info = run_dir.run_info()
    if info.get("status") != "completed":
        raise RuntimeError(f"simulation did not complete: {info.get('error', 'see ' + str(run_dir.log_path))}")
    return run_dir.metrics()
