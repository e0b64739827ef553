"""Where training is (:class:`TrainState`), what a resume restores with it (the RNG states), and the
trainer's record of the run that checkpointing writes beside the tags."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medgan.checkpointing import CheckpointError, tag_for_step

# What a validation PSNR is the mean of, saved with the state: per-volume PSNR of whole val volumes.
# Checkpoints without it validated the mean over val slices of per-slice PSNR, a different number (higher
# for the same prediction), so a resumed older run starts its best and its history anew.
VALIDATION_SCORE = "volume"


@dataclass(slots=True)
class TrainState:
    """Where training is: optimizer steps taken, the epoch and the batch within it, the best validation
    PSNR so far and its step, every validation's ``[step, val PSNR]``, the training loop's CPU seconds
    (``training.cpu_budget_seconds``). Travels in the generator checkpoint's client state with what a
    resume must check."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_psnr: float = float("-inf")
    best_step: int | None = None
    validations: list[list[float]] = field(default_factory=list)
    train_cpu_seconds: float = 0.0
    # set on resume when the checkpoint's validations were of another kind (see VALIDATION_SCORE)
    restarted_best: bool = False

    def to_client_state(self, world_size: int, samples_per_step: int) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_psnr": self.best_psnr,
            "best_step": self.best_step,
            "validations": [list(entry) for entry in self.validations],
            "train_cpu_seconds": self.train_cpu_seconds,
            "validation_score": VALIDATION_SCORE,
            "samples_consumed": self.step * samples_per_step,
            "world_size": world_size,
        }

    @staticmethod
    def from_client_state(state: dict[str, Any], world_size: int, where: str) -> TrainState:
        """The saved position; another world size is a CheckpointError (the sample order depends on it).
        A checkpoint whose validations scored slices, not volumes, keeps its position but not its best
        PSNR or history (``restarted_best``): the next validation sets the best."""
        if state.get("world_size") != world_size:
            raise CheckpointError(
                f"{where}: saved with {state.get('world_size')} ranks, resumed with {world_size}; the "
                "sample order depends on it (start a new checkpoint_dir)"
            )
        if state.get("validation_score") != VALIDATION_SCORE:
            state = {**state, "best_psnr": float("-inf"), "best_step": None, "validations": []}
            restarted = True
        else:
            restarted = False
        return TrainState(
            step=state["step"],
            epoch=state["epoch"],
            batch_in_epoch=state["batch_in_epoch"],
            best_psnr=state.get("best_psnr", float("-inf")),
            best_step=state.get("best_step"),
            validations=[list(entry) for entry in state.get("validations", [])],
            train_cpu_seconds=state.get("train_cpu_seconds", 0.0),
            restarted_best=restarted,
        )

    def advance(self, batches_per_epoch: int) -> None:
        """One batch consumed (the epoch turns over after its last batch)."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0

    def run_record(
        self, batches_per_epoch: int, parameter_counts: tuple[int, int], stopped_by: str | None
    ) -> dict[str, Any]:
        """The trainer's record (``checkpointing.write_run_record``): steps, epochs (fractional), the
        training loop's CPU seconds, both networks' parameter counts, the best validation's step, tag and
        PSNR (None before the first), every validation's ``[step, val PSNR]`` at full precision, and what
        stopped the run (``total_steps``, ``cpu_budget``, ``sigterm``; None while it runs)."""
        has_best = self.best_step is not None
        return {
            "steps": self.step,
            "epochs": self.epoch + self.batch_in_epoch / batches_per_epoch,
            "train_cpu_seconds": self.train_cpu_seconds,
            "generator_parameters": parameter_counts[0],
            "discriminator_parameters": parameter_counts[1],
            "best_step": self.best_step,
            "best_tag": tag_for_step(self.best_step) if has_best else None,
            "best_val_psnr": self.best_psnr if has_best else None,
            "validations": [list(entry) for entry in self.validations],
            "stopped_by": stopped_by,
        }


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
