"""Real Flower deployments: the SuperLink process and `flwr run` submissions.

`llnm-server start` runs `flower-superlink`, with TLS and `--enable-supernode-auth` unless asked for a
loopback development SuperLink; hospitals run `llnm-site join` (a `flower-supernode`); `llnm-server run`
submits the llnm-fl Flower app (this repository's pyproject, `[tool.flwr.app]`) to the SuperLink with
`flwr run` over TLS, passing the resolved experiment as run config. Flower's CLI keeps its connection list
in `$FLWR_HOME/config.toml`; every run gets its own FLWR_HOME inside the run directory so that nothing in
the coordinator's home folder is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_server.config import ConfigError, ExperimentConfig
from fl_server.records import timestamp
from fl_server.run_dir import RunDirectory
from shared_model.environment import offline_environment
from shared_model.protocol.connection_check import is_loopback, split_address
from shared_model.supervisor import Supervisor

# Flower refuses a FAB above this size (flwr.common.constant.FAB_MAX_SIZE).
FAB_MAX_BYTES = 10 * 1024 * 1024


def project_root() -> Path:
    """The folder holding the Flower app's pyproject.toml (the llnm-fl checkout)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"{root}: no pyproject.toml; `llnm-server run` needs an llnm-fl source checkout "
                          "(pip install -e .)")
    return root


def flwr_binary(name: str) -> str:
    """A Flower executable from this environment (the one llnm-fl was installed into), else from PATH."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name}: not found (is flwr installed in this environment?)")
    return found


def app_files() -> dict[str, Path]:
    """The files Flower's FAB builder looks at for this app, found without walking the whole checkout.

    `flwr run DIR` walks every file under DIR (the virtual environment and any data folder included) before
    filtering by pyproject's `fab-include`; that took 20 s here. Every `fab-include` pattern starts with a
    folder, so only the top-level files and those folders can ever match: this collects exactly those, and
    Flower's own builder then applies its filters to them, giving the same bundle byte for byte.
    """
    import tomllib

    root = project_root()
    patterns = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"].get(
        "fab-include", [])
    folders = {p.split("/", 1)[0] for p in patterns if "/" in p}
    if not folders or any(any(c in f for c in "*?[") for f in folders):
        from flwr.cli.utils import collect_files

        return collect_files(root)
    files = {p.name: p for p in root.iterdir() if p.is_file() and not p.is_symlink()}
    for folder in sorted(folders):
        for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=False):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                path = Path(dirpath) / name
                if not path.is_symlink():
                    files[path.relative_to(root).as_posix()] = path
    return files


def app_bundle() -> tuple[bytes, str]:
    """The Flower app bundle (FAB) that `flwr run` submits, built by Flower's builder (deterministic: fixed file
    times), and its SHA-256: the hash a site approves (`llnm-site approve`)."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files(app_files())
    if len(fab) > FAB_MAX_BYTES:
        raise ConfigError(f"the app bundle is {len(fab)} bytes, over Flower's {FAB_MAX_BYTES}-byte limit; check "
                          "fab-include in pyproject.toml")
    return fab, hashlib.sha256(fab).hexdigest()


def stage_app(dest: Path) -> str:
    """Copy the app's files into `dest` (a fresh folder) for `flwr run dest`; returns the bundle's SHA-256,
    which is what Flower will compute from `dest`."""
    if dest.exists():
        shutil.rmtree(dest)
    for rel, path in app_files().items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return app_bundle()[1]


def insecure_refusal(host: str, what: str) -> str | None:
    """Why plain HTTP is refused for `host` (None on loopback): it carries no TLS and no node authentication."""
    if is_loopback(host):
        return None
    return (f"{what} --insecure serves plain HTTP with no TLS and no SuperNode authentication, so it is for "
            f"loopback development only and {host} is not a loopback address. Provision the consortium "
            "(`llnm-server provision --config CONSORTIUM.yaml --out DIR`) and use --provision DIR.")


@dataclass(frozen=True)
class SuperLinkPlan:
    """How the SuperLink is served: TLS with registered SuperNodes, or plain HTTP on loopback."""

    host: str
    port: int
    insecure: bool
    ssl: tuple[str, str, str] | None
    node_auth: bool
    database: str | None

    def command(self) -> list[str]:
        cmd = [flwr_binary("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.insecure:
            cmd.append("--insecure")
        else:
            assert self.ssl is not None
            ca, cert, key = self.ssl
            cmd += ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        if self.database:
            cmd += ["--database", self.database]
        return cmd


def plan_superlink(exp: ExperimentConfig | None, *, host: str | None = None, port: int | None = None,
                   insecure: bool | None = None, database: str | None = None,
                   ssl: tuple[str, str, str] | None = None, provision_dir: str | None = None) -> SuperLinkPlan:
    """TLS and `--enable-supernode-auth` by default, from a provisioning folder or three certificate files;
    plain HTTP only when asked for, and only on loopback."""
    from fl_server.consortium import load_consortium
    from fl_server.provisioning import CONSORTIUM_FILE, SERVER_CA, SERVER_CERT, SERVER_KEY

    link = exp.federation.superlink if exp else None
    explicit_tls = bool(ssl or provision_dir)
    provision_dir = provision_dir or (link.provision_dir if link else None)
    database = database or (link.database if link else None)
    if insecure is None:
        insecure = bool(link and link.insecure) and not explicit_tls
    if insecure:
        if explicit_tls:
            raise ConfigError("--insecure cannot be combined with TLS certificates or --provision")
        host = host or (link.host if link else "127.0.0.1")
        refusal = insecure_refusal(host, "llnm-server start")
        if refusal:
            raise ConfigError(refusal)
        return SuperLinkPlan(host, port or (link.port if link else 9093), True, None, False, database)
    if ssl:
        return SuperLinkPlan(host or (link.host if link else "127.0.0.1"), port or (link.port if link else 9093),
                             False, ssl, True, database)
    if provision_dir:
        folder = Path(provision_dir).resolve()
        consortium = load_consortium(folder / CONSORTIUM_FILE)
        ca, cert, key = (str(folder / p) for p in (SERVER_CA, SERVER_CERT, SERVER_KEY))
        missing = [f for f in (ca, cert, key) if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"{folder}: missing {', '.join(missing)}; run `llnm-server provision` again")
        # State stays in memory unless a database is asked for (Flower's SQLite state hit "database is locked"
        # under load on two cores); `llnm-server start` registers the sites of registry.json again at start.
        return SuperLinkPlan(host or consortium.superlink.listen, port or consortium.superlink.port, False,
                             (ca, cert, key), True, database)
    raise ConfigError("the SuperLink runs with TLS and SuperNode authentication: give --provision DIR (made by "
                      "`llnm-server provision`) or --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile; --insecure is for "
                      "a loopback development SuperLink only")


@dataclass(frozen=True)
class ControlConnection:
    """Where `flwr run` reaches the SuperLink, and how it checks the SuperLink's certificate."""

    address: str
    root_certificates: str | None
    insecure: bool
    provision_dir: str | None = None  # where `llnm-server start` records the connections the SuperLink refused


def control_connection(exp: ExperimentConfig, *, superlink: str | None = None, provision_dir: str | None = None,
                       root_certificates: str | None = None, insecure: bool = False) -> ControlConnection:
    from fl_server.consortium import load_consortium
    from fl_server.provisioning import CA_CERT, CONSORTIUM_FILE

    link = exp.federation.superlink
    explicit_tls = bool(provision_dir or root_certificates)
    provision_dir = provision_dir or link.provision_dir
    if insecure and explicit_tls:
        raise ConfigError("--insecure cannot be combined with --root-certificates or --provision")
    insecure = insecure or (link.insecure and not explicit_tls)
    if provision_dir and not root_certificates and not insecure:
        folder = Path(provision_dir).resolve()
        root_certificates = str(folder / CA_CERT)
        superlink = superlink or load_consortium(folder / CONSORTIUM_FILE).superlink.address
    address = superlink or f"{link.host if link.host != '0.0.0.0' else '127.0.0.1'}:{link.port}"
    try:
        host, _ = split_address(address)
    except ValueError as exc:
        raise ConfigError(f"--superlink {exc}") from None
    if insecure:
        refusal = insecure_refusal(host, "llnm-server run")
        if refusal:
            raise ConfigError(refusal)
        return ControlConnection(address, None, True)
    if not root_certificates:
        raise ConfigError("`llnm-server run` talks to the SuperLink over TLS: give --provision DIR or "
                          "--root-certificates CA.crt (--insecure only for a loopback development SuperLink)")
    if not Path(root_certificates).is_file():
        raise ConfigError(f"{root_certificates}: CA certificate not found")
    return ControlConnection(address, str(Path(root_certificates).resolve()), False,
                             str(Path(provision_dir).resolve()) if provision_dir else None)


def write_flwr_home(rd: RunDirectory, conn: ControlConnection) -> Path:
    from fl_server.provisioning import connection_toml

    home = rd.path / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(connection_toml(conn.address, None if conn.insecure else
                                                      conn.root_certificates), encoding="utf-8")
    return home


def submit_run(exp: ExperimentConfig, rd: RunDirectory, conn: ControlConnection, *, stream: bool = True) -> int:
    """`flwr run` the llnm-fl app on the SuperLink; returns flwr's exit status. The app is staged in
    RUN_DIR/app first, and its hash recorded in run.json (`app_sha256`): what the sites must have approved."""
    home = write_flwr_home(rd, conn)
    app = rd.path / "app"
    rd.begin_attempt()  # this submission's outcome is its own, never the previous attempt's
    rd.update_run_info(app_sha256=stage_app(app))
    run_config = rd.path / "flwr-run-config.toml"
    # TOML basic strings accept JSON string escapes, so json.dumps yields valid TOML values.
    run_config.write_text(f"experiment = {json.dumps(exp.to_json())}\nrun-dir = {json.dumps(str(rd.path))}\n",
                          encoding="utf-8")
    env = offline_environment(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                              FLWR_HOME=str(home))
    from fl_server.provisioning import CONNECTION

    cmd = [flwr_binary("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config)]
    if stream:
        cmd.append("--stream")
    supervisor = Supervisor(on_stop=lambda signum: _stop_submitted_run(rd, signum, supervisor))
    started = timestamp()
    try:
        with supervisor:
            return supervisor.run(cmd, env)
    finally:
        _record_refused_connections(rd, conn, started)


def _record_refused_connections(rd: RunDirectory, conn: ControlConnection, since: str) -> None:
    """The SuperLink's refusals of unregistered or revoked keys during this attempt, into run.json."""
    if not conn.provision_dir:
        return
    from fl_server.superlink_events import read_refusals, summarise_refusals

    summary = summarise_refusals(read_refusals(conn.provision_dir, since=since))
    if summary:
        previous = rd.run_info().get("refused_connections", [])
        rd.update_run_info(refused_connections=[*previous, *summary])


def _stop_submitted_run(rd: RunDirectory, signum: int, supervisor: Supervisor) -> None:
    """Ctrl-C or a kill of `llnm-server run` stops the experiment itself, not only this client: the ServerApp
    on the SuperLink would otherwise train on, and `flwr run` stay behind."""
    name = signal.Signals(signum).name
    _, what = stop_deployment_run(rd, rd.run_info())
    print(f"[llnm] {name}: stopping the run on the SuperLink: {what}", flush=True)
    rd.update_run_info(status="stopped", stopped_by=f"{name} to llnm-server run", error=f"stopped by {name}")
    supervisor.terminate()


def stop_deployment_run(rd: RunDirectory, info: dict[str, Any]) -> tuple[bool, str]:
    """`flwr stop` the run on its SuperLink; (stopped, what happened)."""
    from fl_server.provisioning import CONNECTION

    run_id = info.get("flwr_run_id")
    if run_id is None:
        return False, "run.json has no flwr_run_id: the ServerApp never started on the SuperLink"
    home = rd.path / "flwr-home"
    if not (home / "config.toml").is_file():
        return False, f"{home}/config.toml is missing: cannot reach the SuperLink this run was submitted to"
    done = subprocess.run([flwr_binary("flwr"), "stop", str(run_id), CONNECTION], capture_output=True, text=True,
                          env=offline_environment(FLWR_HOME=str(home)), timeout=120)
    text = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, text[-1] if text else f"flwr stop exited with {done.returncode}"

