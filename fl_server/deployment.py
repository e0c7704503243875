"""Real Flower deployments: the SuperLink process and `flwr run` submissions.

`llnm-server start` runs `flower-superlink`; hospitals run `llnm-site join` (a `flower-supernode`);
`llnm-server run` submits the llnm-fl Flower app (this repository's pyproject, `[tool.flwr.app]`)
to the SuperLink with `flwr run`, passing the resolved experiment as run config. Flower's CLI keeps its
connection list in `$FLWR_HOME/config.toml`; we give every run its own FLWR_HOME inside the run
directory so that nothing in the coordinator's home folder is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fl_server.config import ConfigError, ExperimentConfig
from fl_server.run_dir import RunDirectory
from shared_model.environment import offline_environment

CONNECTION = "llnm"


def project_root() -> Path:
    """The folder holding the Flower app's pyproject.toml (the llnm-fl checkout)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"{root}: no pyproject.toml; `llnm-server run` needs an llnm-fl source checkout "
                          "(pip install -e .)")
    return root


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name}: not found (is flwr installed in this environment?)")
    return found


def superlink_command(exp: ExperimentConfig | None, *, host: str | None = None, port: int | None = None,
                      insecure: bool | None = None, database: str | None = None,
                      ssl: tuple[str, str, str] | None = None) -> list[str]:
    link = exp.federation.superlink if exp else None
    host = host or (link.host if link else "127.0.0.1")
    port = port or (link.port if link else 9093)
    insecure = insecure if insecure is not None else (link.insecure if link else True)
    database = database or (link.database if link else None)
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
    elif ssl:
        ca, cert, key = ssl
        cmd += ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]
    else:
        raise ConfigError("a secure SuperLink needs --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile "
                          "(or set federation.superlink.insecure: true for a test network)")
    if database:
        cmd += ["--database", database]
    return cmd


def write_flwr_home(rd: RunDirectory, address: str, *, insecure: bool = True,
                    root_certificates: str | None = None) -> Path:
    home = rd.path / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {json.dumps(address)}"]
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return home


def submit_run(exp: ExperimentConfig, rd: RunDirectory, address: str, *, insecure: bool = True,
               root_certificates: str | None = None, stream: bool = True) -> int:
    """`flwr run` the llnm-fl app on the SuperLink at `address`; returns flwr's exit status."""
    home = write_flwr_home(rd, address, insecure=insecure, root_certificates=root_certificates)
    run_config = rd.path / "flwr-run-config.toml"
    # TOML basic strings accept JSON string escapes, so json.dumps yields valid TOML values.
    run_config.write_text(f"experiment = {json.dumps(exp.to_json())}\nrun-dir = {json.dumps(str(rd.path))}\n",
                          encoding="utf-8")
    env = offline_environment(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                              FLWR_HOME=str(home))
    cmd = [_bin("flwr"), "run", str(project_root()), CONNECTION, "--run-config", str(run_config)]
    if stream:
        cmd.append("--stream")
    return subprocess.call(cmd, env=env)
