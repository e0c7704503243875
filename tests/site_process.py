"""A hospital's real ClientApp in a process of its own, answering messages that a test plays as the coordinator.

The attack tests (tests/test_coordinator_attacks.py) act as a coordinator who controls the run configuration and
the ServerApp, and so every message a site receives, but not the site's node config or its approvals. This
module gives them the site as it runs in a deployment: a fresh Python process loads the app the FAB names
(`fl_client.client_app:app`, as Flower's `flwr-clientapp` does), builds each message's `Context` from the
site's node config, calls the app, and writes back the reply exactly as the app returned it (error, metric
and config records, arrays); an exception becomes the error reply and the log entry `flwr-clientapp` makes of
it. The site keeps nothing in memory that matters between messages: its policy is
its node config, and its privacy records are on its disk, where the next process finds them.

Run by `deliver(...)`; as a script: ``python tests/site_process.py WORKDIR`` (WORKDIR holds ``job.json`` and
the message arrays; the replies are written there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP = "fl_client.client_app:app"  # [tool.flwr.app.components] clientapp, what a SuperNode runs


@dataclass
class Reply:
    """One reply as it left the site: an error, or its metric and config records and arrays."""

    error: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    site: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Any] | None = None


@dataclass
class SiteRun:
    """What one site process answered, and what it logged."""

    replies: list[Reply]
    log: str
    seconds: float


def deliver(workdir: Path, node_config: dict[str, Any], messages: list[dict[str, Any]], *,
            timeout: float = 600.0) -> SiteRun:
    """Run one site process that answers `messages` in order.

    Each message is ``{"type": "train" | "evaluate", "config": {...}, "arrays": state_dict}``, optionally with
    its own ``"node_config"`` (another site, or the same site under another policy); `node_config` is the
    site's own otherwise (``data-path`` and its policy). Returns the replies and the process's log.
    """
    import torch
    from safetensors.torch import save_file

    workdir.mkdir(parents=True, exist_ok=True)
    job: dict[str, Any] = {"node_config": node_config, "messages": []}
    for i, message in enumerate(messages):
        arrays = f"message-{i}.safetensors"
        save_file({k: v.detach().contiguous().clone() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
                   for k, v in message["arrays"].items()}, str(workdir / arrays))
        job["messages"].append({"type": message["type"], "config": message["config"], "arrays": arrays,
                                "node_config": message.get("node_config", node_config)})
    (workdir / "job.json").write_text(json.dumps(job))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(workdir)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the site process failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-5000:]}")
    out = json.loads((workdir / "replies.json").read_text())
    replies = []
    for r in out:
        arrays = None
        if r.get("arrays"):
            from safetensors.torch import load_file

            arrays = load_file(str(workdir / r["arrays"]))
        replies.append(Reply(r["error"], r.get("metrics", {}), r.get("site", {}), arrays))
    return SiteRun(replies, done.stdout + done.stderr, seconds)


def _main(workdir: Path) -> int:
    """The site process: load the app as flwr-clientapp does, answer every message, write the replies."""
    import importlib
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file, save_file

    module, attr = APP.split(":")
    app = getattr(importlib.import_module(module), attr)
    job = json.loads((workdir / "job.json").read_text())
    print(f"site process: {len(job['messages'])} message(s)", file=sys.stderr, flush=True)
    replies = []
    for i, spec in enumerate(job["messages"]):
        for name in ("_task_id", "_run_id", "_node_id"):  # what flwr-clientapp sets when it pulls a message
            setattr(TaskIdentity, name, i + 1)
        content = RecordDict({"arrays": ArrayRecord(load_file(str(workdir / spec["arrays"]))),
                              "config": ConfigRecord(spec["config"])})
        message = Message(content, dst_node_id=1, message_type=spec["type"])
        context = Context(run_id=1, node_id=1, node_config=dict(spec["node_config"]), state=RecordDict(),
                          run_config={})
        try:
            reply = app(message=message, context=context)
        except Exception as ex:  # what flwr-clientapp does with an exception: log it as a crash, send its text
            logging.getLogger("flwr").error("ClientApp raised an exception", exc_info=ex)
            replies.append({"error": str(type(ex)) + ":<'" + str(ex) + "'>"})
            continue
        if reply.has_error():
            replies.append({"error": str(reply.error.reason)})
            continue
        out: dict[str, Any] = {"error": None, "metrics": {}, "site": {}}
        for record in reply.content.metric_records.values():
            out["metrics"].update(dict(record))
        for record in reply.content.config_records.values():
            out["site"].update({k: v for k, v in dict(record).items() if not isinstance(v, bytes)})
        if reply.content.array_records:
            name = f"reply-{i}.safetensors"
            state = next(iter(reply.content.array_records.values())).to_torch_state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(workdir / name))
            out["arrays"] = name
        replies.append(out)
    (workdir / "replies.json").write_text(json.dumps(replies, default=float))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(_main(Path(sys.argv[1])))
