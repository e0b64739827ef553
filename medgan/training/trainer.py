"""The DeepSpeed GAN trainer: the loop that ties the parts together on every rank, and :func:`train`, the
entry point ``medgan.cli.train`` (``launch/train.py``) and the front door call.

The parts: ``engines`` (both DeepSpeed engines and the LR schedule), ``gan_step`` (the losses and one
step), ``validation`` (val scores through ``medgan.scoring``, image grids), ``stopping`` (SIGTERM and the
CPU budget), ``step_logging`` (phase times, throughput, logged values) and ``state`` (where training is,
RNG states, the run record). Checkpoints and the run's files go through ``medgan.checkpointing``; rank 0's
reports through the reporter of ``tracking``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_prep.errors import DataError
from data_prep.shard_reader import ShardFolder
from medgan.checkpointing import CheckpointLayout, CheckpointManager, provenance, tag_for_step
from medgan.config import Config, load_config
from medgan.distributed import DistributedContext, barrier, max_over_ranks
from medgan.scoring import METRICS
from medgan.shards import ChannelMap, SubjectStack, subject_stacks
from medgan.training import gan_step, validation
from medgan.training.ema import ExponentialMovingAverage
from medgan.training.engines import PRECISION_DTYPES, build_engines
from medgan.training.loader import SliceStream, TaskSpec, make_loader
from medgan.training.slabs import SlabStream
from medgan.training.state import TrainState, restore_rng_states, rng_states
from medgan.training.step_logging import PhaseTimer, ThroughputMeter, progress_values, step_values
from medgan.training.stopping import Stop, StopPolicy
from medgan.training.tracking import SilentReporter, make_reporter


def steps_per_epoch(config: Config, train_samples: int, world_size: int) -> int:
    """Global batches in one pass over the train split; a DataError when there is not even one."""
    global_batch = config.data.batch_size * world_size
    if train_samples < global_batch:
        raise DataError(
            f"{config.data.data_path}: the train split has {train_samples} samples, fewer than one global "
            f"batch ({config.data.batch_size} per rank x {world_size} ranks)"
        )
    return train_samples // global_batch


class GANTrainer:
    """Builds both DeepSpeed engines from the config and runs the training loop on every rank."""

    def __init__(self, config: Config, context: DistributedContext) -> None:
        self.config = config
        self.context = context
        self.device = (
            torch.device("cuda", context.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.dtype = PRECISION_DTYPES[config.deepspeed.precision]
        shards = ShardFolder.open(config.data.data_path)
        self.training_data = shards.training_data()
        self.train_split, self.val_split = shards.split("train"), shards.split("val")
        self.canonical = list(config.model.generator.modalities)
        data = config.data
        self.task = TaskSpec.from_names(data.input_modalities, data.target_modality, self.canonical)
        self.batches_per_epoch = steps_per_epoch(config, self.train_split.samples, context.world_size)
        self.total_steps = config.training.epochs * self.batches_per_epoch
        if config.training.max_steps:
            self.total_steps = min(self.total_steps, config.training.max_steps)

        torch.manual_seed(config.training.seed)
        (self.g_engine, self.d_engine), self.parameter_counts = build_engines(
            config, context.world_size, self.batches_per_epoch
        )
        self.ema = (
            ExponentialMovingAverage(self.g_engine.module, config.training.ema_decay)
            if config.training.ema
            else None
        )
        self.checkpoints = CheckpointManager(config.checkpoint.dir, config.checkpoint.keep_last, context)
        self.provenance = provenance(self.train_split.manifest_sha256)
        self.state = TrainState()
        self.stop_policy = StopPolicy(config.training)
        self.stop: Stop | None = None
        self.reporter: SilentReporter = SilentReporter()
        self.timer = PhaseTimer()
        self.throughput = ThroughputMeter(config.data.batch_size * context.world_size)
        self.last_saved = -1

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------------------ state and files
    def _client_state(self) -> dict[str, Any]:
        return {
            **self.state.to_client_state(
                self.context.world_size, self.config.data.batch_size * self.context.world_size
            ),
            "wandb_run_id": self.reporter.run_id,
            "config": self.config.to_dict(),
            "provenance": self.provenance,
            "rng": rng_states(),
        }

    def resume(self) -> dict[str, Any] | None:
        """Load ``latest`` when there is one (the same command resumes a run)."""
        if not self.config.checkpoint.resume:
            return None
        saved = self.checkpoints.load(self.g_engine, self.d_engine, self.ema)
        if saved is None:
            return None
        self.state = TrainState.from_client_state(saved, self.context.world_size, self.config.checkpoint.dir)
        restore_rng_states(saved["rng"])
        self.last_saved = self.state.step
        return saved

    def save(self) -> str:
        """Save tag ``step_NNNNNN`` of both engines and the EMA, then the run record. Collective."""
        # the checkpoint keeps one rank's client state: the budget's "any rank" must survive a resume
        self.state.train_cpu_seconds = max_over_ranks(self.state.train_cpu_seconds)
        tag = self.checkpoints.save(self.step, self.g_engine, self.d_engine, self.ema, self._client_state())
        self.last_saved = self.step
        self.reporter.print(f"saved checkpoint {self.checkpoints.layout.tag_dir(tag)}")
        self._write_record()
        return tag

    def _write_record(self, stopped_by: str | None = None) -> None:
        record = self.state.run_record(self.batches_per_epoch, self.parameter_counts, stopped_by)
        self.checkpoints.write_run_record(record)

    def train_stream(self, epoch: int = 0, skip_batches: int = 0) -> SliceStream:
        """This rank's batches of the train split, shuffled, from ``skip_batches`` of ``epoch``: single
        slices, or slabs of ``data.slab_slices`` with the generator's 2.5D context when it takes one.
        (Validation reads whole val subjects: :meth:`val_subjects`.)"""
        data = self.config.data
        options: dict[str, Any] = dict(
            seed=self.config.training.seed,
            rank=self.context.rank,
            world_size=self.context.world_size,
            random_flips=data.random_flips,
            shuffle_buffer=data.shuffle_buffer,
            epoch=epoch,
            skip_batches=skip_batches,
        )
        context_slices = self.config.model.generator.context_slices
        if data.slab_slices > 1 or context_slices:
            return SlabStream(
                self.train_split,
                self.canonical,
                self.task,
                data.batch_size,
                slab_slices=data.slab_slices,
                context_slices=context_slices,
                **options,
            )
        return SliceStream(
            self.train_split, self.canonical, self.task, data.batch_size, train=True, **options
        )

    def val_subjects(self) -> Iterator[SubjectStack]:
        """This rank's share of the val subjects, whole (the first ``training.val_max_subjects`` of the
        split's order, or all with 0; subject n goes to rank ``n % world size``)."""
        limit, world_size = self.config.training.val_max_subjects, self.context.world_size
        channels = ChannelMap(self.val_split.modalities, self.canonical, self.val_split.directory)
        rank = self.context.rank
        return subject_stacks(
            self.val_split.shards, channels, keep=lambda n: n % world_size == rank, limit=limit
        )

    # ------------------------------------------------------------------------------ step and validation
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        moved = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            moved[name] = value
        return moved

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """:func:`gan_step.train_step` on ``batch``; its losses (the batch and fake kept for image grids)."""
        losses, fake = gan_step.train_step(
            self.g_engine,
            self.d_engine,
            self.ema,
            batch,
            self.config.training,
            self.timer,
            self.config.data.slab_slices,
        )
        self._last_images = (batch, fake)
        return losses

    def _evaluation_generator(self) -> torch.nn.Module:
        return validation.evaluation_generator(
            self.config.model.generator, self.g_engine.module, self.ema, self.device
        )

    def validate(self) -> dict[str, float]:
        """:func:`validation.validate` of the EMA generator on the whole val volumes (each rank a share of the
        subjects); the per-volume table goes to W&B. The scores do not depend on the world size.
        Collective."""
        summary, table, views = validation.validate(
            self._evaluation_generator(),
            self.val_subjects(),
            self.canonical,
            self.task,
            self.config.model.generator.context_slices,
            self.device,
            self.config.data.batch_size,
        )
        self.reporter.log_table("val/per_subject", ["subject", "slices", *METRICS], table, self.step)
        if views is not None:  # rank 0's first val volume: the same subject on any world size
            self.reporter.log_images("val/volume", views, self.step, caption=validation.VOLUME_CAPTION)
        return summary

    def _validate_and_keep_best(self) -> None:
        summary = self.validate()
        self.reporter.log(summary, self.step)
        self.reporter.print(
            f"step {self.step}: val PSNR {summary['val/psnr']:.2f} dB, SSIM {summary['val/ssim']:.4f}, "
            f"MAE {summary['val/mae']:.4f}, through-plane error {summary['val/through_plane_error']:.4f} "
            f"over {summary['val/volumes']} volumes ({summary['val/slices']} slices)"
        )
        self.state.validations.append([self.step, summary["val/psnr"]])
        if summary["val/psnr"] > self.state.best_psnr:
            self.state.best_psnr, self.state.best_step = summary["val/psnr"], self.step
            self.save()  # writes the record with this validation in it
            self.checkpoints.mark_best(tag_for_step(self.step))
        else:
            self._write_record()

    # ------------------------------------------------------------------------------------------ loop
    def _start(self) -> dict[str, Any] | None:
        """Resume when a checkpoint exists, start the rank-0 reporter, write the run's files."""
        config = self.config
        saved = self.resume()
        self.reporter = make_reporter(
            self.context.is_main, config, saved.get("wandb_run_id") if saved else None, self.provenance
        )
        self.checkpoints.write_run(config, self.training_data)
        self.reporter.print(
            f"generator {self.parameter_counts[0]:,} parameters, discriminator {self.parameter_counts[1]:,}; "
            f"{self.context.world_size} rank(s), {self.batches_per_epoch} steps per epoch, "
            f"{self.total_steps} steps"
        )
        if saved is not None:
            self.reporter.print(
                f"resuming from {saved['tag']} (step {self.step}, epoch {self.state.epoch}) "
                f"in {config.checkpoint.dir}"
            )
        if self.state.restarted_best:
            self.reporter.print(
                "note: this run validated per slice before; validation now scores whole volumes, so the best "
                "tag and the validation history start again from the next validation"
            )
        self.stop_policy.install()
        self.reporter.start_progress(self.total_steps, self.step)
        return saved

    def _log(self, losses: dict[str, float]) -> None:
        epoch = self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch
        values = step_values(losses, self.g_engine, self.d_engine, epoch, self.timer, self.throughput)
        self.reporter.log(values, self.step)
        self.reporter.progress(self.step, progress_values(losses, values))

    def _after_step(self, losses: dict[str, float]) -> bool:
        """Logging, validation and saving due at this step; True when every rank stops here (a SIGTERM,
        or the CPU budget spent: ``self.stop`` says which)."""
        config, step = self.config, self.step
        self.stop = self.stop_policy.check(step, self.state.train_cpu_seconds)
        last = step == self.total_steps or (self.stop is not None and self.stop.kind == "cpu_budget")
        if step % config.logging.log_every_steps == 0 or last:
            self._log(losses)
        if step % config.logging.image_every_steps == 0 and self.context.is_main:
            batch, fake = self._last_images
            grid = validation.training_images(batch, fake)
            self.reporter.log_images("train/images", grid, step, caption=validation.IMAGE_CAPTION)
        if step % config.training.val_every_steps == 0 or last:
            self._validate_and_keep_best()
        if step % config.checkpoint.every_steps == 0 and self.last_saved != step:
            self.save()
        return self.stop is not None

    def _train_epoch(self) -> None:
        """Steps through the current epoch from where it stands, to its end, the last step or a stop."""
        epoch = self.state.epoch
        stream = self.train_stream(epoch=epoch, skip_batches=self.state.batch_in_epoch)
        batches = iter(make_loader(stream, self.config.data.num_workers))
        while self.state.epoch == epoch and self.step < self.total_steps:
            started, cpu_started = time.perf_counter(), time.process_time()
            batch = self._to_device(next(batches))
            fetched = time.perf_counter()
            losses = self.train_step(batch)
            self.state.advance(self.batches_per_epoch)
            self.state.train_cpu_seconds += time.process_time() - cpu_started
            self.throughput.add(fetched - started, time.perf_counter() - started)
            if self._after_step(losses):
                self.reporter.print(self.stop.message)
                return

    def fit(self) -> None:
        """Train to ``total_steps`` (or a SIGTERM agreed by all ranks, or the CPU budget spent), saving on
        the way and at the end; the run record's last version says what stopped it."""
        self._start()
        if self.step < self.total_steps:
            # resumed with the budget already spent (or a SIGTERM already in): nothing more to train
            self.stop = self.stop_policy.check(self.step, self.state.train_cpu_seconds, resuming=True)
            if self.stop is not None:
                self.reporter.print(self.stop.message)
        while self.step < self.total_steps and self.stop is None:
            self._train_epoch()
        if self.last_saved != self.step:
            self.save()
        self._write_record(self.stop.kind if self.stop is not None else "total_steps")
        self.reporter.finish()
        if self.stop is None or self.stop.kind != "sigterm":
            self.reporter.print(
                f"done: {self.step} steps, {self.state.train_cpu_seconds:.0f} s of training-loop CPU time; "
                f"checkpoints in {self.config.checkpoint.dir}"
            )


def _load_resumed_model_config(config: Config) -> Config:
    """On resume the architecture comes from the checkpoint's config, not the flags (as in nanoGPT)."""
    layout = CheckpointLayout(Path(config.checkpoint.dir))
    if not config.checkpoint.resume or not layout.latest_file().is_file():
        return config
    saved = load_config(layout.config_file, saved=True)
    if saved.model != config.model:
        print(f"note: resuming keeps the model architecture saved in {layout.config_file}", file=sys.stderr)
        config.model = saved.model
    return config


def train(config: Config, context: DistributedContext) -> None:
    """Train (or resume) the run ``config`` describes on every rank of an initialised process group.
    Problems a user can fix raise UserError."""
    config = _load_resumed_model_config(config)
    trainer = GANTrainer(config, context)
    if context.is_main:
        print(config.to_yaml(), flush=True)
    trainer.fit()
    barrier()
