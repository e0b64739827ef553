"""When training stops before its last step: a SIGTERM on any rank (a scheduler's notice) or the training
loop's CPU budget (``training.cpu_budget_seconds``) spent on any rank. Every rank learns both from one
all-reduce per check, so all stop at the same step."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from medgan.config import TrainingConfig
from medgan.distributed import max_over_ranks

# The ranks' agreement is the largest of these: a SIGTERM outranks a spent budget (save and leave now).
GO_ON, BUDGET_SPENT, SIGTERM = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Stop:
    """Why every rank stops: ``kind`` is ``sigterm`` or ``cpu_budget`` (the run record's ``stopped_by``);
    ``message`` is the line rank 0 prints."""

    kind: str
    message: str


class StopPolicy:
    """Installs the SIGTERM handler and decides, at each check, whether every rank stops."""

    def __init__(self, training: TrainingConfig) -> None:
        self.training = training
        # set by the SIGTERM handler only, never cleared: an assignment of the ranks' agreement to the same
        # attribute could overwrite a signal that arrived during the all-reduce (a lost SIGTERM)
        self.sigterm_received = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle_sigterm)

    def handle_sigterm(self, signum, frame) -> None:
        self.sigterm_received = True

    def check(self, step: int, cpu_seconds: float, resuming: bool = False) -> Stop | None:
        """The stop every rank agrees on after ``step`` (one all-reduce; collective), or None to go on.
        ``cpu_seconds``: this rank's training-loop CPU time; ``resuming``: checked before the first step."""
        budget = self.training.cpu_budget_seconds
        spent = bool(budget) and cpu_seconds >= budget
        agreed = max_over_ranks(SIGTERM if self.sigterm_received else BUDGET_SPENT if spent else GO_ON)
        if agreed == SIGTERM:
            return Stop("sigterm", f"SIGTERM: stopping at step {step}")
        if agreed == BUDGET_SPENT and resuming:
            return Stop(
                "cpu_budget",
                f"CPU budget spent before this start: {cpu_seconds:.0f} s of training loop at step {step}",
            )
        if agreed == BUDGET_SPENT:
            return Stop(
                "cpu_budget",
                f"CPU budget spent: {cpu_seconds:.0f} s of training loop "
                f"(training.cpu_budget_seconds {budget:g}) at step {step}",
            )
        return None
