"""StopSignals: the first SIGINT/SIGTERM requests a stop, a second one stops at once, and the
handlers that were there before come back; outside the main thread it stays out of the way."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from tinylm.training.interrupt import SIGNALS, StopSignals


def send(signum: int) -> None:
    """Signal this process; Python runs the handler before the next line."""
    os.kill(os.getpid(), signum)


@pytest.fixture
def previous_handlers():
    """Handlers of our own for SIGINT and SIGTERM, which StopSignals must put back; pytest's after the test."""
    def handler(signum, frame):
        raise AssertionError(f"the previous handler ran for {signal.Signals(signum).name}")

    saved = {s: signal.signal(s, handler) for s in SIGNALS}
    yield {s: handler for s in SIGNALS}
    for s, original in saved.items():
        signal.signal(s, original)


def current_handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in SIGNALS}


def test_a_signal_requests_a_stop_and_the_handlers_come_back(previous_handlers, capsys):
    with StopSignals(announce=True) as stop:
        assert current_handlers() != previous_handlers
        assert not stop.requested
        send(signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert "SIGTERM: saving a checkpoint after this step, then stopping" in capsys.readouterr().out
    assert current_handlers() == previous_handlers


def test_a_second_signal_stops_at_once(previous_handlers, capsys):
    stop = StopSignals(announce=False)
    with pytest.raises(KeyboardInterrupt):
        with stop:
            send(signal.SIGTERM)
            send(signal.SIGINT)
            pytest.fail("the second signal did not interrupt")
    assert stop.signum == signal.SIGTERM  # the first one's request stands
    assert capsys.readouterr().out == ""  # not rank 0: it says nothing
    assert current_handlers() == previous_handlers


def test_outside_the_main_thread_it_installs_nothing(previous_handlers):
    seen = {}

    def worker():
        with StopSignals(announce=True) as stop:
            seen["handlers inside"] = current_handlers()
        seen["requested"] = stop.requested

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"handlers inside": previous_handlers, "requested": False}
    assert current_handlers() == previous_handlers
