"""What a training step reports: wall time per phase, throughput over a logging window, and the values
rank 0 sends to W&B and the progress bar (``train/``, ``perf/``)."""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    """Wall time per phase of a training step, summed until :meth:`pop` (``perf/`` in W&B, bench/train.py).

    ``synchronize``: wait for the GPU at each phase boundary so times are the phase's own (slower; the
    benchmark turns it on, training leaves it off).
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize and torch.cuda.is_available()
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.synchronize:
            torch.cuda.synchronize()
        started = time.perf_counter()
        yield
        if self.synchronize:
            torch.cuda.synchronize()
        self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - started

    def pop(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


class ThroughputMeter:
    """Images per second and the share of step time spent waiting for data, over a logging window."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.reset()

    def reset(self) -> None:
        self.data_seconds = self.total_seconds = 0.0
        self.steps = 0

    def add(self, data_seconds: float, total_seconds: float) -> None:
        self.data_seconds += data_seconds
        self.total_seconds += total_seconds
        self.steps += 1

    def pop(self) -> dict[str, float]:
        """``perf/`` values of the window, then a new window."""
        values = {
            "perf/images_per_s": self.steps * self.images_per_step / self.total_seconds,
            "perf/data_wait_pct": 100.0 * self.data_seconds / self.total_seconds,
            "perf/step_s": self.total_seconds / self.steps,
        }
        self.reset()
        return values


def step_values(
    losses: dict[str, float], g_engine, d_engine, epoch: float, timer: PhaseTimer, throughput: ThroughputMeter
) -> dict[str, float]:
    """The window's ``train/`` values (losses, LRs, fractional epoch, gradient norms when DeepSpeed has
    them) and ``perf/`` values (seconds per phase per step, throughput); empties the timer and meter."""
    values = {
        **{f"train/{k}": v for k, v in losses.items()},
        "train/lr_g": g_engine.get_lr()[0],
        "train/lr_d": d_engine.get_lr()[0],
        "train/epoch": epoch,
        **{f"perf/{phase}_s": total / throughput.steps for phase, total in timer.pop().items()},
        **throughput.pop(),
    }
    for name, engine in (("g", g_engine), ("d", d_engine)):
        norm = engine.get_global_grad_norm()
        if norm is not None:
            values[f"train/grad_norm_{name}"] = float(norm)
    return values


def progress_values(losses: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    """The progress bar's few numbers out of a window's :func:`step_values`."""
    return {
        **{name: losses[name] for name in ("loss_g", "loss_d") if name in losses},
        "img/s": values["perf/images_per_s"],
        "data_wait_%": values["perf/data_wait_pct"],
    }
