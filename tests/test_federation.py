"""Federated training end to end: config validation, Flower simulation, crash + resume, and a real
deployment (one `flower-superlink` and seven `flower-supernode` processes on loopback), including a site
killed mid-run."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fl_server.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METRIC_KEYS = {"auc", "accuracy", "sensitivity", "specificity", "n"}


def write_config(tmp_path: Path, **sections: dict) -> Path:
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


# ---- configuration ---------------------------------------------------------------------------------
def test_demo_config_is_valid() -> None:
    exp = load_config(ROOT / "configs" / "demo.yaml")
    assert exp.model.preset == "tiny"
    assert exp.federation.strategy == "fedavg"
    assert exp.architecture().image_size == exp.preprocess.image_size
    # Segment units: the model's text positions are the segment count, and the site gets the same unit.
    assert exp.preprocess.text.unit == "segment"
    assert exp.architecture().text_max_length == exp.preprocess.text.max_segments
    assert exp.preprocess.to_dict()["text"]["unit"] == "segment"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"federation": {"rounds": 0}}, "federation.rounds"),
        ({"federation": {"strategy": "fedsgd"}}, "federation.strategy"),
        ({"federation": {"roundz": 3}}, "federation.roundz: unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"model": {"overrides": {"hidden_sizes": 3}}}, "model:"),
        ({"privacy": {"patient": {"enabled": True}}}, "target_epsilon or noise_multiplier"),
        ({"preprocess": {"text": {"unit": "segment", "trainable_top_layers": 1}}}, "needs unit: token"),
        ({"preprocess": {"text": {"unit": "words"}}}, "preprocess.text.unit"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, patch: dict, expected: str) -> None:
    path = write_config(tmp_path, **patch)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_cosine_schedule_reaches_sites_through_the_round_config(tmp_path: Path) -> None:
    from fl_server.federation import round_config
    from shared_model.training import TrainConfig, scheduled_lr

    exp = load_config(write_config(tmp_path, train={"lr": 0.002, "lr_schedule": "cosine", "lr_min_ratio": 0.1},
                                   federation={"rounds": 5}))
    lrs = [json.loads(round_config(exp, r)["train-config"])["lr"] for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.002) and lrs[2] == pytest.approx(0.0011) and lrs[4] == pytest.approx(0.0002)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert scheduled_lr(TrainConfig(lr=0.01), 3, 5) == 0.01  # constant by default
    with pytest.raises(ValueError, match="outside"):
        scheduled_lr(TrainConfig(lr_schedule="cosine"), 5, 5)


# ---- helpers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def rounds_of(run_dir: Path) -> list[int]:
    m = run_dir / "metrics.json"
    if not m.is_file():
        return []
    try:
        return [r["round"] for r in json.loads(m.read_text())["rounds"]]
    except (json.JSONDecodeError, KeyError):
        return []


def prebuild_caches(consortium: Path, config: Path) -> None:
    """Sites build their preprocessing cache once before joining (as `llnm-site check`/join would)."""
    from shared_model.site_cache import build_site_tensors

    pre = load_config(config).preprocess
    for site in sorted(p for p in consortium.iterdir() if (p / "patients.csv").is_file()):
        build_site_tensors(site, pre, cache_dir=Path(os.environ["LLNM_CACHE_DIR"]), progress=False)


def assert_round_metrics(entry: dict, sites: set[str]) -> None:
    assert set(entry["sites"]) == sites, entry["sites"].keys()
    for name, m in entry["sites"].items():
        assert set(m) >= METRIC_KEYS, (name, m)
        assert m["n"] > 0
    assert entry["pooled"]["n"] == sum(m["n"] for m in entry["sites"].values())


# ---- simulation ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_simulation_two_rounds_per_site_metrics(tmp_path: Path, small_consortium: Path) -> None:
    config = write_config(tmp_path, federation={"rounds": 2, "min_sites": 5})
    out = tmp_path / "run"
    res = subprocess.run([str(BIN / "llnm-server"), "simulate", "--config", str(config), "--data",
                          str(small_consortium), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    sites = {p.name for p in small_consortium.iterdir() if (p / "patients.csv").is_file()}
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert_round_metrics(entry, sites)
        assert set(entry["train"]) == sites
        assert entry["failures"] == []
    assert metrics["final"]["split"] == "test"
    assert_round_metrics(metrics["final"], sites)
    assert (out / "checkpoints" / "round-0002.safetensors").is_file()
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["round"] in (1, 2) and (out / "checkpoints" / best["checkpoint"]).is_file()
    assert (out / "config.yaml").is_file() and (out / "log.txt").stat().st_size > 0
    assert "round 2/2" in res.stdout

    # The coordinator's status command and a site's own evaluation of the global model.
    st = subprocess.run([str(BIN / "llnm-server"), "status", str(out), "--json"], capture_output=True, text=True)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["rounds_completed"] == 2 and status["status"] == "completed"
    site = sorted(sites)[0]
    ev_out = tmp_path / "site-eval.json"
    ev = subprocess.run([str(BIN / "llnm-site"), "evaluate", "--model", str(out), "--data",
                         str(small_consortium / site), "--out", str(ev_out), "--bootstrap", "50"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    site_eval = json.loads(ev_out.read_text())
    assert site_eval["site"] == site and site_eval["split"] == "test"
    assert site_eval["metrics"]["n"] == metrics["final"]["sites"][site]["n"]


@pytest.mark.slow
def test_baseline_command_writes_per_site_metrics_and_an_epoch_log(tmp_path: Path, small_consortium: Path) -> None:
    """`llnm-server baseline` (pooled, then local) on the real consortium: the run directory of issue 3."""
    config = write_config(tmp_path, baseline={"epochs": 2})
    sites = {p.name for p in small_consortium.iterdir() if (p / "patients.csv").is_file()}
    for mode in ("pooled", "local"):
        out = tmp_path / mode
        res = subprocess.run([str(BIN / "llnm-server"), "baseline", "--config", str(config), "--mode", mode,
                              "--data", str(small_consortium), "--out", str(out), "--no-progress"],
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["mode"] == mode and metrics["split"] == "test" and metrics["epochs"] == 2
        assert set(metrics["sites"]) == sites
        assert all(set(m) >= METRIC_KEYS and m["n"] > 0 for m in metrics["sites"].values())
        assert metrics["pooled"]["n"] == sum(m["n"] for m in metrics["sites"].values())
        assert set(metrics["train"]) == ({"pooled"} if mode == "pooled" else sites)
        assert load_config(out / "config.yaml").baseline.epochs == 2
        # One line per epoch and trained model, in the run directory and on stderr.
        log_lines = [line for line in (out / "baseline.log").read_text().splitlines() if " epoch " in line]
        assert len(log_lines) == 2 * len(metrics["train"])
        assert all("val AUC" in line for line in log_lines)
        assert f"{'pooled' if mode == 'pooled' else 'local ' + sorted(sites)[0]} epoch 2/2" in res.stderr


@pytest.mark.slow
def test_crash_after_round_one_then_resume(tmp_path: Path, small_consortium: Path) -> None:
    config = write_config(tmp_path, federation={"rounds": 3, "min_sites": 5})
    out = tmp_path / "run"
    proc = start([str(BIN / "llnm-server"), "simulate", "--config", str(config), "--data", str(small_consortium),
                  "--out", str(out)], tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 600
        while 1 not in rounds_of(out):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.5)
    finally:
        stop(proc, signal.SIGKILL)  # a crash: no chance to clean up
    assert rounds_of(out)[0] == 1 and 3 not in rounds_of(out)
    res = subprocess.run([str(BIN / "llnm-server"), "resume", str(out)], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert rounds_of(out) == [1, 2, 3]
    assert "resuming run" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["round"] in (1, 2, 3) and metrics["final"]["model"] == "best"
    for rnd in (1, 2, 3):
        assert (out / "checkpoints" / f"round-{rnd:04d}.safetensors").is_file()
    # A completed run has nothing left to resume, and says so.
    again = subprocess.run([str(BIN / "llnm-server"), "resume", str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to resume" in again.stdout
    assert rounds_of(out) == [1, 2, 3]


# ---- real deployment -------------------------------------------------------------------------------
class Deployment:
    """A SuperLink and one SuperNode per site, as separate processes on loopback."""

    def __init__(self, tmp_path: Path, consortium: Path) -> None:
        self.tmp = tmp_path
        self.port = free_port()
        self.sites = sorted(p for p in consortium.iterdir() if (p / "patients.csv").is_file())
        self.link: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Deployment:
        self.link = start([str(BIN / "llnm-server"), "start", "--host", "127.0.0.1", "--port", str(self.port),
                           "--insecure"], self.tmp / "superlink.log")
        wait_for_port(self.port)
        for site in self.sites:
            self.nodes[site.name] = start(
                [str(BIN / "llnm-site"), "join", "--superlink", f"127.0.0.1:{self.port}", "--data", str(site),
                 "--insecure", "--clientappio-port", str(free_port()), "--threads", "1",
                 "--cache-dir", os.environ["LLNM_CACHE_DIR"]],
                self.tmp / f"node-{site.name}.log")
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.nodes.values():
            stop(proc)
        if self.link is not None:
            stop(self.link)

    def run(self, config: Path, out: Path) -> subprocess.Popen:
        return start([str(BIN / "llnm-server"), "run", "--config", str(config), "--out", str(out),
                      "--superlink", f"127.0.0.1:{self.port}"], self.tmp / "run.log")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.mark.slow
def test_deployment_superlink_and_seven_supernodes(tmp_path: Path, small_consortium: Path) -> None:
    config = write_config(tmp_path, federation={"rounds": 2, "min_sites": 7, "round_timeout_s": 600,
                                                "eval_bootstrap": 50})
    prebuild_caches(small_consortium, config)
    out = tmp_path / "run"
    with Deployment(tmp_path, small_consortium) as dep:
        run = dep.run(config, out)
        try:
            rc = run.wait(timeout=1200)
        finally:
            stop(run)
        assert rc == 0, dep.logs()
    metrics = json.loads((out / "metrics.json").read_text())
    names = {p.name for p in dep.sites}
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert_round_metrics(entry, names)
    assert json.loads((out / "run.json").read_text())["mode"] == "deployment"


@pytest.mark.slow
def test_deployment_site_killed_mid_run(tmp_path: Path, small_consortium: Path) -> None:
    config = write_config(tmp_path, federation={"rounds": 3, "min_sites": 5, "round_timeout_s": 120,
                                                "eval_bootstrap": 50})
    prebuild_caches(small_consortium, config)
    out = tmp_path / "run"
    with Deployment(tmp_path, small_consortium) as dep:
        run = dep.run(config, out)
        victim = dep.sites[-1].name
        try:
            deadline = time.monotonic() + 900
            while 1 not in rounds_of(out):
                assert run.poll() is None, dep.logs()
                assert time.monotonic() < deadline, dep.logs()
                time.sleep(0.5)
            stop(dep.nodes[victim], signal.SIGKILL)
            rc = run.wait(timeout=1500)
        finally:
            stop(run)
        assert rc == 0, dep.logs()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    others = {p.name for p in dep.sites} - {victim}
    assert victim in metrics["rounds"][0]["sites"]
    for entry in metrics["rounds"][1:]:
        assert others <= set(entry["sites"]) and victim not in entry["sites"]
        assert victim not in entry["participants"]
        assert any(f["site"] == victim for f in entry["failures"]), entry["failures"]
