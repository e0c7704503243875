"""Faults and bad input (issue 15): malformed updates never reach the global model.

The screen runs on real Flower messages, as the coordinator receives them; the round loop records each rejected
reply as its site's failure and aggregates the rest (checked here by aggregating with the real strategy).
"""

from __future__ import annotations

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
    from shared_model.checkpoint import save_checkpoint

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

    from fl_server.federation import describe_error

    text = describe_error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable — The destination node failed")
    assert text.startswith("unreachable: its SuperNode stopped sending heartbeats") and "(Flower: Error: Node" in text
    assert describe_error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom\n  trace") == "error: boom trace"


@pytest.mark.slow
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
    from fl_server.federation import Federation
    from fl_server.run_dir import RunDirectory

    fed = Federation(grid=None, exp=parse_config({}), run_dir=RunDirectory(tmp_path), echo=False)
    fed.known_sites = {"site-a", "site-b", "site-c"}
    fed.site_names = {1: "site-a", 2: "site-b"}
    dropped = [{"site": "site-b", "node_id": 2, "phase": "train", "reason": "unreachable: ..."}]
    offline = fed.offline_sites([1], "train", dropped)
    assert [f["site"] for f in offline] == ["site-c"] and offline[0]["reason"] == "offline (not connected)"


def _tiny_checkpoint(tmp_path):
    from fl_server.config import parse_config
    from fl_server.strategies import initial_state
    from shared_model.checkpoint import save_checkpoint

    exp = parse_config({"model": {"preset": "tiny"}})
    meta = {"round": 1, "model_config": exp.architecture().to_dict(), "preprocess_config": exp.preprocess.to_dict()}
    return save_checkpoint(tmp_path / "round-0001.safetensors", initial_state(exp), meta), exp


def _expect_refused(path, *words: str, named=None) -> str:
    from shared_model.checkpoint import CheckpointError, model_from_checkpoint

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

    from shared_model.checkpoint import model_from_checkpoint

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
    from shared_model.checkpoint import save_checkpoint
    from shared_model.site_cache import build_site_tensors

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
    with caplog.at_level(logging.WARNING, logger="shared_model.site_cache"):
        again = build_site_tensors(site, exp.preprocess, cache_dir=cache, progress=False)
    assert f"cache file {path} is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert again.patient_ids == built.patient_ids and torch.equal(again.image, built.image)
    assert tree_digest(site) == before
