"""The DeepSpeed GAN engine: two engines (generator, discriminator), streaming shards, EMA, validation,
crash-safe checkpoints, SIGTERM handling and rank-0 reporting. ``launch/train.py`` calls :func:`main`.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.errors import DataError
from data_prep.shard_reader import ShardFolder
from medgan.checkpointing import (
    CheckpointError,
    CheckpointLayout,
    CheckpointManager,
    provenance,
    tag_for_step,
)
from medgan.config import Config, ConfigError, load_config
from medgan.distributed import (
    DistributedContext,
    all_gather_objects,
    all_ranks_agree,
    barrier,
    max_over_ranks,
)
from medgan.models.conditioning import condition_stack
from medgan.models.discriminator import PatchDiscriminator
from medgan.models.generator import build_generator, count_parameters, recording_scan_share
from medgan.scoring import METRICS, MODEL, SliceScore, per_subject_means, slice_scores, summarize_scores
from medgan.training.ema import ExponentialMovingAverage, full_fp32_state
from medgan.training.loader import SliceStream, TaskSpec, make_loader
from medgan.training.tracking import SilentReporter, image_grid, make_reporter

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_settings(config: Config, world_size: int) -> dict[str, Any]:
    """The one place our config becomes DeepSpeed's config dict."""
    settings = config.deepspeed
    if settings.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.precision: fp16 needs a GPU (use bf16 or fp32 on the CPU)")
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "train_batch_size": config.data.batch_size * settings.gradient_accumulation_steps * world_size,
        "gradient_clipping": settings.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.precision == "bf16"},
        "fp16": {"enabled": settings.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # our optimizers are plain torch Adam (no JIT-built fused kernels needed on the CPU)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def lr_factor(config: Config, batches_per_epoch: int):
    """The LR multiplier per optimizer step: the seed's constant-then-step decay, linear, or constant."""
    training = config.training
    accumulation = config.deepspeed.gradient_accumulation_steps

    def factor(optimizer_step: int) -> float:
        epoch = optimizer_step * accumulation / batches_per_epoch
        if training.lr_schedule == "step":
            return training.lr_decay_factor ** int(epoch // training.lr_decay_epoch)
        if training.lr_schedule == "linear":
            if epoch < training.lr_decay_epoch:
                return 1.0
            span = max(1.0, training.epochs - training.lr_decay_epoch)
            return max(0.0, 1.0 - (epoch - training.lr_decay_epoch) / span)
        return 1.0

    return factor


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return 0.5 * (((real_logits - 1) ** 2).mean() + (fake_logits**2).mean())


def generator_adversarial_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits.mean()
    return ((fake_logits - 1) ** 2).mean()


def weighted_l1(fake: torch.Tensor, real: torch.Tensor, seg: torch.Tensor | None, tumour_weight: float):
    """``mean(weight * |fake - real|)`` over all pixels, ``weight = 1 + tumour_weight`` where ``seg > 0``
    and 1 elsewhere (``training.tumour_l1_weight``); ``tumour_weight = 0`` or no ``seg`` is the plain mean.
    ``fake, real [B, 1, H, W]``, ``seg [B, 1, H, W]`` (any integer labels) or None; computed in fp32."""
    error = (fake.float() - real.float()).abs()
    if tumour_weight == 0 or seg is None:
        return error.mean()
    return (error * (1 + tumour_weight * (seg > 0).float())).mean()


def _rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _cast_floating_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """ZeRO 3 casts parameters but not buffers to bf16/fp16; spectral norm's power-iteration vectors are
    buffers and must match the weights' dtype."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


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


def build_engines(config: Config, world_size: int, batches_per_epoch: int):
    """((generator engine, discriminator engine), their parameter counts): both networks from the config,
    each with its Adam and LR schedule, wrapped by DeepSpeed with :func:`deepspeed_settings` (counted
    before ZeRO 3 partitions them)."""
    import deepspeed

    dtype = PRECISION_DTYPES[config.deepspeed.precision]
    modalities = len(config.model.generator.modalities)
    settings = deepspeed_settings(config, world_size)
    factor = lr_factor(config, batches_per_epoch)
    engines, counts = [], []
    for module, lr in (
        (build_generator(config.model.generator), config.training.lr_g),
        (PatchDiscriminator(config.model.discriminator, modalities), config.training.lr_d),
    ):
        counts.append(count_parameters(module))
        _cast_floating_buffers(module, dtype)
        optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=tuple(config.training.betas))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=settings
        )
        engines.append(engine)
    return tuple(engines), tuple(counts)


@dataclass(slots=True)
class TrainState:
    """Where training is: optimizer steps taken, the epoch and the batch within it, the best validation
    PSNR so far, the training loop's CPU seconds (``training.cpu_budget_seconds``). Travels in the
    generator checkpoint's client state with what a resume must check."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_psnr: float = float("-inf")
    train_cpu_seconds: float = 0.0

    def to_client_state(self, world_size: int, samples_per_step: int) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_psnr": self.best_psnr,
            "train_cpu_seconds": self.train_cpu_seconds,
            "samples_consumed": self.step * samples_per_step,
            "world_size": world_size,
        }

    @staticmethod
    def from_client_state(state: dict[str, Any], world_size: int, where: str) -> TrainState:
        """The saved position; another world size is a CheckpointError (the sample order depends on it)."""
        if state.get("world_size") != world_size:
            raise CheckpointError(
                f"{where}: saved with {state.get('world_size')} ranks, resumed with {world_size}; the "
                "sample order depends on it (start a new checkpoint_dir)"
            )
        return TrainState(
            step=state["step"],
            epoch=state["epoch"],
            batch_in_epoch=state["batch_in_epoch"],
            best_psnr=state.get("best_psnr", float("-inf")),
            train_cpu_seconds=state.get("train_cpu_seconds", 0.0),
        )

    def advance(self, batches_per_epoch: int) -> None:
        """One batch consumed (the epoch turns over after its last batch)."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0


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
        self.train_split = shards.split("train")
        self.val_split = shards.split("val")
        self.canonical = list(config.model.generator.modalities)
        self.task = TaskSpec.from_names(
            config.data.input_modalities, config.data.target_modality, self.canonical
        )
        global_batch = config.data.batch_size * context.world_size
        self.batches_per_epoch = self.train_split.samples // global_batch
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{config.data.data_path}: the train split has {self.train_split.samples} samples, "
                f"fewer than "
                f"one global batch ({config.data.batch_size} per rank x {context.world_size} ranks)"
            )
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
        # set by the SIGTERM handler only, never cleared: an assignment of the ranks' agreement to the same
        # attribute could overwrite a signal that arrived during the all-reduce (a lost SIGTERM)
        self.sigterm_received = False
        self.stop_requested = False
        self.stop_reason = ""
        self.reporter: SilentReporter = SilentReporter()
        self.timer = PhaseTimer()
        self.throughput = ThroughputMeter(config.data.batch_size * context.world_size)
        self.last_saved = -1

    @property
    def step(self) -> int:
        return self.state.step

    # ----------------------------------------------------------------------------------------- state
    def _client_state(self) -> dict[str, Any]:
        return {
            **self.state.to_client_state(
                self.context.world_size, self.config.data.batch_size * self.context.world_size
            ),
            "wandb_run_id": self.reporter.run_id,
            "config": self.config.to_dict(),
            "provenance": self.provenance,
            "rng": _rng_states(),
        }

    def resume(self) -> dict[str, Any] | None:
        """Load ``latest`` when there is one (the same command resumes a run)."""
        if not self.config.checkpoint.resume:
            return None
        saved = self.checkpoints.load(self.g_engine, self.d_engine, self.ema)
        if saved is None:
            return None
        self.state = TrainState.from_client_state(saved, self.context.world_size, self.config.checkpoint.dir)
        _restore_rng_states(saved["rng"])
        self.last_saved = self.state.step
        return saved

    def save(self) -> str:
        # the checkpoint keeps one rank's client state: the budget's "any rank" must survive a resume
        self.state.train_cpu_seconds = max_over_ranks(self.state.train_cpu_seconds)
        tag = self.checkpoints.save(self.step, self.g_engine, self.d_engine, self.ema, self._client_state())
        self.last_saved = self.step
        self.reporter.print(f"saved checkpoint {self.checkpoints.layout.tag_dir(tag)}")
        return tag

    def slice_stream(self, train: bool, epoch: int = 0, skip_batches: int = 0) -> SliceStream:
        """This rank's batches of the train split (shuffled, from ``skip_batches`` of ``epoch``) or of the
        val split (one pass, deterministic tasks), as the config describes them."""
        data = self.config.data
        return SliceStream(
            self.train_split if train else self.val_split,
            self.canonical,
            self.task,
            data.batch_size,
            seed=self.config.training.seed,
            rank=self.context.rank,
            world_size=self.context.world_size,
            train=train,
            random_flips=train and data.random_flips,
            shuffle_buffer=data.shuffle_buffer,
            epoch=epoch,
            skip_batches=skip_batches,
        )

    # ------------------------------------------------------------------------------------------ step
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
        kind = self.config.training.gan_loss
        images, available, target_index, real = (
            batch["images"],
            batch["available"],
            batch["target_index"],
            batch["target"],
        )
        timer, training = self.timer, self.config.training
        adversarial_on = training.adversarial_weight > 0
        condition = condition_stack(images, available, target_index)
        with timer("g_forward"):
            fake = self.g_engine(images, available, target_index)

        losses: dict[str, float] = {}
        if adversarial_on:
            with timer("d_forward"):
                d_loss = discriminator_loss(
                    kind, self.d_engine(condition, real), self.d_engine(condition, fake.detach())
                )
            with timer("d_backward"):
                self.d_engine.backward(d_loss)
            with timer("d_optimizer"):
                self.d_engine.step()
            losses["loss_d"] = d_loss.item()

        # The adversarial term goes through D's module, not its engine, with D frozen: a second engine
        # forward would make ZeRO 2 reduce D's gradients twice ("already been reduced") and ZeRO 0 refuse.
        discriminator = self.d_engine.module
        for parameter in discriminator.parameters():
            parameter.requires_grad_(False)
        with timer("g_adversarial_forward"):
            # the L1 sees the unclamped output, so values outside [0, 1] are pulled back; D sees it too
            # (a fake outside the real's range is then an easy tell, a second pull back into range)
            l1 = weighted_l1(fake, real, batch.get("seg"), training.tumour_l1_weight)
            g_loss = training.l1_weight * l1
            if adversarial_on:
                adversarial = generator_adversarial_loss(kind, discriminator(condition, fake))
                g_loss = g_loss + training.adversarial_weight * adversarial
                losses["loss_adv"] = adversarial.item()
        with timer("g_backward"):
            self.g_engine.backward(g_loss)
        with timer("g_optimizer"):
            self.g_engine.step()
        for parameter in discriminator.parameters():
            parameter.requires_grad_(True)
        with timer("ema"):
            if self.ema is not None and self.g_engine.is_gradient_accumulation_boundary():
                self.ema.update(self.g_engine.module, self.g_engine.global_steps)
        self._last_images = (batch, fake.detach())
        # loss_d and loss_adv only when the discriminator trains (training.adversarial_weight > 0)
        return {**losses, "loss_g": g_loss.item(), "loss_l1": l1.item()}

    # ------------------------------------------------------------------------------------ validation
    def _evaluation_generator(self) -> torch.nn.Module:
        model = build_generator(self.config.model.generator).to(self.device)
        if self.ema is not None:
            self.ema.copy_to(model)
        else:
            model.load_state_dict(full_fp32_state(self.g_engine.module))
        return model.eval()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Masked PSNR/SSIM/MAE of the EMA generator on the val split (each rank a share): the mean and
        std over slices, and a per-subject table in W&B; ``model/scan_share/<block>``: each S6 block's
        ``rms(scan term) / rms(D * u)`` on this rank's first validation batch.

        Each slice's task depends on the slice alone and the means are over every rank's slices, so with
        ``training.val_max_batches 0`` (the whole split) the scores do not depend on the world size."""
        model = self._evaluation_generator()
        rows: list[SliceScore] = []
        shares: dict[str, float] = {}
        for index, batch in enumerate(make_loader(self.slice_stream(train=False), 0)):
            if self.config.training.val_max_batches and index >= self.config.training.val_max_batches:
                break
            # each S6 block's scan share, rms(scan term) / rms(D * u), on the first batch only (cheap)
            with recording_scan_share(model) if index == 0 else contextlib.nullcontext(shares) as recorded:
                fake = model(
                    batch["images"].to(self.device),
                    batch["available"].to(self.device),
                    batch["target_index"].to(self.device),
                )
            shares = recorded
            scores = slice_scores(fake.float().cpu()[:, 0], batch["target"][:, 0], batch["mask"][:, 0] > 0.5)
            for i, subject in enumerate(batch["subject"]):
                target = self.canonical[int(batch["target_index"][i])]
                rows.append(
                    SliceScore(
                        MODEL,
                        f"->{target}",
                        subject,
                        int(batch["slice"][i]),
                        "brain",
                        *(float(scores[name][i]) for name in METRICS),
                        int(batch["mask"][i].sum()),
                    )  # fmt: skip
                )
        # every slice's row, in one order on any world size: the means then agree to the last bit
        all_rows = sorted(
            (row for rank_rows in all_gather_objects(rows) for row in rank_rows),
            key=lambda row: (row.subject, row.slice),
        )
        summary: dict[str, float] = {"val/slices": len(all_rows)}
        summary.update({f"model/scan_share/{name}": share for name, share in shares.items()})
        for name, values in summarize_scores(all_rows).items():
            summary[f"val/{name}"] = values["mean"]
            summary[f"val/{name}_std"] = values["std"]
        table = per_subject_means(all_rows)
        self.reporter.log_table("val/per_subject", ["subject", "slices", *METRICS], table, self.step)
        return summary

    def _log_images(self) -> None:
        batch, fake = self._last_images
        count = min(4, fake.shape[0])
        available = batch["available"][:count].float()
        images = batch["images"][:count].float()
        first_input = (images * available[:, :, None, None]).amax(dim=1)
        real = batch["target"][:count, 0].float()
        synthesized = fake[:count, 0].float()
        columns = [first_input, synthesized, real, (synthesized - real).abs()]
        grid = image_grid([c.cpu().numpy() for c in columns])
        self.reporter.log_images(
            "train/images", grid, self.step, caption="inputs (max) | synthesized | real | |error|"
        )

    # ------------------------------------------------------------------------------------------ loop
    def _handle_sigterm(self, signum, frame) -> None:
        self.sigterm_received = True

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
        signal.signal(signal.SIGTERM, self._handle_sigterm)
        self.reporter.start_progress(self.total_steps, self.step)
        return saved

    def _log(self, losses: dict[str, float]) -> None:
        values = {
            **{f"train/{k}": v for k, v in losses.items()},
            "train/lr_g": self.g_engine.get_lr()[0],
            "train/lr_d": self.d_engine.get_lr()[0],
            "train/epoch": self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch,
            **{f"perf/{phase}_s": total / self.throughput.steps for phase, total in self.timer.pop().items()},
            **self.throughput.pop(),
        }
        for name, engine in (("g", self.g_engine), ("d", self.d_engine)):
            norm = engine.get_global_grad_norm()
            if norm is not None:
                values[f"train/grad_norm_{name}"] = float(norm)
        self.reporter.log(values, self.step)
        self.reporter.progress(
            self.step,
            {
                **{name: losses[name] for name in ("loss_g", "loss_d") if name in losses},
                "img/s": values["perf/images_per_s"],
                "data_wait_%": values["perf/data_wait_pct"],
            },
        )

    def _validate_and_keep_best(self) -> None:
        summary = self.validate()
        self.reporter.log(summary, self.step)
        self.reporter.print(
            f"step {self.step}: val PSNR {summary['val/psnr']:.2f} dB, SSIM {summary['val/ssim']:.4f}, "
            f"MAE {summary['val/mae']:.4f} over {summary['val/slices']} slices"
        )
        if summary["val/psnr"] > self.state.best_psnr:
            self.state.best_psnr = summary["val/psnr"]
            self.save()
            self.checkpoints.mark_best(tag_for_step(self.step))

    def _budget_spent(self) -> bool:
        """True on every rank once any rank's training loop has used ``training.cpu_budget_seconds``."""
        budget = self.config.training.cpu_budget_seconds
        return bool(budget) and all_ranks_agree(self.state.train_cpu_seconds >= budget)

    def _after_step(self, losses: dict[str, float]) -> bool:
        """Logging, validation and saving due at this step; True when every rank agrees to stop (a
        SIGTERM, or the CPU budget spent: ``self.stop_reason`` says which)."""
        config, step = self.config, self.step
        budget_spent = self._budget_spent()
        last = step == self.total_steps or budget_spent
        if step % config.logging.log_every_steps == 0 or last:
            self._log(losses)
        if step % config.logging.image_every_steps == 0 and self.context.is_main:
            self._log_images()
        if step % config.training.val_every_steps == 0 or last:
            self._validate_and_keep_best()
        if step % config.checkpoint.every_steps == 0 and self.last_saved != step:
            self.save()
        # a SIGTERM on any rank stops every rank at the same step
        self.stop_requested = all_ranks_agree(self.sigterm_received)
        if self.stop_requested:
            self.stop_reason = f"SIGTERM: stopping at step {step}"
        elif budget_spent:
            self.stop_reason = (
                f"CPU budget spent: {self.state.train_cpu_seconds:.0f} s of training loop "
                f"(training.cpu_budget_seconds {config.training.cpu_budget_seconds:g}) at step {step}"
            )
        return self.stop_requested or budget_spent

    def fit(self) -> None:
        """Train to ``total_steps`` (or a SIGTERM agreed by all ranks, or the CPU budget spent), saving on
        the way and at the end."""
        self._start()
        if self.step < self.total_steps and self._budget_spent():
            # resumed with the budget already spent: nothing more to train
            self.stop_reason = (
                f"CPU budget spent before this start: {self.state.train_cpu_seconds:.0f} s of training "
                f"loop at step {self.step}"
            )
            self.reporter.print(self.stop_reason)
        while self.step < self.total_steps and not self.stop_reason:
            epoch = self.state.epoch
            stream = self.slice_stream(train=True, epoch=epoch, skip_batches=self.state.batch_in_epoch)
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
                    self.reporter.print(self.stop_reason)
                    break
            del batches
            if self.stop_reason:
                break
        if self.last_saved != self.step:
            self.save()
        self.reporter.finish()
        if not self.stop_requested:
            self.reporter.print(
                f"done: {self.step} steps, {self.state.train_cpu_seconds:.0f} s of training-loop CPU time; "
                f"checkpoints in {self.config.checkpoint.dir}"
            )


def _load_resumed_model_config(config: Config) -> Config:
    """On resume the architecture comes from the checkpoint's config, not the flags (as in nanoGPT)."""
    layout = CheckpointLayout(Path(config.checkpoint.dir))
    if not config.checkpoint.resume or not layout.latest_file().is_file():
        return config
    saved = load_config(layout.config_file)
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
