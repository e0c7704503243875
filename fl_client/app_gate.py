"""The site's gate around every ClientApp process: approve the code, record what leaves.

Flower's SuperNode starts one `flwr-clientapp` process per message; that process pulls the message and the
app bundle (FAB) from the SuperNode, installs the FAB and runs the coordinator's ClientApp from it. A check
inside the ClientApp would run the coordinator's code to decide whether to run the coordinator's code, so
the gate sits in front of it, in code the hospital installed itself: `llnm-site join` puts a
`flwr-clientapp` launcher first on the SuperNode's PATH, which runs Flower's own `flwr-clientapp` with
three of its steps wrapped:

* after the message is pulled: an audit entry `received` (run, app hash, message kind, round);
* before the FAB is installed: its SHA-256 must be in the site's `approved-apps.json`, else the process
  answers with an error `site policy: ... app <hash> is not approved ...` and nothing of the app runs
  (audit entry `refused-app`). The site's log shows it as a refusal, not as a crash, and the text sent to the
  coordinator names no local path (the audit entry keeps the path);
* before the reply is pushed: an audit entry `sent` with what the reply carries (parameter count and
  bytes, metric names, the privacy spent it reports, or the error it carries; `refused` for a ClientApp's
  refusal, `refusal-sent` for the reply that carries the gate's own refusal), and with `--keep-sent` a copy
  of the reply exactly as it is pushed (`fl_client.sent_messages`).

Each entry names the coordinator's experiment (the round config's `run-id`) beside Flower's run id, so that
`llnm-site audit` groups a run that was stopped and resumed (several Flower runs) under its experiment.

If Flower's internals this relies on are missing (another Flower version), the gate refuses every message:
it fails closed, never open.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl_client.sent_messages import keep_sent, keep_sent_enabled
from fl_client.site_state import (
    ENV_SITE_NAME,
    SiteStateError,
    append_audit,
    approvals_path,
    audit_path,
    load_approvals,
    state_root,
)
from shared_model import protocol

WRAPPED = ("pull_task_input", "install_from_fab", "push_message", "log", "flwr_exit")
PRIVACY_METRICS = (protocol.DP_EPSILON, protocol.DP_DELTA, protocol.EVAL_DP_EPSILON, protocol.EVAL_DP_DELTA)


class AppNotApproved(RuntimeError):
    """The FAB's hash is not on the site's allow-list."""


def _round_of(message: Any) -> int | None:
    """The round a message belongs to: its round config's `server-round` (in a SecAgg+ FitIns that config is a
    record of its own), else the group id Flower's workflows set to the round."""
    try:
        for record in message.content.config_records.values():
            if protocol.SERVER_ROUND in record:
                return int(record[protocol.SERVER_ROUND])
        group = str(message.metadata.group_id or "")
        return int(group) if group.isdigit() else None
    except (AttributeError, TypeError, ValueError):
        return None


def _experiment_of(message: Any) -> str | None:
    """The coordinator's experiment name a message carries (its round config's `run-id`), if any."""
    try:
        for record in message.content.config_records.values():
            if protocol.RUN_ID in record:
                return str(record[protocol.RUN_ID])
    except (AttributeError, TypeError):
        return None
    return None


def describe_reply(reply: Any) -> dict[str, Any]:
    """What a reply carries, for the audit log: never the values of parameters or metrics other than privacy."""
    if reply.has_error():
        reason = str(reply.error.reason)
        policy = protocol.POLICY_REFUSAL_MARKER in reason or protocol.REFUSAL_MARKER in reason
        return {"error": reason[-2000:], "refusal": policy}
    content = reply.content
    params = 0
    arrays_bytes = 0
    tensors = 0
    for record in content.array_records.values():
        arrays_bytes += int(record.count_bytes())
        for array in record.values():
            tensors += 1
            params += math.prod(int(d) for d in array.shape)
    metric_names: list[str] = []
    privacy: dict[str, float] = {}
    for record in content.metric_records.values():
        for key, value in record.items():
            metric_names.append(key)
            if key in PRIVACY_METRICS and isinstance(value, (int, float)):
                privacy[key] = float(value)
    # Under secure aggregation the train metrics travel in the FitRes's config record.
    for record in content.config_records.values():
        for key in PRIVACY_METRICS:
            if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool):
                privacy[key] = float(record[key])
    config_keys = sorted(k for record in content.config_records.values() for k in record)
    # Config records carry bytes too: under secure aggregation the masked update travels there.
    config_bytes = sum(_payload_size(v) for record in content.config_records.values() for v in record.values())
    return {"tensors": tensors, "parameters": params, "array_bytes": arrays_bytes, "config_bytes": config_bytes,
            "metric_names": sorted(metric_names), "config_keys": config_keys, "privacy": privacy}


def _payload_size(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_payload_size(v) for v in value)
    return 8


class AppGate:
    """The allow-list check and the audit entries of one ClientApp process."""

    def __init__(self, root: Path, site: str) -> None:
        self.root = root
        self.site = site
        self.log = audit_path(root, site)
        self.context: dict[str, Any] = {}
        self.refused: str | None = None

    def received(self, message: Any, run: Any, fab: Any) -> None:
        self.context = {"run_id": int(message.metadata.run_id), "experiment": _experiment_of(message),
                        "app_hash": str(fab.hash_str), "message_type": str(message.metadata.message_type),
                        "round": _round_of(message)}
        append_audit(self.log, {"event": "received", **self.context,
                                "message_id": str(message.metadata.message_id)})

    def check(self, fab_content: bytes) -> None:
        digest = hashlib.sha256(fab_content).hexdigest()
        if self.context and digest != self.context.get("app_hash"):
            reason = (f"{protocol.POLICY_REFUSAL_MARKER}: {self.site}: the app bundle's SHA-256 {digest} differs "
                      f"from the hash the run announced ({self.context.get('app_hash')})")
            self._refuse(reason, {})
        try:
            approved = load_approvals(self.root)
        except SiteStateError as exc:
            approved, problem = {}, str(exc)
        else:
            problem = ""
        if digest not in approved:
            # What the coordinator reads names no local path; the audit entry keeps the file and the problem.
            reason = (f"{protocol.POLICY_REFUSAL_MARKER}: {self.site} runs only apps it approved; app {digest} is "
                      f"not approved{' (its list of approved apps cannot be read)' if problem else ''}. The site "
                      f"can review it and run `llnm-site approve {digest}`; the coordinator's `llnm-server "
                      "app-hash` prints the hash of the app it submits")
            self._refuse(reason, {"app_hash": digest, "approvals": str(approvals_path(self.root)),
                                  **({"problem": problem} if problem else {})})
        self.refused = None

    def _refuse(self, reason: str, extra: dict[str, Any]) -> None:
        append_audit(self.log, {"event": "refused-app", **self.context, **extra, "reason": reason})
        self.refused = reason
        raise AppNotApproved(reason)

    def sent(self, reply: Any) -> None:
        entry = {"event": "sent", **self.context, **describe_reply(reply)}
        if self.refused is not None:
            entry["event"] = "refusal-sent"  # the reply carrying the gate's refusal, already audited once
        elif entry.get("refusal"):
            entry["event"] = "refused"
        if keep_sent_enabled():
            try:
                entry |= keep_sent(self.root, self.site, self.context, reply)
            except OSError as exc:  # a full disk must not cost the round; the audit says the copy is missing
                entry["kept_error"] = f"{type(exc).__name__}: {exc}"
        append_audit(self.log, entry)


def install(gate: AppGate, module: Any) -> None:
    """Wrap Flower's steps in `module` (flwr.supernode.runtime.run_clientapp) with the gate."""
    missing = [name for name in WRAPPED if not callable(getattr(module, name, None))]
    if missing:
        raise SystemExit(f"llnm-fl app gate: this Flower version lacks {', '.join(missing)} in {module.__name__}; "
                         "refusing to run any app (the gate fails closed). Reinstall llnm-fl's pinned flwr.")
    pull: Callable[..., Any] = module.pull_task_input
    install_fab: Callable[..., Any] = module.install_from_fab
    push: Callable[..., Any] = module.push_message
    flower_log: Callable[..., Any] = module.log
    flower_exit: Callable[..., Any] = module.flwr_exit

    def gated_pull(client: Any) -> Any:
        message, context, run, fab = pull(client)
        gate.received(message, run, fab)
        return message, context, run, fab

    def gated_install(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        gate.check(fab_content)
        return install_fab(fab_content, *args, **kwargs)

    def gated_push(client: Any, reply: Any, context: Any) -> Any:
        gate.sent(reply)
        return push(client, reply, context)

    def gated_log(level: int, msg: str, *args: Any, **kwargs: Any) -> Any:
        # Flower logs every exception of the process as a crash, with a traceback; the gate's refusal is not one.
        if isinstance(kwargs.get("exc_info"), AppNotApproved):
            import logging

            return flower_log(logging.WARNING, "refused: %s", kwargs["exc_info"])
        return flower_log(level, msg, *args, **kwargs)

    def gated_exit(code: int, *args: Any, **kwargs: Any) -> Any:
        if gate.refused is not None:
            from flwr.supercore.exit import ExitCode

            kwargs["message"] = "the app gate refused the message (see the audit log); the refusal was sent"
            return flower_exit(ExitCode.SUCCESS, *args, **kwargs)
        return flower_exit(code, *args, **kwargs)

    module.pull_task_input = gated_pull
    module.install_from_fab = gated_install
    module.push_message = gated_push
    module.log = gated_log
    module.flwr_exit = gated_exit


def main() -> int:
    """Entry point of the site's `flwr-clientapp` launcher (same arguments as Flower's)."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    site = os.environ.get(ENV_SITE_NAME, "") or "site"
    install(AppGate(state_root(), site), runtime)
    flwr_clientapp()
    return 0


LAUNCHER = """#!{python}
# llnm-fl site gate: Flower's flwr-clientapp behind the site's app approval and audit log (fl_client.app_gate).
import sys
from fl_client.app_gate import main
if __name__ == "__main__":
    sys.exit(main())
"""


def write_launcher(folder: Path) -> Path:
    """A `flwr-clientapp` in `folder` that runs the gate with this interpreter; put `folder` first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flwr-clientapp"
    text = LAUNCHER.format(python=sys.executable)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        tmp.replace(path)
    return path
