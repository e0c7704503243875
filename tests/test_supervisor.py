"""The one process supervisor of join, start, run and simulate, with real child processes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from fl_client import supernode_runner
from shared_model.supervisor import Supervisor

PY = sys.executable


def _child(code: str) -> list[str]:
    return [PY, "-c", code]


def test_the_output_is_relayed_line_by_line_and_the_status_returned(capsys: pytest.CaptureFixture) -> None:
    seen: list[str] = []
    with Supervisor() as supervisor:
        rc = supervisor.run(_child("print('one'); print('two', flush=True); raise SystemExit(3)"), dict(os.environ),
                            on_line=seen.append)
    assert rc == 3 and seen == ["one\n", "two\n"]
    assert capsys.readouterr().out == "one\ntwo\n"


def test_a_stop_signal_reaches_the_child_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(7))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    ready = threading.Event()
    with Supervisor() as supervisor:
        supervisor.start(_child(code), dict(os.environ), on_line=lambda line: ready.set())
        assert ready.wait(30)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # what `llnm-server stop` or a service manager sends
        rc = supervisor.wait()
        assert supervisor.stop_asked and not supervisor.sleep(5)  # no pause, no restart, once a stop is asked
    assert rc == 7 and time.monotonic() - started < 10
    assert signal.getsignal(signal.SIGTERM) is before


def test_on_stop_replaces_passing_the_signal_on() -> None:
    calls: list[int] = []
    ready = threading.Event()
    supervisor = Supervisor(on_stop=lambda signum: (calls.append(signum), supervisor.terminate()))
    with supervisor:
        supervisor.start(_child("import time; print('ready', flush=True); time.sleep(60)"), dict(os.environ),
                         on_line=lambda line: ready.set())
        assert ready.wait(30)
        os.kill(os.getpid(), signal.SIGINT)
        rc = supervisor.wait()
    assert calls == [signal.SIGINT] and rc == -signal.SIGTERM


def test_join_stops_at_once_and_names_the_port_when_it_is_taken(capsys: pytest.CaptureFixture) -> None:
    cmd = _child("import sys; print('OSError: [Errno 98] Address already in use'); sys.exit(1)")
    started = time.monotonic()
    rc = supernode_runner.run_supernode([*cmd, "--port", "9321"], dict(os.environ), max_restarts=3)
    err = capsys.readouterr().err
    assert rc == 1 and time.monotonic() - started < 10
    assert "local Runtime API port 9321" in err and "already in use" in err and "Starting it again" not in err


def test_join_moves_to_another_port_when_the_one_it_chose_was_taken_meanwhile(capsys: pytest.CaptureFixture) -> None:
    """Several sites joining at once on one machine all find 9094 free, and all but one lose it. A port join
    chose itself is then replaced by a free one at once; the child here binds its --port as flower-supernode
    does and, once bound, asks the supervisor to stop, as Ctrl-C would."""
    import socket

    from shared_model.protocol.connection_check import free_local_port

    code = ("import os, signal, socket, sys, time\n"
            "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
            "s = socket.socket()\n"
            "try:\n    s.bind(('127.0.0.1', port))\n"
            "except OSError:\n    print('ERROR: [Errno 98] address already in use', flush=True); sys.exit(1)\n"
            "print('bound', port, flush=True)\n"
            "os.kill(os.getppid(), signal.SIGTERM)\n"
            "time.sleep(30)\n")
    picked: list[int] = []

    def repick() -> int:
        picked.append(free_local_port())
        return picked[-1]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = supernode_runner.run_supernode([*_child(code), "--port", str(port)], dict(os.environ), max_restarts=3,
                                            repick_port=repick)
        seen = capsys.readouterr()
    assert rc == 0 and len(picked) == 1 and picked[0] != port
    assert f"bound {picked[0]}" in seen.out
    assert f"port {port} (the SuperNode's local Runtime API) was taken" in seen.err and "error:" not in seen.err


def test_join_stops_when_the_superlink_refuses_the_key_at_first_start(capsys: pytest.CaptureFixture) -> None:
    cmd = _child("import sys; print('ERROR : Failed to activate SuperNode'); sys.exit(1)")
    assert supernode_runner.run_supernode(cmd, dict(os.environ), max_restarts=3) == 1
    err = capsys.readouterr().err
    assert supernode_runner.REFUSED_HINT in err and "Starting it again" not in err


def test_join_starts_a_supernode_that_dropped_again_after_a_pause(capsys: pytest.CaptureFixture) -> None:
    cmd = _child("import sys; print('connection dropped'); sys.exit(1)")
    started = time.monotonic()
    assert supernode_runner.run_supernode(cmd, dict(os.environ), max_restarts=1) == 1
    err = capsys.readouterr().err
    assert "Starting it again in 2 s (restart 1 of at most 1" in err
    assert "exited (status 1) 2 times" in err and time.monotonic() - started >= 2
