"""`Supervisor`: how every long-running command of both roles runs its child process in the foreground.

`llnm-site join` (flower-supernode), `llnm-server start` (flower-superlink), `llnm-server run` (`flwr run`) and
`llnm-server simulate` (the in-process simulation engine) share one behaviour: Ctrl-C and SIGTERM reach the
child (or the command's own stop action) instead of killing the parent and orphaning the child, a stop once
asked is remembered so that no restart loop starts the child again, and the signal handlers in force before
are back in place afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

__all__ = ["STOP_SIGNALS", "Supervisor"]

#: The signals that ask a foreground command to stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Supervisor:
    """A context in which SIGINT/SIGTERM stop the supervised child; children run one at a time.

    ``on_stop(signum)`` replaces the default action (passing the signal on to the running child) where stopping
    means more, e.g. stopping the run on the SuperLink before ending `flwr run`. ``signals`` narrows the
    signals handled (the simulation lets Ctrl-C raise KeyboardInterrupt as usual).
    """

    def __init__(self, on_stop: Callable[[int], None] | None = None,
                 signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.on_stop = on_stop
        self.signals = signals
        self.asked: list[int] = []
        self.child: subprocess.Popen | None = None
        self._previous: dict[int, object] = {}
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Supervisor:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    @property
    def stop_asked(self) -> bool:
        return bool(self.asked)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.asked.append(signum)
        if self.on_stop is not None:
            self.on_stop(signum)
        else:
            self.send(signum)

    def send(self, signum: int) -> None:
        """Pass a signal on to the running child (nothing when none runs)."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def terminate(self) -> None:
        self.send(signal.SIGTERM)

    def start(self, cmd: list[str], env: dict[str, str],
              on_line: Callable[[str], None] | None = None) -> subprocess.Popen:
        """Start ``cmd``. With ``on_line`` its output (stderr merged) is relayed to this process's stdout line by
        line and each line handed to ``on_line``; without, the child writes to the terminal itself."""
        if on_line is None:
            self.child = subprocess.Popen(cmd, env=env)
            self._reader = None
            return self.child
        self.child = proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True, errors="replace")
        stream = proc.stdout
        assert stream is not None

        def relay() -> None:
            for line in stream:
                sys.stdout.write(line)
                sys.stdout.flush()
                on_line(line)

        # A reader thread rather than reading to EOF here: helper processes the child starts inherit the pipe
        # and may outlive it by a few seconds.
        self._reader = threading.Thread(target=relay, daemon=True)
        self._reader.start()
        return proc

    def wait(self) -> int:
        """The running child's exit status, once it has ended (a second Ctrl-C during a stop is absorbed)."""
        assert self.child is not None, "no child was started"
        while True:
            try:
                rc = self.child.wait()
                break
            except KeyboardInterrupt:
                continue
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc

    def run(self, cmd: list[str], env: dict[str, str], on_line: Callable[[str], None] | None = None) -> int:
        """`start` then `wait`."""
        self.start(cmd, env, on_line)
        return self.wait()

    def sleep(self, seconds: float) -> bool:
        """Pause between children; False as soon as a stop is asked."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.asked:
            time.sleep(0.2)
        return not self.asked
