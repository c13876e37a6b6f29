"""The periodic thread and the retry backoff every part shares (records.periodic, records.backoff)."""

from __future__ import annotations

import threading
import time

import pytest

from records.backoff import backoff
from records.periodic import Periodic
from testbed.network import wait_for


def test_a_step_that_raises_is_reported_and_the_loop_goes_on():
    calls: list[float] = []
    errors: list[Exception] = []

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) % 2:
            raise RuntimeError(f"pass {len(calls)}")

    loop = Periodic("test-periodic", 0.01, step, on_error=errors.append)
    loop.start()
    try:
        wait_for(lambda: len(calls) >= 5, 5)
    finally:
        assert loop.stop(timeout=5)
    assert [str(e) for e in errors[:3]] == ["pass 1", "pass 3", "pass 5"]
    assert not loop.is_alive()


def test_the_default_on_error_logs_the_reason(caplog):
    failed = threading.Event()

    def step() -> None:
        failed.set()
        raise ValueError("the database is away")

    loop = Periodic("test-logging", 0.01, step)
    with caplog.at_level("WARNING", logger="records.periodic"):
        loop.start()
        assert failed.wait(5)
        wait_for(lambda: "the database is away" in caplog.text, 5)
        assert loop.stop(timeout=5)
    assert "test-logging failed (ValueError: the database is away)" in caplog.text


def test_stop_ends_a_long_interval_at_once_and_no_step_runs_after_it():
    calls: list[int] = []
    loop = Periodic("test-stop", 3600, lambda: calls.append(1))
    loop.start()
    wait_for(lambda: calls, 5)  # the first step runs at start
    start = time.monotonic()
    assert loop.stop(timeout=5)
    assert time.monotonic() - start < 1
    time.sleep(0.05)
    assert calls == [1]


def test_first_step_one_interval_after_start_when_asked():
    calls: list[float] = []
    loop = Periodic("test-later", 0.3, lambda: calls.append(time.monotonic()), first_now=False)
    started = time.monotonic()
    loop.start()
    try:
        wait_for(lambda: calls, 5)
    finally:
        loop.stop(timeout=5)
    assert calls[0] - started >= 0.29


def test_stop_before_the_first_interval_runs_no_step():
    calls: list[int] = []
    loop = Periodic("test-never", 3600, lambda: calls.append(1), first_now=False)
    loop.start()
    assert loop.stop(timeout=5)
    assert calls == []


def test_stop_waits_for_the_step_in_progress_which_sees_the_stop_event():
    stop = threading.Event()
    inside, seen = threading.Event(), []

    def step() -> None:  # a long pass checking the stop event between items, as the sweeps do
        inside.set()
        for item in range(1000):
            if stop.is_set():
                seen.append(item)
                return
            time.sleep(0.01)

    loop = Periodic("test-items", 3600, step, stop_event=stop)
    loop.start()
    assert inside.wait(5)
    start = time.monotonic()
    assert loop.stop()  # no timeout: waits for the step to end, which it does at the next item
    assert time.monotonic() - start < 1 and seen and seen[0] < 1000


def test_a_stop_with_a_timeout_leaves_a_step_that_will_not_end():
    release = threading.Event()
    inside = threading.Event()

    def step() -> None:
        inside.set()
        release.wait(10)

    loop = Periodic("test-stuck", 3600, step)
    loop.start()
    assert inside.wait(5)
    assert loop.stop(timeout=0.1) is False and loop.is_alive()
    release.set()
    assert loop.join(timeout=5) and not loop.is_alive()


def test_wake_runs_the_next_step_now():
    calls: list[int] = []
    loop = Periodic("test-wake", 3600, lambda: calls.append(1))
    loop.start()
    try:
        wait_for(lambda: len(calls) == 1, 5)
        loop.wake()
        wait_for(lambda: len(calls) == 2, 5)
    finally:
        assert loop.stop(timeout=5)


def test_a_loop_never_started_stops_at_once():
    loop = Periodic("test-unstarted", 1, lambda: None)
    assert loop.stop(timeout=1) and loop.join()


def test_the_thread_is_a_named_daemon():
    names: list[tuple[str, bool]] = []
    loop = Periodic("test-name", 3600, lambda: names.append((threading.current_thread().name,
                                                             threading.current_thread().daemon)))
    loop.start()
    wait_for(lambda: names, 5)
    loop.stop(timeout=5)
    assert names == [("test-name", True)]


@pytest.mark.parametrize(("attempt", "first", "expected"), [
    (0, 0, 10), (1, 0, 20), (4, 0, 160), (5, 0, 300), (50, 0, 300),  # analyses: retries done, base 10, cap 300
    (0, 1, 5), (1, 1, 5), (2, 1, 10), (7, 1, 320), (8, 1, 600), (9, 1, 600),  # deliveries: attempts made, cap 600
])
def test_backoff_doubles_from_its_base_up_to_its_cap(attempt, first, expected):
    cap = 300 if first == 0 else 600
    base = 10 if first == 0 else 5
    assert backoff(attempt, first=first, base=base, cap=cap) == expected


def test_backoff_of_a_huge_attempt_number_is_the_cap_not_an_overflow():
    assert backoff(10_000, first=1, base=5, cap=600) == 600
    assert backoff(1023, first=0, base=1e300, cap=42) == 42


def test_backoff_matches_the_formulas_it_replaced():
    for n in range(40):
        assert backoff(n, first=0, base=10, cap=300.0) == min(10 * 2 ** min(n, 16), 300.0)  # the model away
        assert backoff(n, first=1, base=5, cap=600) == min(600, 5 * 2 ** max(0, n - 1))  # an outbox item
