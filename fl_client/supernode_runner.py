"""Keeping a site's SuperNode running: `run_supernode` starts `flower-supernode` under the one process supervisor,
relays its output, starts it again when it stops without being asked to (the SuperLink restarted, the network
dropped), moves to another free local port when the one join chose was taken meanwhile (several sites joining
at once on one machine), and stops with what to do when the SuperLink refuses the site's key or a port the
operator named is taken."""

from __future__ import annotations

import sys
from collections.abc import Callable

from fl_client.join_plan import DEFAULT_LOCAL_PORT
from shared_model.supervisor import Supervisor

__all__ = ["ENDED_HINT", "REFUSED_HINT", "run_supernode"]

REFUSED_HINT = ("the SuperLink refused this SuperNode ('Failed to activate SuperNode'): this site's key is not "
                "registered there, or was revoked. Send the .pub made by `llnm-site keygen` to the coordinator "
                "(`llnm-server register-site`)")
ENDED_HINT = ("the SuperNode kept stopping without being asked to: the SuperLink ended its session (its key may have "
              "been revoked; ask the coordinator) or is down. Run `llnm-site join` again once it is back")


#: How often a SuperNode moves on to another free local port before join gives up.
MAX_PORT_MOVES = 5


def run_supernode(cmd: list[str], env: dict[str, str], max_restarts: int = 20,
                  repick_port: Callable[[], int] | None = None) -> int:
    """Run flower-supernode in the foreground (its output relayed) and keep the site in the federation: when
    the SuperNode stops without being asked to (the SuperLink restarted, the network dropped), start it again
    after a growing pause, saying why; a refusal of the site's key ends it with what to do. When its local port
    was taken between join's check and the SuperNode's start, `repick_port` (given when join chose the port,
    not the operator) names another and it starts again at once. Ctrl-C/SIGTERM are passed on and end it."""
    cmd = list(cmd)
    with Supervisor() as supervisor:
        restarts = refusals = moves = 0
        while True:
            watch = _SupernodeWatch()
            rc = supervisor.run(cmd, env, on_line=watch)
            if supervisor.stop_asked:
                return 0
            if watch.port_taken:
                port = cmd[cmd.index("--port") + 1] if "--port" in cmd else str(DEFAULT_LOCAL_PORT)
                if repick_port is not None and moves < MAX_PORT_MOVES and "--port" in cmd:
                    moves += 1
                    cmd[cmd.index("--port") + 1] = str(repick_port())
                    print(f"[llnm-site] port {port} (the SuperNode's local Runtime API) was taken by another program "
                          f"after join chose it; starting the SuperNode again on port {cmd[cmd.index('--port') + 1]}",
                          file=sys.stderr, flush=True)
                    continue
                print(f"error: flower-supernode could not open its local Runtime API port {port}: the address is "
                      "already in use (another SuperNode or program on this machine took it). Join again with a "
                      "free --clientappio-port, or without the flag to let join pick one", file=sys.stderr)
                return rc or 1
            if watch.refused:
                refusals += 1
                # Right after a SuperLink restart its registrations are being restored: a refusal then is worth
                # a few more tries. A refusal at the very first start is final.
                if restarts == 0 or refusals > 3:
                    print(f"error: flower-supernode exited (status {rc}): {REFUSED_HINT}", file=sys.stderr)
                    return rc or 1
            if restarts >= max_restarts:
                print(f"error: flower-supernode exited (status {rc}) {restarts + 1} times: {ENDED_HINT}",
                      file=sys.stderr)
                return rc or 1
            restarts += 1
            pause = min(60, 2 ** restarts)
            print(f"[llnm-site] flower-supernode stopped without being asked to (status {rc}): the SuperLink "
                  f"restarted or the connection dropped. Starting it again in {pause} s (restart {restarts} of at "
                  f"most {max_restarts}; Ctrl-C to stop).", file=sys.stderr, flush=True)
            if not supervisor.sleep(pause):
                return 0


class _SupernodeWatch:
    """What flower-supernode's output says about why it ended."""

    def __init__(self) -> None:
        self.refused = self.port_taken = False

    def __call__(self, line: str) -> None:
        if "Failed to activate SuperNode" in line:
            self.refused = True
        if "address already in use" in line.lower():
            self.port_taken = True
