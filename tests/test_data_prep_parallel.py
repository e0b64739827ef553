"""data_prep.parallel.ordered_map: task order, bounded look-ahead, a dead worker is an error (not a hang)."""

from __future__ import annotations

import os
import time

import pytest

from data_prep.parallel import IN_FLIGHT_PER_WORKER, WorkerDied, ordered_map


def _slow_square(value: int) -> int:
    time.sleep(0.01 * (value % 3))  # finishing out of order
    return value * value


def _exit_on_three(value: int) -> int:
    if value == 3:
        os._exit(9)  # as the out-of-memory killer ends a process: no exception, no result
    return value


def test_results_come_in_task_order_from_worker_processes():
    assert list(ordered_map(_slow_square, range(12), workers=2)) == [v * v for v in range(12)]
    assert list(ordered_map(_slow_square, range(5), workers=1)) == [v * v for v in range(5)]


def test_workers_never_run_more_than_a_bounded_number_of_tasks_ahead():
    pulled = []

    def tasks():
        for value in range(20):
            pulled.append(value)
            yield value

    workers = 2
    ahead = []
    for done, _ in enumerate(ordered_map(_slow_square, tasks(), workers=workers), start=1):
        ahead.append(len(pulled) - done)
    assert max(ahead) <= IN_FLIGHT_PER_WORKER * workers
    assert len(pulled) == 20


def test_a_worker_that_dies_is_an_error_naming_the_task():
    """The pool fails every task in flight at once: the first of them in order is named, and the others
    are counted when there are any (tasks 0-2 may or may not have finished before task 3's worker died)."""
    started = time.monotonic()
    named = r"died while preparing subject-[0-3]( \(or another of the [2-9] in flight\))?"
    with pytest.raises(WorkerDied, match=named + r": killed by the system.*try fewer --workers"):
        list(ordered_map(_exit_on_three, range(8), workers=2, describe=lambda value: f"subject-{value}"))
    assert time.monotonic() - started < 60
