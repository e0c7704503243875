"""Faults and bad input (issue 15): malformed updates never reach the global model.

The screen runs on real Flower messages, as the coordinator receives them; the round loop records each rejected
reply as its site's failure and aggregates the rest (checked here by aggregating with the real strategy).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fl_server.update_screen import screen_updates
from shared_model import protocol

RUN, ROUND = "exp", 3
GLOBAL = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages are addressed within a run; outside a Flower process the run identity is set by hand.
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def reply(node: int, state: dict, *, run: str = RUN, rnd: int = ROUND, echo: bool = True) -> Message:
    ask = Message(RecordDict({}), dst_node_id=node, message_type="train")
    site = {protocol.SITE_NAME: f"site-{node}"}
    if echo:
        site |= {protocol.SITE_RUN_ID: run, protocol.SITE_ROUND: str(rnd)}
    return Message(RecordDict({protocol.ARRAYS_RECORD: ArrayRecord(state),
                               protocol.METRICS_RECORD: MetricRecord({protocol.NUM_EXAMPLES: 10}),
                               protocol.SITE_RECORD: ConfigRecord(site)}), reply_to=ask)


def good(node: int, shift: float = 0.1) -> Message:
    return reply(node, {k: v + shift * node for k, v in GLOBAL.items()})


def screen(replies: list[Message], **kw: object) -> tuple[list[Message], dict[str, str]]:
    accepted, rejected = screen_updates(replies, {k: v.numpy() for k, v in GLOBAL.items()}, run_id=RUN,
                                        server_round=ROUND, name_of=lambda r: f"site-{r.metadata.src_node_id}", **kw)
    assert all(f["phase"] == "train" and f["reason"].startswith("rejected update: ") for f in rejected)
    return accepted, {f["site"]: f["reason"] for f in rejected}


@pytest.mark.parametrize(("bad", "why"), [
    (lambda: reply(9, {"w": torch.full((4, 3), float("nan")), "b": torch.zeros(3)}), "w: NaN or infinite"),
    (lambda: reply(9, {"w": torch.zeros(4, 3), "b": torch.tensor([0.0, float("inf"), 0.0])}), "b: NaN or infinite"),
    (lambda: reply(9, {"w": torch.zeros(3, 4), "b": torch.zeros(3)}), "w: shape [3, 4], the global model's is [4, 3]"),
    (lambda: reply(9, {"w": torch.zeros(4, 3)}), "tensor(s) missing: b"),
    (lambda: reply(9, {**GLOBAL, "extra": torch.zeros(1)}), "unknown tensor(s): extra"),
    (lambda: reply(9, {"w": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(3)}), "w: dtype float64"),
    (lambda: reply(9, {"w": torch.zeros(4, 3, dtype=torch.float16), "b": torch.zeros(3)}), "w: dtype float16"),
    (lambda: reply(9, dict(GLOBAL), rnd=ROUND - 1), "it answers round 2, not round 3"),
    (lambda: reply(9, dict(GLOBAL), run="other-exp"), "it answers run 'other-exp', not this run 'exp'"),
    (lambda: reply(9, dict(GLOBAL), echo=False), "does not say which run and round"),
    (lambda: reply(9, {"w": torch.full((4, 3), 50.0), "b": torch.zeros(3)}), "the round's median"),
])
def test_a_malformed_update_is_rejected_and_the_rest_are_aggregated(bad, why: str) -> None:
    replies = [good(1), good(2), good(3), bad()]
    accepted, rejected = screen(replies)
    assert list(rejected) == ["site-9"] and why in rejected["site-9"], rejected
    assert [r.metadata.src_node_id for r in accepted] == [1, 2, 3]
    # What reaches the global model is the mean of the three good updates only.
    arrays, _ = FedAvg(weighted_by_key=protocol.NUM_EXAMPLES).aggregate_train(ROUND, accepted)
    assert np.allclose(arrays["w"].numpy(), 0.2) and np.isfinite(arrays["b"].numpy()).all()


def test_the_absolute_bound_applies_with_few_sites_and_the_ratio_is_configurable() -> None:
    far = reply(2, {"w": torch.full((4, 3), 5.0), "b": torch.zeros(3)})
    accepted, rejected = screen([good(1), far])  # two replies: no median yardstick
    assert len(accepted) == 2 and not rejected
    accepted, rejected = screen([good(1), far], max_norm=10.0)
    assert "update norm 17.32 above federation.max_update_norm=10" in rejected["site-2"]
    accepted, rejected = screen([good(1), good(2), good(3), reply(4, {k: v + 1.0 for k, v in GLOBAL.items()})],
                                max_norm_ratio=None)
    assert len(accepted) == 4 and not rejected


def test_a_sites_own_evaluation_names_the_rows_it_left_out(tmp_path, capsys) -> None:
    """`llnm-site evaluate` on a site with a duplicated patient id: it succeeds, but names the row it left out
    (never silently), and the site folder is untouched. (A clinical-only site: no image or report to decode.)"""
    import argparse
    import json

    from test_real_data import CLINICAL_ONLY, _clinical_site, _rows

    from fl_client import cmd_evaluate
    from fl_server.config import parse_config
    from fl_server.strategies import initial_state
    from shared_model.model.checkpoint import save_checkpoint

    rows = _rows(12)
    site = _clinical_site(tmp_path / "site", [*rows, rows[3]])
    before = (site / "patients.csv").read_bytes()
    exp = parse_config({"model": {"preset": "tiny"}, "preprocess": {"inputs": CLINICAL_ONLY}})
    ckpt = save_checkpoint(tmp_path / "m.safetensors", initial_state(exp), {
        "round": 1, "model_config": exp.architecture().to_dict(), "preprocess_config": exp.preprocess.to_dict()})
    parser = argparse.ArgumentParser()
    cmd_evaluate.add_arguments(parser)
    args = parser.parse_args(["--model", str(ckpt), "--data", str(site), "--out", str(tmp_path / "eval.json"),
                              "--bootstrap", "0", "--split", "all", "--cache-dir", str(tmp_path / "cache")])
    assert cmd_evaluate.run(args) == 0
    err = capsys.readouterr().err
    assert "P3 is duplicated (first at row 5)" in err and "1 patient row(s) left out" in err, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert len(result["skipped"]) == 1 and "duplicated" in result["skipped"][0]["reasons"][0]
    assert result["n_scored"] == 12 and (site / "patients.csv").read_bytes() == before


def test_a_flower_error_reads_as_what_happened_to_the_site() -> None:
    from flwr.common.constant import ErrorCode

    from fl_server.site_channel import describe_error

    text = describe_error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable — The destination node failed")
    assert text.startswith("unreachable: its SuperNode stopped sending heartbeats") and "(Flower: Error: Node" in text
    assert describe_error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom\n  trace") == "error: boom trace"


# A real-process fault scenario (make test-faults); `make test` keeps join's restart rule through
# tests/test_supervisor.py's child processes.
@pytest.mark.faults
def test_a_site_comes_back_by_itself_after_the_superlink_restarts(tmp_path, small_consortium) -> None:
    """A real SuperLink (loopback development mode) restarted under a joined site: `llnm-site join` starts its
    SuperNode again, says why, and the new SuperLink sees the site again."""
    import signal
    import time

    from processes import BIN, free_port, start, stop, wait_for_port

    port = free_port()
    link_cmd = [str(BIN / "llnm-server"), "start", "--insecure", "--host", "127.0.0.1", "--port", str(port)]
    link = start(link_cmd, tmp_path / "superlink-1.log")
    site = None
    try:
        wait_for_port(port)
        site = start([str(BIN / "llnm-site"), "join", "--superlink", f"127.0.0.1:{port}", "--insecure", "--data",
                      str(small_consortium / "site-a"), "--state-dir", str(tmp_path / "state"), "--skip-check",
                      "--clientappio-port", str(free_port())], tmp_path / "join.log")
        log = tmp_path / "join.log"

        def wait_for(text: str, count: int = 1, timeout: float = 90) -> None:
            deadline = time.monotonic() + timeout
            while log.read_text(errors="replace").count(text) < count:
                assert site.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)

        wait_for("SuperNode ID:")
        stop(link, signal.SIGKILL)
        link = start(link_cmd, tmp_path / "superlink-2.log")
        wait_for_port(port)
        wait_for("Starting it again in")
        wait_for("SuperNode ID:", count=2)  # a new SuperNode, on the new SuperLink
        text = log.read_text(errors="replace")
        assert "the SuperLink restarted or the connection dropped" in text and site.poll() is None
    finally:
        if site is not None:
            stop(site)
        stop(link)
    assert "error:" not in (tmp_path / "join.log").read_text(errors="replace")  # stopped when asked: no error


def test_a_site_that_dropped_mid_round_is_one_failure(tmp_path) -> None:
    """A SuperNode killed mid-round is unreachable (Flower's error) and also no longer connected: one failure."""
    from fl_server.config import parse_config
    from fl_server.site_channel import SiteChannel

    sites = SiteChannel(grid=None, exp=parse_config({}), run_path=tmp_path, run_id="r", say=print,
                        on_refused=print)
    sites.known_sites = {"site-a", "site-b", "site-c"}
    sites.site_names = {1: "site-a", 2: "site-b"}
    dropped = [{"site": "site-b", "node_id": 2, "phase": "train", "reason": "unreachable: ..."}]
    offline = sites.offline_sites([1], "train", dropped)
    assert [f["site"] for f in offline] == ["site-c"] and offline[0]["reason"] == "offline (not connected)"


def _tiny_checkpoint(tmp_path):
    from fl_server.config import parse_config
    from fl_server.strategies import initial_state
    from shared_model.model.checkpoint import save_checkpoint

    exp = parse_config({"model": {"preset": "tiny"}})
    meta = {"round": 1, "model_config": exp.architecture().to_dict(), "preprocess_config": exp.preprocess.to_dict()}
    return save_checkpoint(tmp_path / "round-0001.safetensors", initial_state(exp), meta), exp


def _expect_refused(path, *words: str, named=None) -> str:
    from shared_model.model.checkpoint import CheckpointError, model_from_checkpoint

    with pytest.raises(CheckpointError) as err:
        model_from_checkpoint(path)
    text = str(err.value)
    assert text.startswith(str(named or path)), text
    for word in words:
        assert word in text, text
    return text


def test_a_damaged_or_foreign_checkpoint_is_refused_by_name(tmp_path) -> None:
    """Truncated, one byte flipped, the side-car of another architecture, no side-car, side-car not JSON: each is
    refused with the file and the reason; the intact checkpoint loads with its recorded SHA-256."""
    import hashlib
    import json

    from shared_model.model.checkpoint import model_from_checkpoint

    path, exp = _tiny_checkpoint(tmp_path)
    data = path.read_bytes()
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    model, _ = model_from_checkpoint(path)
    assert sum(p.numel() for p in model.parameters()) > 0

    path.write_bytes(data[: len(data) // 2])
    _expect_refused(path, "SHA-256", "truncated")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    _expect_refused(path, "SHA-256", "damaged")
    # A checkpoint from before the hash was recorded: truncation is still caught, by the reader.
    side.write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    path.write_bytes(data[:100])
    _expect_refused(path, "not a readable safetensors checkpoint")
    # The right bytes, but the side-car says it is another network.
    path.write_bytes(data)
    other = {**meta, "model_config": {**meta["model_config"], "hidden_size": 32}}
    side.write_text(json.dumps(other))
    _expect_refused(path, "not those of the 'llnm-net' network", "of another shape")
    feature_head = {**other, "model_config": exp.architecture().to_dict() | {"architecture": "feature-head"}}
    side.write_text(json.dumps(feature_head))
    _expect_refused(path, "not those of the 'feature-head' network", "missing", "unexpected")
    side.write_text("{not json")
    _expect_refused(path, "not valid JSON", named=side)
    side.unlink()
    _expect_refused(path, "side-car", named=side)


def test_llnm_site_evaluate_refuses_a_damaged_checkpoint_with_one_line(tmp_path) -> None:
    import subprocess

    from processes import BIN

    path, _ = _tiny_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    site = tmp_path / "site"
    site.mkdir()
    out = subprocess.run([str(BIN / "llnm-site"), "evaluate", "--model", str(path), "--data", str(site)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"{path}: SHA-256" in out.stderr, out.stderr


def _small_disk(tmp_path, size: int):
    """A folder on a file system that fills up after `size` bytes: a real tmpfs where this machine lets us mount
    one (root in a container with the capability), else the kernel's per-process file-size limit
    (RLIMIT_FSIZE) for the child process. Returns (folder, preexec_fn for the child, unmount)."""
    import os
    import resource
    import signal
    import subprocess

    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode == 0:
            return folder, None, lambda: subprocess.run(["umount", "-l", str(folder)], check=False)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return folder, limit, lambda: None


def test_a_full_disk_while_building_the_cache_is_a_clear_error_and_never_a_half_written_cache(
        tmp_path, small_consortium, caplog) -> None:
    """The site's cache folder fills up while `llnm-site evaluate` builds the cache: one clear line naming the
    cache file and the reason, no file left in the cache folder (the write is atomic), the site folder
    untouched. A half-written cache at the expected name (as a crash in a non-atomic writer would leave) is
    refused and rebuilt, never read."""
    import logging
    import subprocess

    import torch
    from processes import BIN, first_patients, tree_digest, write_config

    from fl_server.config import load_config
    from fl_server.strategies import initial_state
    from shared_model.model.checkpoint import save_checkpoint
    from shared_model.sitedata.cache import build_site_tensors

    site = first_patients(small_consortium / "site-a", tmp_path / "site-a", 6)
    before = tree_digest(site)
    exp = load_config(write_config(tmp_path))
    ckpt = save_checkpoint(tmp_path / "m.safetensors", initial_state(exp), {
        "round": 1, "model_config": exp.architecture().to_dict(), "preprocess_config": exp.preprocess.to_dict()})
    disk, preexec, unmount = _small_disk(tmp_path, 256 * 1024)
    try:
        out = subprocess.run([str(BIN / "llnm-site"), "evaluate", "--model", str(ckpt), "--data", str(site),
                              "--cache-dir", str(disk), "--bootstrap", "0"],
                             capture_output=True, text=True, timeout=300, preexec_fn=preexec)
        left_behind = sorted(p.name for p in disk.iterdir())
    finally:
        unmount()
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"site-a: cannot write the preprocessing cache {disk}/site-a-" in lines[0], lines[0]
    assert ("No space left on device" in lines[0]) or ("File too large" in lines[0]), lines[0]
    assert left_behind == [], left_behind  # no partial .pt, no temporary file, no stat key
    assert tree_digest(site) == before

    # A truncated file where the cache belongs (and a stat key pointing to it): refused and rebuilt.
    cache = tmp_path / "cache"
    built = build_site_tensors(site, exp.preprocess, cache_dir=cache, progress=False)
    (path,) = cache.glob("site-a-*.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="shared_model.sitedata.cache"):
        again = build_site_tensors(site, exp.preprocess, cache_dir=cache, progress=False)
    assert f"cache file {path} is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert again.patient_ids == built.patient_ids and torch.equal(again.image, built.image)
    assert tree_digest(site) == before


@pytest.mark.faults
@pytest.mark.parametrize("dp", [True, False], ids=["dp-on", "dp-off"])
def test_the_superlink_and_serverapp_killed_mid_round_then_resumed(tmp_path, small_consortium, dp: bool) -> None:
    """A real deployment: once a site has sent its round-2 update, the SuperLink and the ServerApp under it are
    SIGKILLed with `llnm-server run`. A new SuperLink starts on the same port, the sites come back by themselves,
    and `llnm-server resume` finishes the run. Every round is trained once in the history.

    DP on (patient-level and site-level): the privacy ledger is recomputed with dp-accounting: the sites replay
    the round-2 update they had sent (the same release, not a second one) and the abandoned round's site-level
    release, if the coordinator had made it, stays counted; what each site sent holds none of its patients.
    The final model cannot equal an uninterrupted run's: DP noise is drawn afresh by design.
    DP off: the final model equals that of an uninterrupted run with the same seeds (run afterwards on the same
    SuperLink and sites) within floating-point noise."""
    import json
    import signal
    import subprocess

    import yaml
    from processes import BIN, ROOT, Loopback, fault_config, prebuild_caches, record_fault, rounds_of, stop
    from test_privacy import DELTA, PATIENT_Z, SITE_CLIP, SITE_Z, check_patient_epsilons, close, gaussian_epsilon

    names = ["site-a", "site-b", "site-c"]
    sites = [small_consortium / n for n in names]
    privacy = {"patient": {"enabled": True, "noise_multiplier": PATIENT_Z, "max_grad_norm": 1.0, "delta": DELTA},
               "site": {"enabled": True, "clipping": "server-fixed", "noise_multiplier": SITE_Z,
                        "clipping_norm": SITE_CLIP, "delta": DELTA}} if dp else None
    config = fault_config(tmp_path, "crash-resume", {"rounds": 3, "min_sites": 3, "round_timeout_s": 300,
                                                     "connect_timeout_s": 120, "eval_every": 3}, privacy)
    reference_config = tmp_path / "reference.yaml"
    reference_config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "name": "uninterrupted"}))
    prebuild_caches(sites, config)
    run_dir, net, t0 = tmp_path / "run", Loopback(tmp_path), time.monotonic()

    def sent(site: str, rnd: int) -> bool:
        return any(e.get("event") == "sent" and e.get("round") == rnd for e in net.audit(site))

    try:
        net.start_superlink("superlink-1.log")
        for site in sites:
            net.join(site, "--keep-sent", "--privacy-state-dir", str(tmp_path / "privacy"))
        net.run(config, run_dir, "run-1.log")
        net.wait(lambda: rounds_of(run_dir) == [1] and any(sent(n, 2) for n in names), "a round-2 update sent")
        stop(net.procs.pop("run"), signal.SIGKILL)
        stop(net.procs.pop("superlink"), signal.SIGKILL)  # its process group: the ServerApp it started too
        ledger_at_kill = json.loads((run_dir / "privacy.json").read_text()) if dp else {}
        net.start_superlink("superlink-2.log")
        net.wait(lambda: all((tmp_path / f"join-{n}.log").read_text().count("SuperNode ID:") >= 2 for n in names),
                 "the sites to reconnect", 180)
        resumed = subprocess.run([str(BIN / "llnm-server"), "resume", str(run_dir)], capture_output=True,
                                 text=True, timeout=900, cwd=ROOT)
        assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
        if not dp:
            reference = subprocess.run([str(BIN / "llnm-server"), "run", "--config", str(reference_config), "--out",
                                        str(tmp_path / "reference"), "--superlink", net.address, "--insecure"],
                                       capture_output=True, text=True, timeout=900, cwd=ROOT)
            assert reference.returncode == 0, reference.stdout[-4000:] + reference.stderr[-4000:]
    finally:
        net.close()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert all(set(r["participants"]) == set(names) for r in metrics["rounds"]), metrics["rounds"]
    if not dp:
        from shared_model.model.checkpoint import load_checkpoint

        resumed_model, _ = load_checkpoint(run_dir / "checkpoints" / "round-0003.safetensors")
        reference_model, _ = load_checkpoint(tmp_path / "reference" / "checkpoints" / "round-0003.safetensors")
        assert resumed_model.keys() == reference_model.keys()
        diff = max(float((resumed_model[k] - reference_model[k]).abs().max()) for k in resumed_model)
        scale = max(float(v.abs().max()) for v in reference_model.values())
        assert diff <= 1e-5 * max(scale, 1.0), diff
        record_fault("superlink-killed-dp-off", {
            "what": "as superlink-killed, DP off; then an uninterrupted run with the same seeds on the same "
                    "SuperLink and sites", "seconds": round(time.monotonic() - t0, 1),
            "rounds_in_history": [r["round"] for r in metrics["rounds"]],
            "final_model_max_abs_difference": diff, "largest_weight": scale, "records_lost": 0})
        return
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert [e["round"] for e in ledger["rounds"]] == [1, 2, 3]
    assert ledger["rounds"][0] == ledger_at_kill["rounds"][0]  # no reset
    check_patient_epsilons(ledger)  # steps_total = round x steps_round: the replayed release is not counted twice
    abandoned = [e["round"] for e in ledger.get("abandoned", [])]
    assert abandoned in ([], [2]), abandoned
    releases = 3 + len(abandoned)
    server = ledger["rounds"][-1]["server"]
    assert server["releases"] == releases and close(server["epsilon"], gaussian_epsilon(SITE_Z, releases, DELTA))
    replayed = [n for n in names if ledger["rounds"][1]["sites"][n].get("replayed")]
    assert replayed and set(replayed) <= {n for n in names if sent(n, 2)}
    scans = {}
    for site in sites:
        scan = subprocess.run([str(BIN / "llnm-site"), "audit", "--scan-sent", "--json", "--data", str(site),
                               "--state-dir", str(net.state(site.name))], capture_output=True, text=True)
        result = json.loads(scan.stdout)
        assert scan.returncode == 0 and result["findings"] == [] and result["kept_messages"] >= 3, scan.stdout[-2000:]
        scans[site.name] = {k: result[k] for k in ("kept_messages", "patient_ids", "needles")} | {
            "findings": len(result["findings"])}
    record_fault("superlink-killed", {
        "what": "SuperLink and ServerApp SIGKILLed once a site had sent its round-2 update; new SuperLink on the "
                "same port; sites reconnected by themselves; `llnm-server resume`",
        "privacy": "patient-level DP-SGD and site-level Gaussian (server-fixed clipping)",
        "sites": names, "seconds": round(time.monotonic() - t0, 1),
        "rounds_in_history": [r["round"] for r in metrics["rounds"]], "abandoned_rounds": abandoned,
        "replayed_round_2_by": replayed,
        "site_level": {"releases": releases, "epsilon": server["epsilon"],
                       "recomputed": gaussian_epsilon(SITE_Z, releases, DELTA), "delta": DELTA},
        "patient_level": {n: {"epsilon": e["epsilon"], "steps_total": e["steps_total"],
                              "steps_round": e["steps_round"]} for n, e in ledger["rounds"][-1]["sites"].items()},
        "sent_scans": scans, "records_lost": 0})


@pytest.mark.faults
def test_a_stalled_site_times_out_and_its_late_update_is_never_aggregated(tmp_path, small_consortium) -> None:
    """Real processes: site-c's SuperNode and ClientApp are frozen (SIGSTOP, as a stalled machine) once they have
    received round 2. The round times out and goes on with the other two; site-c is thawed once round 2 is
    recorded, finishes its round-2 training and sends it, late. That update is in no round's aggregate: every
    aggregated update answers its own round's message (the ids from the sites' audit logs), and site-c takes
    part in round 3 with its round-3 update."""
    import datetime as dt
    import json
    import signal

    from processes import Loopback, prebuild_caches, record_fault, rounds_of, write_config

    names = ["site-a", "site-b", "site-c"]
    sites = [small_consortium / n for n in names]
    config = write_config(tmp_path, federation={"rounds": 3, "min_sites": 2, "round_timeout_s": 45,
                                                "eval_bootstrap": 0, "final_eval_split": None, "eval_every": 3,
                                                "connect_timeout_s": 120})
    prebuild_caches(sites, config)
    run_dir, net, t0 = tmp_path / "run", Loopback(tmp_path), time.monotonic()
    audit = net.audit
    try:
        net.start_superlink()
        for site in sites:
            net.join(site)
        run = net.run(config, run_dir)
        net.wait(lambda: any(e["event"] == "received" and e.get("round") == 2 and e["message_type"] == "train"
                             for e in audit("site-c")), "site-c to receive round 2")
        os.killpg(net.procs["site-c"].pid, signal.SIGSTOP)
        net.wait(lambda: rounds_of(run_dir) == [1, 2], "round 2 to close without site-c")
        thawed = dt.datetime.now(dt.UTC)
        os.killpg(net.procs["site-c"].pid, signal.SIGCONT)
        assert run.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        net.close()

    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    second = rounds[1]
    assert "site-c" not in second["aggregated"] and set(second["aggregated"]) == {"site-a", "site-b"}
    assert [f["site"] for f in second["failures"]] == ["site-c"], second["failures"]
    events = audit("site-c")
    asked = {e["round"]: e["message_id"] for e in events if e["event"] == "received" and e["message_type"] == "train"}
    late = [e for e in events if e["event"] == "sent" and e["message_type"] == "train" and e["round"] == 2]
    assert late and dt.datetime.fromisoformat(late[0]["time"]) >= thawed, late  # it did answer round 2, late
    for entry in rounds:
        assert asked[2] not in entry["aggregated"].values(), entry["round"]
    for name in names:  # every aggregated update answers its own round's message
        asked_of = {e["round"]: e["message_id"] for e in audit(name)
                    if e["event"] == "received" and e["message_type"] == "train"}
        for entry in rounds:
            if name in entry["aggregated"]:
                assert entry["aggregated"][name] == asked_of[entry["round"]], (name, entry["round"])
    assert rounds[2]["aggregated"].get("site-c") == asked[3]  # thawed, it takes part again
    record_fault("stalled-site", {
        "what": "site-c's SuperNode and ClientApp frozen (SIGSTOP) after receiving round 2, thawed once round 2 "
                "closed; federation.round_timeout_s 45, min_sites 2",
        "seconds": round(time.monotonic() - t0, 1),
        "round_2_failure": second["failures"][0]["reason"], "late_reply_sent_at": late[0]["time"],
        "thawed_at": thawed.isoformat(), "aggregated": {r["round"]: sorted(r["aggregated"]) for r in rounds},
        "late_update_aggregated": False, "records_lost": 0})


@pytest.mark.faults
def test_fewer_sites_than_the_quorum_stop_the_run_and_keep_the_last_round(tmp_path, small_consortium) -> None:
    """Real processes, patient-level DP: site-c is SIGKILLed after round 1 with `min_sites: 3`. The run stops
    with a message naming the round, the quorum and how to go on; round 1's checkpoint (its SHA-256 checked)
    and its ledger entry are intact. Once site-c has joined again, `llnm-server resume` trains round 2, and
    the ledger, recomputed with dp-accounting, counts each site's round-2 release once."""
    import json
    import signal
    import subprocess

    from processes import BIN, ROOT, Loopback, fault_config, prebuild_caches, record_fault, rounds_of, stop
    from test_privacy import DELTA, PATIENT_Z, check_patient_epsilons

    from shared_model.model.checkpoint import model_from_checkpoint

    names = ["site-a", "site-b", "site-c"]
    sites = [small_consortium / n for n in names]
    config = fault_config(tmp_path, "quorum-lost", {"rounds": 2, "min_sites": 3, "round_timeout_s": 90,
                                                    "connect_timeout_s": 30, "eval_every": 2},
                          {"patient": {"enabled": True, "noise_multiplier": PATIENT_Z, "max_grad_norm": 1.0,
                                       "delta": DELTA}})
    prebuild_caches(sites, config)
    run_dir, net, t0 = tmp_path / "run", Loopback(tmp_path), time.monotonic()
    privacy = ("--privacy-state-dir", str(tmp_path / "privacy"))
    try:
        net.start_superlink()
        for site in sites:
            net.join(site, *privacy)
        run = net.run(config, run_dir)
        net.wait(lambda: rounds_of(run_dir) == [1], "round 1")
        stop(net.procs.pop("site-c"), signal.SIGKILL)
        ledger_1 = json.loads((run_dir / "privacy.json").read_text())
        assert run.wait(timeout=600) != 0
        said = (tmp_path / "run.log").read_text()
        assert "round 2: " in said and "min_sites" in said and f"llnm-server resume {run_dir}" in said, said[-3000:]
        assert rounds_of(run_dir) == [1]
        _model, meta = model_from_checkpoint(run_dir / "checkpoints" / "round-0001.safetensors")
        assert meta["round"] == 1 and len(meta["sha256"]) == 64
        stopped = json.loads((run_dir / "privacy.json").read_text())
        # Round 1 as it was; what sites a and b spent on round 2 is kept, the round marked incomplete.
        assert stopped["rounds"][0] == ledger_1["rounds"][0] and stopped["rounds"][0]["complete"]
        assert all(not e["complete"] for e in stopped["rounds"][1:]), stopped["rounds"]
        assert "Traceback" not in said

        net.join(sites[2], *privacy, log="join-site-c-2.log")
        net.wait(lambda: (tmp_path / "join-site-c-2.log").read_text().count("SuperNode ID:") >= 1, "site-c back", 120)
        resumed = subprocess.run([str(BIN / "llnm-server"), "resume", str(run_dir)], capture_output=True,
                                 text=True, timeout=900, cwd=ROOT)
        assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    finally:
        net.close()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert set(metrics["rounds"][1]["aggregated"]) == set(names)
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert [e["round"] for e in ledger["rounds"]] == [1, 2] and ledger["rounds"][0] == ledger_1["rounds"][0]
    check_patient_epsilons(ledger)
    record_fault("quorum-lost", {
        "what": "site-c SIGKILLed after round 1 with min_sites 3; the run stopped; site-c joined again; "
                "`llnm-server resume`", "seconds": round(time.monotonic() - t0, 1),
        "stop_message": next(line for line in said.splitlines() if "min_sites" in line)[-600:],
        "rounds_kept_at_stop": [1], "rounds_after_resume": [r["round"] for r in metrics["rounds"]],
        "patient_epsilon": {n: e["epsilon"] for n, e in ledger["rounds"][-1]["sites"].items()},
        "records_lost": 0})


def float16_reply(node: int, shift: float = 0.1, *, rnd: int = ROUND) -> Message:
    """A train reply as a site sends it under `update_transport: float16`, through the site's own mod."""
    from flwr.app import Context, RecordDict

    from fl_client.update_transport import update_transport_mod

    ask = Message(RecordDict({protocol.ARRAYS_RECORD: ArrayRecord(GLOBAL),
                              protocol.CONFIG_RECORD: ConfigRecord({protocol.UPDATE_TRANSPORT: "float16"})}),
                  dst_node_id=node, message_type="train")
    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
    return update_transport_mod(ask, context, lambda msg, ctx: good(node, shift) if rnd == ROUND else reply(
        node, {k: v + shift for k, v in GLOBAL.items()}, rnd=rnd))


def test_float16_updates_are_half_the_bytes_and_aggregate_as_float32() -> None:
    """Under `federation.update_transport: float16` a site sends float16 differences from the model it was sent
    (its mod), the coordinator turns them back into float32 weights before screening, and the aggregate is the
    float32 one within float16's precision of the update. A reply in the other encoding is rejected."""
    replies = [float16_reply(n) for n in (1, 2, 3)]
    sent = replies[0].content[protocol.ARRAYS_RECORD]
    assert {v.numpy().dtype for v in sent.values()} == {np.dtype("float16")}
    assert replies[0].content[protocol.SITE_RECORD][protocol.UPDATE_ENCODING] == "float16-delta"
    def payload(record) -> int:
        return sum(v.numpy().nbytes for v in record.values())

    assert payload(sent) * 2 == payload(good(1).content[protocol.ARRAYS_RECORD])
    accepted, rejected = screen(replies, transport="float16")
    assert not rejected and [r.metadata.src_node_id for r in accepted] == [1, 2, 3]
    arrays, _ = FedAvg(weighted_by_key=protocol.NUM_EXAMPLES).aggregate_train(ROUND, accepted)
    assert arrays["w"].numpy().dtype == np.float32 and np.allclose(arrays["w"].numpy(), 0.2, atol=1e-3)
    _, rejected = screen([good(1), good(2), float16_reply(3)], transport="float16")
    assert set(rejected) == {"site-1", "site-2"} and "the round asked for float16-delta" in rejected["site-1"]
    _, rejected = screen([good(1), good(2), float16_reply(3)])
    assert list(rejected) == ["site-3"] and "sent its update as float16-delta" in rejected["site-3"]


def test_float16_transport_is_refused_with_secure_aggregation() -> None:
    from fl_server.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"federation\.update_transport"):
        parse_config({"federation": {"secure_aggregation": True, "update_transport": "float16", "min_sites": 3}})
