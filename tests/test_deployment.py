"""Secure deployment: provisioning, keys, the SuperLink's and sites' secure defaults, the site's app gate and
audit log, site names bound to registered keys; and one real consortium on loopback.

`secure_run` is the end-to-end check: a TLS SuperLink with SuperNode authentication and six SuperNodes (five
hospitals and one impostor), all provisioned by our commands, run two rounds while intruders try their way in (an
unregistered key, plain HTTP, a registered hospital presenting another's name, a revoked site), and one site
starts without having approved the app and approves it mid-run. (A site dying mid-round is the
secure-aggregation tests' and the fault-injection suite's.)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from processes import (
    BIN,
    ROOT,
    assert_round_metrics,
    free_port,
    prebuild_caches,
    start,
    stop,
    wait_for_port,
    write_config,
)

from fl_server.config import ConfigError
from fl_server.consortium import ConsortiumConfig, load_consortium
from fl_server.provisioning import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, provision
from shared_model.protocol.site_kit import load_kit, load_site_public_key, make_site_key


def consortium(sites: list[str], address: str = "127.0.0.1:9093", **extra: object) -> ConsortiumConfig:
    return ConsortiumConfig.model_validate({"name": "test", "superlink": {"address": address, **extra},
                                           "sites": sites})


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


# ---- provisioning ------------------------------------------------------------------------------------------
def test_provision_makes_a_ca_a_superlink_certificate_and_kits(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    out = tmp_path / "prov"
    report = provision(consortium(["site-a", "site-b"], hosts=["link.example.org", "10.1.2.3"]), out)
    assert "ca/ca.key" in report.created and "kits/site-b/kit.json" in report.created
    for secret in (CA_KEY, SERVER_KEY):
        assert (out / secret).stat().st_mode & 0o077 == 0, f"{secret} must be private"
    ca = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((out / SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    kit = load_kit(out / "kits" / "site-a")
    assert (kit.site, kit.superlink, kit.consortium) == ("site-a", "127.0.0.1:9093", "test")
    assert not any("key" in p.name for p in (out / "kits" / "site-a").iterdir()), "a kit holds no secrets"


def test_every_command_in_a_kit_readme_is_accepted_as_written(tmp_path: Path) -> None:
    """The kit's README is what a hospital follows first: each `llnm-site` / `llnm-server` command in it (inline
    or in a block, continuation lines joined) parses with the real command-line tools, and names the site's
    own key file."""
    import re
    import shlex

    from fl_client.cli import COMMANDS as SITE
    from fl_server.cli import COMMANDS as SERVER
    from shared_model.cli_support import build_parser

    out = tmp_path / "prov"
    provision(consortium(["site-a"]), out)
    text = (out / "kits" / "site-a" / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"`(llnm-(?:site|server) [^`]+)`", text)
    commands += [line.strip() for line in text.splitlines() if line.strip().startswith(("llnm-site ", "llnm-server "))]
    assert len(commands) >= 7, commands
    for command in commands:
        words = shlex.split(command.replace("HASH", "a" * 64))
        tables = {"llnm-site": SITE, "llnm-server": SERVER}
        parser = build_parser(words[0], "", tables[words[0]], only=words[1])
        try:
            parser.parse_args(words[1:])
        except SystemExit as exc:
            raise AssertionError(f"the kit's command does not parse: {command}") from exc
    assert "keygen --out keys/ --name site-a" in text and "keys/site-a.key" in text


def test_adding_a_site_keeps_every_existing_credential(tmp_path: Path) -> None:
    out = tmp_path / "prov"
    provision(consortium(["site-a"]), out)
    before = {p: (out / p).read_bytes() for p in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY,
                                                  Path("kits/site-a/ca.crt"), Path("kits/site-a/kit.json"))}
    report = provision(consortium(["site-a", "site-b"]), out)
    assert {p: (out / p).read_bytes() for p in before} == before
    assert [f for f in report.created if not f.startswith("kits/site-b/")] == ["consortium.yaml"]
    # A changed host list re-issues the SuperLink's certificate, still from the same CA.
    provision(consortium(["site-a", "site-b"], hosts=["new.example.org"]), out)
    assert (out / CA_KEY).read_bytes() == before[CA_KEY]
    assert (out / SERVER_CERT).read_bytes() != before[SERVER_CERT]


def test_an_existing_ca_is_used_and_checked(tmp_path: Path) -> None:
    first = tmp_path / "first"
    provision(consortium(["site-a"]), first)
    second = tmp_path / "second"
    provision(consortium(["site-a"]), second, ca_cert=first / CA_CERT, ca_key=first / CA_KEY)
    assert (second / CA_CERT).read_bytes() == (first / CA_CERT).read_bytes()
    other = tmp_path / "other"
    provision(consortium(["site-a"]), other)
    with pytest.raises(ConfigError, match="is not the private key of"):
        provision(consortium(["site-a"]), tmp_path / "x", ca_cert=first / CA_CERT, ca_key=other / CA_KEY)
    with pytest.raises(ConfigError, match="not a CA certificate"):
        provision(consortium(["site-a"]), tmp_path / "y", ca_cert=first / SERVER_CERT, ca_key=first / SERVER_KEY)


def test_a_tampered_kit_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "prov"
    provision(consortium(["site-a"]), out)
    other = tmp_path / "other"
    provision(consortium(["site-a"]), other)
    kit = out / "kits" / "site-a"
    (kit / "ca.crt").write_bytes((other / CA_CERT).read_bytes())
    with pytest.raises(ConfigError, match=r"does not match kit\.json's ca_sha256"):
        load_kit(kit)
    with pytest.raises(ConfigError, match="not an onboarding kit"):
        load_kit(tmp_path)


@pytest.mark.parametrize(("data", "expected"), [
    ({"name": "c", "superlink": {"address": "https://x:1"}, "sites": ["a"]}, "without a scheme"),
    ({"name": "c", "superlink": {"address": "x:99999"}, "sites": ["a"]}, "outside 1-65535"),
    ({"name": "c", "superlink": {"address": "x:1"}, "sites": ["a", "a"]}, "listed twice"),
    ({"name": "c", "superlink": {"address": "x:1"}, "sites": ["a b"]}, "site names must be 1-64 characters"),
    (None, "empty file"),
])
def test_bad_consortium_files_name_the_problem(tmp_path: Path, data: object, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("" if data is None else yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=expected):
        load_consortium(path)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    done = run_cli(BIN / "llnm-site", "keygen", "--out", tmp_path, "--name", "site-a")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site-a.key").stat().st_mode & 0o077 == 0
    line, fingerprint = load_site_public_key(tmp_path / "site-a.pub")
    assert line.startswith(b"ecdsa-sha2-nistp384 ") and fingerprint.startswith("SHA256:")
    again = run_cli(BIN / "llnm-site", "keygen", "--out", tmp_path, "--name", "site-a")
    assert again.returncode == 2 and "never overwrites" in again.stderr
    with pytest.raises(ConfigError, match="is a PRIVATE key"):
        load_site_public_key(tmp_path / "site-a.key")


def test_register_and_revoke_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    from fl_server.control import register_site, revoke_site

    out = tmp_path / "prov"
    provision(consortium(["site-a"]), out)
    private, public = make_site_key()
    (tmp_path / "a.key").write_bytes(private)
    (tmp_path / "a.pub").write_bytes(public)
    with pytest.raises(ConfigError, match="not in the consortium"):
        register_site(out, "site-z", tmp_path / "a.pub")
    with pytest.raises(ConfigError, match="is a PRIVATE key"):
        register_site(out, "site-a", tmp_path / "a.key")
    with pytest.raises(ConfigError, match="'site-a' is not registered"):
        revoke_site(out, "site-a")
    with pytest.raises(ConfigError, match="not a provisioning folder"):
        register_site(tmp_path, "site-a", tmp_path / "a.pub")


# ---- secure by default --------------------------------------------------------------------------------------
def test_superlink_is_tls_with_node_auth_by_default_and_insecure_only_on_loopback(tmp_path: Path) -> None:
    from fl_server.deployment import plan_superlink

    with pytest.raises(ConfigError, match="--provision DIR"):
        plan_superlink(None)
    with pytest.raises(ConfigError, match="loopback development only"):
        plan_superlink(None, host="0.0.0.0", insecure=True)
    assert plan_superlink(None, host="127.0.0.1", insecure=True).command()[-1] == "--insecure"
    out = tmp_path / "prov"
    provision(consortium(["site-a"], address="link.example.org:9443"), out)
    cmd = plan_superlink(None, provision_dir=str(out)).command()
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--port") + 1] == "9443" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--database" not in cmd  # in memory: `start` registers the sites of registry.json again
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(out / SERVER_CERT)
    done = run_cli(BIN / "llnm-server", "start", "--host", "10.0.0.1", "--insecure")
    assert done.returncode == 2 and "10.0.0.1 is not a loopback address" in done.stderr


def test_run_talks_tls_to_the_superlink(tmp_path: Path) -> None:
    from fl_server.config import parse_config
    from fl_server.deployment import control_connection

    exp = parse_config({})
    with pytest.raises(ConfigError, match="over TLS"):
        control_connection(exp)
    with pytest.raises(ConfigError, match="loopback development only"):
        control_connection(exp, superlink="10.0.0.1:9093", insecure=True)
    out = tmp_path / "prov"
    provision(consortium(["site-a"], address="link.example.org:9443"), out)
    conn = control_connection(exp, provision_dir=str(out))
    assert (conn.address, conn.insecure, conn.root_certificates) == ("link.example.org:9443", False,
                                                                     str(out / CA_CERT))


def _join_args(tmp_path: Path, **kw: object) -> Namespace:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    base = dict(kit=None, auth_key=None, superlink=None, data=str(site), name=None, state_dir=str(tmp_path / "st"),
                root_certificates=None, insecure=False)
    return Namespace(**{**base, **kw})


def test_join_needs_tls_and_a_key_and_keeps_the_kits_name(tmp_path: Path) -> None:
    from fl_client.join_plan import plan_join
    from fl_client.site_state import SiteStateError

    with pytest.raises(ConfigError, match="connects with TLS"):
        plan_join(_join_args(tmp_path, superlink="127.0.0.1:9093"))
    with pytest.raises(ConfigError, match="not loopback"):
        plan_join(_join_args(tmp_path, superlink="10.0.0.1:9093", insecure=True))
    out = tmp_path / "prov"
    provision(consortium(["site-a"]), out)
    kit = str(out / "kits" / "site-a")
    with pytest.raises(ConfigError, match="--key FILE is required"):
        plan_join(_join_args(tmp_path, kit=kit))
    private, _ = make_site_key()
    key = tmp_path / "site.key"
    key.write_bytes(private)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="differs from the kit's site"):
        plan_join(_join_args(tmp_path, kit=kit, auth_key=str(key), name="site-b"))
    plan = plan_join(_join_args(tmp_path, kit=kit, auth_key=str(key)))
    assert (plan.name, plan.superlink, plan.root_certificates) == ("site-a", "127.0.0.1:9093",
                                                                    str(out / "kits" / "site-a" / "ca.crt"))
    with pytest.raises(SiteStateError, match="inside the site data folder"):
        plan_join(_join_args(tmp_path, kit=kit, auth_key=str(key), state_dir=str(tmp_path / "site" / "state")))
    with pytest.raises(ConfigError, match="not an unencrypted OpenSSH private key"):
        plan_join(_join_args(tmp_path, kit=kit, auth_key=str(out / "kits" / "site-a" / "ca.crt")))


class _TLSServer:
    """A TLS (or plain) TCP listener on loopback that completes handshakes, for the transport probe."""

    def __init__(self, cert: Path | None, key: Path | None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.ctx = None
        if cert:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(str(cert), str(key))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                if self.ctx:
                    with self.ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    conn.close()
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self.sock.close()


def test_transport_mismatch_is_named_before_the_supernode_starts(tmp_path: Path) -> None:
    from shared_model.protocol.connection_check import probe_superlink

    out = tmp_path / "prov"
    provision(consortium(["site-a"]), out)
    other = tmp_path / "other"
    provision(consortium(["site-a"]), other)
    tls, plain = _TLSServer(out / SERVER_CERT, out / SERVER_KEY), _TLSServer(None, None)
    try:
        assert probe_superlink(f"127.0.0.1:{tls.port}", ca_file=out / CA_CERT).kind == "ok"
        insecure = probe_superlink(f"127.0.0.1:{tls.port}", ca_file=None)
        assert insecure.kind == "server-uses-tls" and "uses TLS" in insecure.message
        wrong_ca = probe_superlink(f"127.0.0.1:{tls.port}", ca_file=other / CA_CERT)
        assert wrong_ca.kind == "untrusted-certificate" and "does not vouch for" in wrong_ca.message
        expects_tls = probe_superlink(f"127.0.0.1:{plain.port}", ca_file=out / CA_CERT)
        assert expects_tls.kind == "server-is-plain" and "does not speak TLS" in expects_tls.message
        assert probe_superlink(f"127.0.0.1:{plain.port}", ca_file=None).kind == "ok"
        down = probe_superlink(f"127.0.0.1:{free_port()}", ca_file=out / CA_CERT)
        assert down.ok and down.kind == "down"
    finally:
        tls.close()
        plain.close()


# ---- site names -------------------------------------------------------------------------------------------
def test_a_node_cannot_take_another_sites_name() -> None:
    from fl_server.site_identity import SiteRoster

    roster = SiteRoster()
    roster.note_registered([Namespace(node_id=1, name="site-a"), Namespace(node_id=2, name="site-h")])
    assert roster.admit(1, "site-a", [1, 2]) is None
    reason = roster.admit(2, "site-a", [1, 2])
    assert reason and "registered as 'site-h' but claims to be 'site-a'" in reason
    assert roster.accepted([1, 2]) == [1]
    # Without node authentication (loopback development): the second node with a connected site's name.
    dev = SiteRoster()
    assert dev.admit(10, "site-g", [10, 11]) is None
    assert "already holds" in (dev.admit(11, "site-g", [10, 11]) or "")
    # A site that reconnects under a new node id, its old one gone, is the same site.
    assert dev.admit(12, "site-g", [12]) is None


# ---- the app gate and the audit log ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`llnm-server app-hash --json --out`, once per module (Flower walks the whole checkout to build it)."""
    fab = tmp_path_factory.mktemp("fab") / "app.fab"
    done = run_cli(BIN / "llnm-server", "app-hash", "--json", "--out", fab)
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout), "path": fab}


def test_app_hash_is_the_bundle_flwr_run_submits(app_bundle: dict, tmp_path: Path) -> None:
    import zipfile

    fab = app_bundle["path"].read_bytes()
    assert app_bundle["sha256"] == hashlib.sha256(fab).hexdigest()
    assert app_bundle["bytes"] == len(fab) < 10 * 1024 * 1024  # Flower's FAB size limit
    with zipfile.ZipFile(app_bundle["path"]) as z:
        names = set(z.namelist())
    # What `flwr run` installs at a site: the app's code and pyproject, never data or weights.
    assert {"pyproject.toml", "fl_client/client_app.py", "fl_client/app_gate.py"} <= names
    assert not any(n.endswith((".pt", ".pth", ".safetensors", ".dcm", ".npz")) for n in names)
    approved = run_cli(BIN / "llnm-site", "approve", app_bundle["path"], "--state-dir", tmp_path / "st")
    assert approved.returncode == 0 and app_bundle["sha256"] in approved.stdout
    listed = run_cli(BIN / "llnm-site", "approve", "--list", "--json", "--state-dir", tmp_path / "st")
    assert app_bundle["sha256"] in json.loads(listed.stdout)["apps"]
    bad = run_cli(BIN / "llnm-site", "approve", "abc", "--state-dir", tmp_path / "st")
    assert bad.returncode == 2 and "neither a 64-hex-digit SHA-256" in bad.stderr


def test_the_bundle_is_built_as_flower_builds_it(app_bundle: dict) -> None:
    """Flower's own builder (which `flwr run` calls) gives the same bytes in another process (fixed file times):
    the hash a site approves is the hash of what `flwr run` submits."""
    from flwr.cli.build import build_fab_from_disk

    assert hashlib.sha256(build_fab_from_disk(ROOT)).hexdigest() == app_bundle["sha256"]


def test_the_gate_refuses_unapproved_apps_and_audits_what_leaves(tmp_path: Path) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fl_client.app_gate as gate_mod
    from fl_client.site_state import approve, audit_path, read_audit

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 7, 9
    fab = b"not really a zip, but hashed all the same"
    digest = hashlib.sha256(fab).hexdigest()
    gate = gate_mod.AppGate(tmp_path, "site-a")
    incoming = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), dst_node_id=7,
                       message_type="train")
    gate.received(incoming, None, Namespace(hash_str=digest))
    with pytest.raises(gate_mod.AppNotApproved, match=f"site policy: site-a runs only apps it approved; app {digest}"
                       ) as refused:
        gate.check(fab)
    # What the coordinator reads names no local path; the audit entry keeps it.
    assert str(tmp_path) not in str(refused.value) and "approved-apps.json" not in str(refused.value)
    assert str(tmp_path) in next(e for _, e, _ in read_audit(audit_path(tmp_path, "site-a"))
                                 if e and e["event"] == "refused-app")["approvals"]
    approve(tmp_path, digest, source="test")
    gate.check(fab)
    import torch

    reply = Message(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3, 4)}),
                                "metrics": MetricRecord({"num-examples": 30, "dp-epsilon": 1.5})}),
                    reply_to=incoming)
    gate.sent(reply)
    with pytest.raises(gate_mod.AppNotApproved, match="differs from the hash the run announced"):
        gate.check(fab + b"!")
    entries = [e for _, e, _ in read_audit(audit_path(tmp_path, "site-a"))]
    assert [e["event"] for e in entries] == ["received", "refused-app", "sent", "refused-app"]
    sent = entries[2]
    assert (sent["run_id"], sent["round"], sent["message_type"], sent["app_hash"]) == (5, 3, "train", digest)
    assert sent["parameters"] == 12 and sent["array_bytes"] >= 48
    assert sent["metric_names"] == ["dp-epsilon", "num-examples"] and sent["privacy"] == {"dp-epsilon": 1.5}


def test_the_audit_groups_by_experiment_and_counts_each_refusal_once(tmp_path: Path) -> None:
    """An experiment stopped and resumed is several Flower runs: the audit lists it once, by the coordinator's
    experiment name. A refused app is one refusal (its error reply is not a second one, nor a reply "sent")."""
    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fl_client.app_gate as gate_mod
    from fl_client.cmd_audit import summarise
    from fl_client.site_state import approve, audit_path
    from shared_model import protocol

    fab = b"an app bundle"
    digest = hashlib.sha256(fab).hexdigest()

    def message(flower_run: int, experiment: str, rnd: int) -> Message:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = flower_run, 7, rnd
        return Message(RecordDict({"config": ConfigRecord({protocol.SERVER_ROUND: rnd, protocol.RUN_ID: experiment})}),
                       dst_node_id=7, message_type="train")

    def gate_for(msg: Message) -> gate_mod.AppGate:
        gate = gate_mod.AppGate(tmp_path, "site-a")
        gate.received(msg, None, Namespace(hash_str=digest))
        return gate

    first = message(5, "exp-1", 1)  # not approved yet: refused by the gate
    gate = gate_for(first)
    with pytest.raises(gate_mod.AppNotApproved) as err:
        gate.check(fab)
    gate.sent(Message(Error(code=2, reason=str(err.value)), reply_to=first))
    approve(tmp_path, digest, source="test")
    resumed = message(6, "exp-1", 1)  # the coordinator resumes: a new Flower run of the same experiment
    gate = gate_for(resumed)
    gate.check(fab)
    gate.sent(Message(RecordDict({"metrics": MetricRecord({"num-examples": 30})}), reply_to=resumed))
    other = message(7, "exp-2", 1)  # the ClientApp refuses under the site's policy
    gate = gate_for(other)
    gate.check(fab)
    gate.sent(Message(Error(code=2, reason="site policy: site 'site-a' refuses round 1 training: ..."),
                      reply_to=other))
    summary = summarise(audit_path(tmp_path, "site-a"))
    runs = {r["experiment"]: r for r in summary["runs"]}
    assert set(runs) == {"exp-1", "exp-2"}
    assert runs["exp-1"]["flower_runs"] == [5, 6] and runs["exp-1"]["sent"] == {"train": 1}
    assert [r["by"] for r in runs["exp-1"]["refusals"]] == ["app gate"]
    assert runs["exp-2"]["sent"] == {} and [r["by"] for r in runs["exp-2"]["refusals"]] == ["ClientApp"]
    printed = subprocess.run([str(BIN / "llnm-site"), "audit", "--state-dir", str(tmp_path)], capture_output=True,
                             text=True, timeout=120)
    assert printed.returncode == 0 and "experiment exp-1  Flower run(s) 5, 6" in printed.stdout, printed.stdout
    assert printed.stdout.count("REFUSED") == 2


def test_the_gate_logs_its_refusal_as_a_refusal_not_a_crash(tmp_path: Path) -> None:
    """Flower logs every exception of a ClientApp process with a traceback and ends it with exit code 800; the
    gate's own refusal is logged in one line and ends the process normally (the refusal reply is still sent)."""
    import fl_client.app_gate as gate_mod

    calls: list[tuple] = []
    fake = Namespace(__name__="fake", pull_task_input=print, install_from_fab=print, push_message=print,
                     log=lambda *a, **k: calls.append(("log", a, k)),
                     flwr_exit=lambda *a, **k: calls.append(("exit", a, k)))
    gate = gate_mod.AppGate(tmp_path, "site-a")
    gate_mod.install(gate, fake)
    fake.log(40, "%s raised an exception", "ClientApp", exc_info=ValueError("a real crash"))
    assert calls[-1][1][1] == "%s raised an exception"  # a crash stays a crash
    gate.refused = "site policy: site-a runs only apps it approved; app abc is not approved"
    fake.log(40, "%s raised an exception", "ClientApp", exc_info=gate_mod.AppNotApproved(gate.refused))
    kind, args, kwargs = calls[-1]
    assert args[0] == 30 and args[1] == "refused: %s" and "exc_info" not in kwargs  # one warning line
    fake.flwr_exit(code=800, event_type=None)
    kind, args, kwargs = calls[-1]
    assert kind == "exit" and args[0] == 0 and "refused" in kwargs["message"]


def test_the_audit_reads_secure_aggregation_messages() -> None:
    """A SecAgg+ stage message carries its round as group id (the FitIns config in a record of its own) and its
    reply the masked update as config-record bytes: the audit counts them, and finds the privacy figures in the
    FitRes's config record."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_client.app_gate import _round_of, describe_reply
    from shared_model import protocol

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 7, 9
    stage = Message(RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}), dst_node_id=7,
                    message_type="train", group_id="2")
    assert _round_of(stage) == 2
    fitins = Message(RecordDict({"fitins.config": ConfigRecord({protocol.SERVER_ROUND: 3})}), dst_node_id=7,
                     message_type="train", group_id="3")
    assert _round_of(fitins) == 3
    reply = Message(RecordDict({"fitres.metrics": ConfigRecord({"dp-epsilon": 0.5, "site-name": "site-a"}),
                                "secaggplus_configs": ConfigRecord({"masked_params": [b"\x00" * 800]})}),
                    reply_to=fitins)
    sent = describe_reply(reply)
    assert sent["parameters"] == 0 and sent["array_bytes"] == 0 and sent["config_bytes"] >= 800
    assert sent["privacy"] == {"dp-epsilon": 0.5}


def test_the_gate_wraps_flowers_clientapp_steps_and_fails_closed() -> None:
    import flwr.supernode.runtime.run_clientapp as runtime

    from fl_client.app_gate import WRAPPED, AppGate, install

    assert all(callable(getattr(runtime, name)) for name in WRAPPED), "Flower moved a step the gate wraps"
    with pytest.raises(SystemExit, match="fails closed"):
        install(AppGate(Path("/nonexistent"), "s"), Namespace(__name__="fake", pull_task_input=print))


# ---- a real consortium on loopback -------------------------------------------------------------------------
LATE = "site-g"     # joins without having approved the app; approves it once refused
SPOOFER = "site-h"  # a registered hospital whose SuperNode claims to be site-a
REVOKED = "site-i"  # registered, then revoked before it joins


class SecureConsortium:
    def __init__(self, tmp: Path, sites: list[Path]) -> None:
        self.tmp, self.sites = tmp, sorted(sites)
        self.port = free_port()
        self.prov, self.keys, self.states = tmp / "prov", tmp / "keys", tmp / "state"
        self.procs: dict[str, subprocess.Popen] = {}

    def cli(self, *args: object) -> subprocess.CompletedProcess:
        done = run_cli(*args)
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done

    def setup(self, app_hash: str) -> None:
        names = [s.name for s in self.sites] + [SPOOFER, REVOKED]
        cfg = self.tmp / "consortium.yaml"
        cfg.write_text(yaml.safe_dump({"name": "loopback", "superlink": {"address": f"127.0.0.1:{self.port}"},
                                       "sites": names}))
        self.cli(BIN / "llnm-server", "provision", "--config", cfg, "--out", self.prov)
        self.procs["superlink"] = start([str(BIN / "llnm-server"), "start", "--provision", str(self.prov), "--host",
                                         "127.0.0.1"], self.tmp / "superlink.log")
        wait_for_port(self.port)
        self.app_hash = app_hash

        def onboard(name: str) -> None:
            self.cli(BIN / "llnm-site", "keygen", "--out", self.keys, "--name", name)
            self.cli(BIN / "llnm-server", "register-site", "--provision", self.prov, "--name", name, "--public-key",
                     self.keys / f"{name}.pub")
            if name != LATE:
                self.cli(BIN / "llnm-site", "approve", self.app_hash, "--state-dir", self.states / name)

        # The hospitals onboard independently, several at once (registry.json is updated under a lock).
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(onboard, names))
        self.cli(BIN / "llnm-server", "revoke-site", REVOKED, "--provision", self.prov)

    def join(self, label: str, *args: object, log: str | None = None) -> subprocess.Popen:
        proc = start([str(BIN / "llnm-site"), "join", *map(str, args), "--clientappio-port", str(free_port()),
                      "--threads", "1", "--cache-dir", os.environ["LLNM_CACHE_DIR"]],
                     self.tmp / f"{log or label}.log")
        self.procs[label] = proc
        return proc

    def join_site(self, site: Path) -> None:
        self.join(site.name, "--kit", self.prov / "kits" / site.name, "--key", self.keys / f"{site.name}.key",
                  "--data", site, "--state-dir", self.states / site.name, "--keep-sent")

    def activations(self) -> int:
        return (self.tmp / "superlink.log").read_text().count("Activated node_id")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for name, proc in self.procs.items():
            if name != "superlink":
                stop(proc)
        stop(self.procs["superlink"])


def _wait(condition, what: str, dep: SecureConsortium, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{dep.logs()}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory, small_consortium: Path, app_bundle: dict) -> dict:
    tmp = tmp_path_factory.mktemp("secure")
    # Four of the consortium's sites, the late one among them: every SuperNode is a handful of processes per
    # round on two cores, and four (with the spoofer, the revoked and the unregistered key) exercise everything
    # seven did.
    sites = [small_consortium / n for n in ("site-a", "site-b", "site-c", LATE)]
    # Plain FedAvg rounds: secure aggregation over real SuperNodes would add a minute (four ClientApp processes
    # per site per round); it is benchmarks/bench_deployment.py's, and tests/test_secure_aggregation.py's in
    # Flower's simulation engine.
    # eval_every 2: round 1 trains only (each evaluation is one more ClientApp process per site).
    config = write_config(tmp, federation={"rounds": 2, "min_sites": 3, "round_timeout_s": 300,
                                           "eval_bootstrap": 50, "final_eval_split": None, "eval_every": 2})
    prebuild_caches(sites, config)
    dep = SecureConsortium(tmp, sites)
    out = tmp / "run"
    intruders: dict[str, subprocess.CompletedProcess] = {}
    try:
        dep.setup(app_bundle["sha256"])
        for site in dep.sites:
            dep.join_site(site)
        # A registered hospital (its own key) whose SuperNode says it is site-a, on a copy of site-a's folder.
        copy = tmp / "copy"
        copy.mkdir()
        (copy / "site-a").symlink_to(small_consortium / "site-a")
        dep.cli(BIN / "llnm-site", "approve", dep.app_hash, "--state-dir", dep.states / SPOOFER)
        dep.join(SPOOFER, "--superlink", f"127.0.0.1:{dep.port}", "--root-certificates",
                 dep.prov / "kits" / SPOOFER / "ca.crt", "--key", dep.keys / f"{SPOOFER}.key", "--name", "site-a",
                 "--data", copy / "site-a", "--state-dir", dep.states / SPOOFER)
        _wait(lambda: dep.activations() >= len(sites) + 1, "every SuperNode to connect", dep, 240)
        run = start([str(BIN / "llnm-server"), "run", "--config", str(config), "--out", str(out), "--provision",
                     str(dep.prov)], tmp / "run.log")
        dep.procs["run"] = run
        late_log = dep.states / LATE / "audit" / f"{LATE}.jsonl"
        _wait(lambda: late_log.is_file() and "refused-app" in late_log.read_text(), f"{LATE}'s refusal", dep)
        dep.cli(BIN / "llnm-site", "approve", dep.app_hash, "--state-dir", dep.states / LATE)
        # Intruders, while the run goes on.
        rogue = dep.keys / "rogue"
        dep.cli(BIN / "llnm-site", "keygen", "--out", rogue, "--name", "rogue")
        intruders["unregistered"] = run_cli(
            BIN / "llnm-site", "join", "--kit", dep.prov / "kits" / "site-a", "--key", rogue / "rogue.key",
            "--data", small_consortium / "site-a", "--state-dir", tmp / "rogue-state", "--clientappio-port",
            free_port(), timeout=180)
        intruders["revoked"] = run_cli(
            BIN / "llnm-site", "join", "--kit", dep.prov / "kits" / REVOKED, "--key", dep.keys / f"{REVOKED}.key",
            "--data", small_consortium / "site-b", "--state-dir", dep.states / REVOKED, "--clientappio-port",
            free_port(), timeout=180)
        intruders["plain-http"] = run_cli(
            BIN / "llnm-site", "join", "--superlink", f"127.0.0.1:{dep.port}", "--insecure", "--data",
            small_consortium / "site-c", "--state-dir", tmp / "plain-state", timeout=60)
        rc = run.wait(timeout=1200)
        assert rc == 0, dep.logs()
        # The coordinator's view of who is connected, while every SuperNode is still up.
        consortium = run_cli(BIN / "llnm-server", "status", "--provision", dep.prov, "--json")
        audits = {s.name: json.loads(run_cli(BIN / "llnm-site", "audit", "--json", "--state-dir",
                                             dep.states / s.name).stdout) for s in dep.sites}
        # One scan per site, two at a time (each decodes its site's images again).
        with ThreadPoolExecutor(max_workers=2) as pool:
            scans = dict(zip([s.name for s in dep.sites], pool.map(
                lambda s: run_cli(BIN / "llnm-site", "audit", "--scan-sent", "--json", "--data", s, "--state-dir",
                                  dep.states / s.name, "--cache-dir", os.environ["LLNM_CACHE_DIR"]), dep.sites),
                             strict=True))
    finally:
        dep.close()
    return {"out": out, "names": {s.name for s in dep.sites}, "intruders": intruders, "audits": audits,
            "scans": scans, "sites": dep.sites, "experiment": json.loads((out / "run.json").read_text())["run_uid"],
            "app_sha256": app_bundle["sha256"], "late_log": (tmp / f"{LATE}.log").read_text(),
            "states": dep.states, "logs": dep.logs(), "consortium": consortium}


@pytest.mark.slow
def test_provisioned_sites_train_over_tls_with_registered_keys(secure_run: dict) -> None:
    out = secure_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    first, second = metrics["rounds"]
    on_time = secure_run["names"] - {LATE}
    assert on_time <= set(first["participants"]), first["failures"]
    assert first["sites"] == {} and first["pooled"] == {}  # federation.eval_every: 2
    # The site that approved the app once refused takes part from then on.
    assert LATE in second["participants"], second["failures"]
    assert_round_metrics(second, secure_run["names"])
    assert set(second["participants"]) == secure_run["names"] and second["failures"] == []
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["mode"] == "deployment" and run_info["insecure"] is False
    # What was submitted is exactly what the sites approved.
    assert run_info["app_sha256"] == secure_run["app_sha256"]


@pytest.mark.slow
def test_intruders_are_refused_and_never_merged(secure_run: dict) -> None:
    out, intruders = secure_run["out"], secure_run["intruders"]
    unregistered = intruders["unregistered"]
    assert unregistered.returncode != 0 and "not registered there, or was revoked" in unregistered.stderr
    revoked = intruders["revoked"]
    assert revoked.returncode != 0 and "not registered there, or was revoked" in revoked.stderr
    plain = intruders["plain-http"]
    assert plain.returncode == 2 and "uses TLS, but plain HTTP (--insecure) was asked for" in plain.stderr
    assert "join with the consortium's kit" in plain.stderr
    run_info = json.loads((out / "run.json").read_text())
    [spoof] = run_info["rejected_nodes"]
    assert (spoof["registered"], spoof["claimed"]) == (SPOOFER, "site-a")
    metrics = json.loads((out / "metrics.json").read_text())
    for entry in [r for r in metrics["rounds"] if r["sites"]]:
        assert SPOOFER not in entry["sites"]
        # site-a counted once: the pooled metrics merge exactly the per-site histograms.
        assert entry["pooled"]["n_sites"] == len(entry["sites"])
    assert "refused node" in (out / "log.txt").read_text()
    status = run_cli(BIN / "llnm-server", "status", out)
    assert "refused node: node" in status.stdout and "app: " in status.stdout
    # The SuperLink's refusals of the unregistered and the revoked key are in the run's records and in status.
    refused = {(r["site"], r["revoked"]) for r in run_info["refused_connections"]}
    assert refused == {(None, False), (REVOKED, True)}, run_info["refused_connections"]
    assert "refused connection: an unregistered key (SHA256:" in status.stdout
    assert f"refused connection: the revoked key of {REVOKED}" in status.stdout


def test_the_consortium_status_says_when_the_superlink_is_down_and_who_is_not_registered(tmp_path: Path) -> None:
    cfg = tmp_path / "consortium.yaml"
    cfg.write_text(yaml.safe_dump(consortium(["site-a", "site-b"], address=f"127.0.0.1:{free_port()}").model_dump()))
    assert run_cli(BIN / "llnm-server", "provision", "--config", cfg, "--out", tmp_path / "prov").returncode == 0
    done = run_cli(BIN / "llnm-server", "status", "--provision", tmp_path / "prov")
    assert done.returncode == 0, done.stderr
    assert "2 site(s), 0 registered\n" in done.stdout and "is `llnm-server start` running?" in done.stdout
    assert done.stdout.count("not registered: waiting for its public key") == 2
    neither = run_cli(BIN / "llnm-server", "status")
    assert neither.returncode == 2 and "give a run directory" in neither.stderr


@pytest.mark.slow
def test_the_coordinator_sees_which_sites_are_registered_and_connected(secure_run: dict) -> None:
    """`llnm-server status --provision DIR` asks the SuperLink which registered nodes are online and names them:
    the joined sites online, the revoked one revoked, and the refused connections listed."""
    from fl_server.consortium_status import consortium_lines

    answer = secure_run["consortium"]
    assert answer.returncode == 0, answer.stderr
    status = json.loads(answer.stdout)
    text = "\n".join(consortium_lines(status))
    assert status["superlink_error"] is None
    for name in secure_run["names"]:
        assert status["sites"][name]["registered"], status["sites"][name]
        assert status["sites"][name]["connection"].startswith("online since"), status["sites"][name]
    assert status["sites"][REVOKED]["connection"].startswith("revoked")
    assert {r["site"] for r in status["refused_connections"]} == {None, REVOKED}
    online = len(secure_run["names"]) + 1  # and the spoofer, online under its own registered key
    assert f"{len(status['sites'])} site(s), {len(status['sites']) - 1} registered, {online} online" in text
    assert f"refused connection: the revoked key of {REVOKED}" in text


# A line of flower-superlink 1.42's log for a SuperNode whose key is not registered (copied from a real run).
REFUSED_LINE = (
    "\x1b[91mERROR \x1b[0m:     [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with "
    "public key: b'-----BEGIN PUBLIC KEY-----\\n{body}\\n-----END PUBLIC KEY-----\\n', exception: No SuperNode "
    "found with the given public key.")


def test_the_superlinks_refusals_are_recorded_with_the_site_they_belonged_to(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from fl_server.site_registry import SiteRegistry
    from fl_server.superlink_events import RefusalWatch, read_refusals, refusal_lines, summarise_refusals
    from shared_model.protocol.site_kit import make_site_key, public_key_fingerprint

    def pem_body(openssh: bytes) -> str:
        key = serialization.load_ssh_public_key(openssh)
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return "\\n".join(pem.strip().splitlines()[1:-1])

    (_, revoked_pub), (_, stranger_pub) = make_site_key(), make_site_key()
    registry = SiteRegistry(tmp_path)
    registry.sites["site-x"] = {"public_key": revoked_pub.decode(), "fingerprint": public_key_fingerprint(revoked_pub),
                                "revoked_at": "2026-01-01T00:00:00+00:00"}
    registry.save()
    watch = RefusalWatch(tmp_path)
    for line in ("INFO :      [Fleet.ActivateNode] Activated node_id=1",
                 REFUSED_LINE.format(body=pem_body(stranger_pub)), REFUSED_LINE.format(body=pem_body(revoked_pub)),
                 REFUSED_LINE.format(body=pem_body(stranger_pub))):
        watch(line)
    events = read_refusals(tmp_path)
    assert [e["site"] for e in events] == [None, "site-x", None]
    summary = summarise_refusals(events)
    assert [(s["site"], s["revoked"], s["attempts"]) for s in summary] == [(None, False, 2), ("site-x", True, 1)]
    assert summary[0]["key"] == public_key_fingerprint(stranger_pub)
    lines = refusal_lines(summary)
    assert lines[0].startswith("refused connection: an unregistered key (SHA256:") and "tried 2 times" in lines[0]
    assert lines[1].startswith("refused connection: the revoked key of site-x")
    assert read_refusals(tmp_path, since="2999-01-01") == []


@pytest.mark.slow
def test_the_audit_log_lists_the_refusal_then_what_was_sent(secure_run: dict) -> None:
    late = secure_run["audits"][LATE]
    [run] = late["runs"]  # one experiment, every message of it (queries included) filed under its name
    assert run["experiment"] == secure_run["experiment"]
    assert any(r["reason"].startswith(f"site policy: {LATE} runs only apps it approved") for r in run["refusals"])
    assert late["refused_apps"] and run["sent"].get("train", 0) >= 1
    # At the site, the gate's refusal is a one-line refusal, not Flower's crash report.
    log = secure_run["late_log"]
    assert "refused: site policy" in log and "Exit Code: 800" not in log and "raised an exception" not in log
    # At the coordinator, the refusal names no folder of the site's.
    recorded = (secure_run["out"] / "run.json").read_text() + (secure_run["out"] / "log.txt").read_text()
    assert str(secure_run["states"]) not in recorded and "approved-apps.json" not in recorded
    site_a = secure_run["audits"]["site-a"]["runs"][0]
    assert site_a["sent"]["train"] == 2 and site_a["rounds"] == [1, 2]
    assert site_a["parameters_sent"] > 0 and site_a["bytes_sent"] > 0
    assert {"auc", "num-examples", "hist-pos-counts"} <= set(site_a["metric_names"])
    # No DP-SGD here; the evaluation replies are DP by the site's default policy, and the audit shows their epsilon.
    assert site_a["refusals"] == [] and site_a["privacy"] == {"eval-dp-epsilon": 1.0, "eval-dp-delta": 1e-5}
    lines = (secure_run["states"] / "site-a" / "audit" / "site-a.jsonl").read_text().splitlines()
    times = [json.loads(line)["time"] for line in lines]
    assert times == sorted(times)


@pytest.mark.slow
def test_nothing_of_a_patient_is_in_what_the_sites_sent(secure_run: dict) -> None:
    """Every reply each site sent (kept by its gate exactly as pushed, `join --keep-sent`) is scanned for the
    site's patient ids, report text, decoded pixels and cached preprocessed tensors: nothing is found, and the
    replies of sites of different sizes have the same structure and (train) the same size."""
    scans = {name: json.loads(done.stdout) for name, done in secure_run["scans"].items()}
    for name, done in secure_run["scans"].items():
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        scan = scans[name]
        run = secure_run["audits"][name]["runs"][-1]
        sent = sum(run["sent"].values()) + len(run["refusals"])  # every reply pushed, refusals included
        assert scan["kept_messages"] == sent >= 2 and scan["findings"] == [], scan["findings"]
        assert scan["patient_ids"] > 0 and scan["needles"] > 10 * scan["patient_ids"]
    patients = {name: scan["patient_ids"] for name, scan in scans.items()}
    assert max(patients.values()) >= 1.3 * min(patients.values()), patients  # sizes that differ
    for kind in ("train", "evaluate"):
        replies = [m for scan in scans.values() for m in scan["messages"] if m["kind"] == kind]
        assert len({json.dumps(m["signature"], sort_keys=True) for m in replies}) == 1, kind
        if kind == "train":
            sizes = [m["bytes"] for m in replies]
            assert max(sizes) - min(sizes) <= 256, sizes  # the site's name and figures, not its patients


def test_the_scan_finds_a_patient_in_a_kept_reply(tmp_path: Path, small_consortium: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan is not blind: replies that carry an id, a report sentence, a pixel window or a cached tensor
    window are each found, by offset, without printing the value."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from processes import first_patients

    from fl_client.sent_messages import find_needles, keep_sent, scan_sent, site_needles

    for attr in ("_task_id", "_run_id", "_node_id"):  # messages outside a Flower process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    site = first_patients(small_consortium / "site-b", tmp_path / "site-b", 4)
    ids, needles = site_needles(site, tmp_path / "no-cache")
    kinds = {n.what.split(" of ")[0] for n in needles}
    assert {"report text", "pixels"} <= kinds, kinds
    report = next(n for n in needles if n.what.startswith("report text"))
    pixels = next(n for n in needles if n.what.startswith("pixels"))
    root = tmp_path / "state"
    ask = Message(RecordDict({}), dst_node_id=1, message_type="train")
    leaky = [
        ConfigRecord({"note": f"patient {ids[0]} was odd"}),
        ConfigRecord({"text": report.data.decode()}),
        ArrayRecord({"w": torch.frombuffer(bytearray(b"\x01" * 3 + pixels.data + b"\x02" * 5), dtype=torch.uint8)}),
    ]
    for i, record in enumerate(leaky):
        key = "arrays" if isinstance(record, ArrayRecord) else "site"
        reply = Message(RecordDict({key: record, "m": MetricRecord({"n": 1})}), reply_to=ask)
        keep_sent(root, "site-b", {"run_id": 1, "message_type": "train", "round": i}, reply)
    scan = scan_sent(root, "site-b", site, tmp_path / "no-cache")
    found = " | ".join(f["what"] for f in scan["findings"])
    assert scan["kept_messages"] == 3
    assert f"patient id {ids[0]} in a string" in found and "report text of patient" in found
    assert "pixels of patient" in found and report.data.decode() not in found
    assert find_needles(b"x" * 100 + pixels.data, [pixels]) == [(100, pixels)]
