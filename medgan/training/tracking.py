"""Every rank-0 side effect of a run in one place: printing, the progress bar, W&B.

Build it with :func:`make_reporter`; non-main ranks get a :class:`SilentReporter` with the same methods,
so the training loop never checks the rank itself.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from tqdm import tqdm

from medgan.config import Config


def resolve_wandb_mode(requested: str) -> str:
    """``auto``: online when an API key is configured, offline otherwise; ``WANDB_MODE`` wins when set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.isfile(os.path.expanduser("~/.netrc"))
    return "online" if has_key else "offline"


class SilentReporter:
    """What ranks other than 0 report: nothing."""

    run_id: str | None = None

    def print(self, message: str) -> None:
        pass

    def start_progress(self, total: int, initial: int) -> None:
        pass

    def progress(self, step: int, values: dict[str, float]) -> None:
        pass

    def log(self, values: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, name: str, grid: np.ndarray, step: int, caption: str = "") -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class RankZeroReporter(SilentReporter):
    """Prints, draws the progress bar and logs to W&B (``train/``, ``perf/``, ``val/``) on rank 0."""

    def __init__(self, config: Config, run_id: str | None, provenance: dict[str, Any]) -> None:
        self.mode = resolve_wandb_mode(config.logging.wandb)
        self.bar: tqdm | None = None
        self.total = 0
        self.use_bar = config.logging.progress_bar
        self.run = None
        if self.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=config.logging.project,
                name=config.logging.run_name or None,
                id=run_id,
                resume="allow",
                mode=self.mode,
                dir=config.checkpoint.dir,
                config={**config.to_dict(), "provenance": provenance},
            )
        self.run_id = self.run.id if self.run is not None else run_id

    def print(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def start_progress(self, total: int, initial: int) -> None:
        self.total = total
        if self.use_bar:
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        else:
            # batch jobs (slurm logs) get one plain line per logging interval instead of a bar
            print(
                f"step {step}/{self.total}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()),
                flush=True,
            )

    def _send(self, action) -> None:
        """Run one W&B call; tracking must never stop training. If W&B's service process is gone (the
        DeepSpeed launcher sends SIGTERM to every process under a rank, W&B's service included), say so
        once and go on without it."""
        if self.run is None:
            return
        try:
            action()
        except Exception as error:  # noqa: BLE001 - any W&B failure, whatever its type
            self.print(f"W&B stopped logging ({type(error).__name__}: {error}); training goes on")
            self.run = None

    def log(self, values: dict[str, Any], step: int) -> None:
        self._send(lambda: self.run.log(values, step=step))

    def log_images(self, name: str, grid: np.ndarray, step: int, caption: str = "") -> None:
        import wandb

        self._send(lambda: self.run.log({name: wandb.Image(grid, caption=caption)}, step=step))

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        import wandb

        self._send(lambda: self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step))

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._send(lambda: self.run.finish())
        self.run = None


def make_reporter(
    is_main: bool, config: Config, run_id: str | None, provenance: dict[str, Any]
) -> SilentReporter:
    return RankZeroReporter(config, run_id, provenance) if is_main else SilentReporter()


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
    """Rows of ``inputs | synthesized | real | abs error`` tiles: each column ``[B, H, W]`` in ``[0, 1]``
    becomes one tile per row; returns a uint8 ``[B*H, n*W]`` image."""
    rows = [np.concatenate([column[i] for column in columns], axis=1) for i in range(columns[0].shape[0])]
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
