"""Run a function over tasks in worker processes and yield the results in task order, with bounded memory.

`ordered_map(function, tasks, workers)` is what `shard --workers N` uses. Two things a plain
``multiprocessing.Pool.imap`` gets wrong for it:

- Memory: a prepared full-size BraTS subject is about 85 MB. ``imap`` lets the workers run ahead of
  the consumer without limit, so with many workers and one writer the results pile up until the machine
  runs out of memory. Here at most ``2 x workers`` tasks are in flight.
- A worker that dies (the kernel's out-of-memory killer, a crash in a C library) leaves ``Pool`` waiting
  forever for its task. Here it raises `WorkerDied`, with a message that says what to try.

Processes are started with "spawn", not "fork": the caller (e.g. medgan's front door) may hold threads
that fork would copy in a locked state.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from data_prep.errors import UserError

IN_FLIGHT_PER_WORKER = 2


class WorkerDied(UserError):
    """A worker process ended without returning its result (killed by the system, or crashed)."""


def ordered_map(function: Callable, tasks: Iterable, workers: int, describe: Callable = repr) -> Iterator:
    """Yield ``function(task)`` for every task, in task order; `workers` processes (1: this process).

    `function` must be importable by name (a module-level function), as must the tasks' types.
    describe(task): how the task is named in WorkerDied's message.
    """
    if workers <= 1:
        for task in tasks:
            yield function(task)
        return
    queue = iter(tasks)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque = deque()
    try:
        for task in itertools.islice(queue, IN_FLIGHT_PER_WORKER * workers):
            pending.append((task, pool.submit(function, task)))
        while pending:
            result = pending[0][1].result()
            pending.popleft()
            for task in itertools.islice(queue, 1):
                pending.append((task, pool.submit(function, task)))
            yield result
    except BrokenProcessPool:
        # Raised by result() or, when the pool broke in between, by submit(). Every unfinished task fails
        # with it; the first of them in order is named.
        lost = [task for task, future in pending if not future.done() or future.exception() is not None]
        others = f" (or another of the {len(lost)} in flight)" if len(lost) > 1 else ""
        raise WorkerDied(
            f"a worker process died while preparing {describe(lost[0]) if lost else 'a task'}{others}: "
            f"killed by the system, most often for lack of memory; try fewer --workers"
        ) from None
    finally:
        # Cancel what has not started; what is running (at most `workers` tasks) is waited for.
        pool.shutdown(wait=True, cancel_futures=True)
