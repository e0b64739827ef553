"""The GAN engine in process: the losses, one train_step, validation against scoring by hand, TrainState."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import REPO

from medgan.checkpointing import CheckpointError, read_best_tag, read_run_record, tag_for_step
from medgan.config import load_config
from medgan.distributed import init_distributed
from medgan.models.blocks import MultiDirectionS6
from medgan.shards import ChannelMap, subject_stacks
from medgan.training import validation
from medgan.training.gan_step import discriminator_loss, generator_adversarial_loss, weighted_l1
from medgan.training.loader import make_loader, validation_task
from medgan.training.state import TrainState
from medgan.training.step_logging import ThroughputMeter
from medgan.training.stopping import Stop, StopPolicy
from medgan.training.trainer import GANTrainer

TINY_RUN = {
    "model": {
        "generator": {
            "arch": "ssm", "base_channels": 8, "depth": 2, "ssm_levels": [1], "ssm_state": 4,
            "condition_dim": 8, "attention_heads": 2,
        },
        "discriminator": {"base_channels": 8, "layers": 2},
    },
    "data": {"batch_size": 2, "num_workers": 0},
    "training": {"max_steps": 2, "val_max_subjects": 2},
    "deepspeed": {"zero_stage": 0},
    "logging": {"wandb": "disabled", "progress_bar": False},
}  # fmt: skip


def test_lsgan_and_hinge_losses():
    real, fake = torch.tensor([1.0, 0.5, -1.0]), torch.tensor([0.0, 2.0, -0.5])
    # LSGAN: D pulls real logits to 1 and fake ones to 0; G pulls fake logits to 1
    expected_d = 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())
    torch.testing.assert_close(discriminator_loss("lsgan", real, fake), expected_d)
    torch.testing.assert_close(generator_adversarial_loss("lsgan", fake), ((fake - 1) ** 2).mean())
    # hinge: D's margins at +1 / -1, G raises the fake logits
    expected_hinge = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    torch.testing.assert_close(discriminator_loss("hinge", real, fake), expected_hinge)
    torch.testing.assert_close(generator_adversarial_loss("hinge", fake), -fake.mean())
    # bf16 logits are scored in fp32
    assert discriminator_loss("lsgan", real.bfloat16(), fake.bfloat16()).dtype == torch.float32


def test_train_state_round_trips_and_refuses_another_world_size():
    state = TrainState(
        step=7, epoch=1, batch_in_epoch=2, best_psnr=21.5, best_step=4, validations=[[4, 21.5]]
    )
    saved = state.to_client_state(world_size=2, samples_per_step=8)
    assert saved["samples_consumed"] == 56
    assert TrainState.from_client_state(saved, world_size=2, where="runs/x") == state
    with pytest.raises(CheckpointError, match="runs/x: saved with 2 ranks, resumed with 4"):
        TrainState.from_client_state(saved, world_size=4, where="runs/x")
    for _ in range(3):
        state.advance(batches_per_epoch=5)
    assert (state.step, state.epoch, state.batch_in_epoch) == (10, 2, 0)


def test_a_run_that_validated_per_slice_resumes_with_its_best_started_again():
    saved = TrainState(step=7, best_psnr=30.0, best_step=4, validations=[[4, 30.0]]).to_client_state(1, 8)
    del saved["validation_score"]  # as checkpoints from before whole-volume validation are
    resumed = TrainState.from_client_state(saved, world_size=1, where="runs/x")
    assert resumed.step == 7 and resumed.restarted_best
    assert (resumed.best_psnr, resumed.best_step, resumed.validations) == (float("-inf"), None, [])


def test_throughput_meter_reports_a_window():
    meter = ThroughputMeter(images_per_step=8)
    meter.add(data_seconds=0.1, total_seconds=1.0)
    meter.add(data_seconds=0.3, total_seconds=1.0)
    values = meter.pop()
    assert values == pytest.approx({"perf/images_per_s": 8.0, "perf/data_wait_pct": 20.0, "perf/step_s": 1.0})
    assert meter.steps == 0


@pytest.fixture(scope="module")
def trainer(phantom_shards, tmp_path_factory):
    """A tiny trainer on a 1-rank gloo group in this process; the environment and group are restored.

    DeepSpeed's shared-memory all-reduce only speeds up several CPU ranks; marking it unavailable here
    spares the unit tests its JIT build (about 80 s on a fresh machine)."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    shm_available = compatible.get("deepspeed_shm_comm")
    compatible["deepspeed_shm_comm"] = False
    environment = dict(os.environ)
    overrides = {
        **TINY_RUN,
        "data": {**TINY_RUN["data"], "data_path": str(phantom_shards)},
        "checkpoint": {"dir": str(tmp_path_factory.mktemp("trainer"))},
    }
    config = load_config(REPO / "configs" / "demo.yaml", overrides)
    context = init_distributed()
    try:
        yield GANTrainer(config, context)
    finally:
        dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
        compatible["deepspeed_shm_comm"] = shm_available


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_train_step_updates_both_networks_and_g_leaves_d_untouched(trainer):
    batch = trainer._to_device(next(iter(make_loader(trainer.train_stream(), 0))))
    g_before, d_before = _copy(trainer.g_engine.module), _copy(trainer.d_engine.module)
    losses = trainer.train_step(batch)
    assert set(losses) == {"loss_d", "loss_g", "loss_adv", "loss_l1"}
    assert all(np.isfinite(value) for value in losses.values())
    assert losses["loss_g"] == pytest.approx(losses["loss_adv"] + 100.0 * losses["loss_l1"], rel=1e-5)
    g_after, d_after = trainer.g_engine.module.state_dict(), trainer.d_engine.module.state_dict()
    assert any(not torch.equal(g_before[k], g_after[k]) for k in g_before), "G took an optimizer step"
    assert any(not torch.equal(d_before[k], d_after[k]) for k in d_before), "D took an optimizer step"
    discriminator = trainer.d_engine.module
    assert all(p.requires_grad for p in discriminator.parameters()), "D is unfrozen after G's step"
    # G's adversarial term went through a frozen D: no gradient reached D's parameters after D's step
    assert all(p.grad is None or not p.grad.any() for p in discriminator.parameters())


def test_validate_scores_whole_val_volumes_as_by_hand(trainer):
    """Validation runs the EMA generator on every slice of each val subject (the first
    val_max_subjects) and scores per volume over the brain: the mean of the volumes' PSNR/MAE."""
    summary = trainer.validate()
    model = trainer._evaluation_generator()
    limit = trainer.config.training.val_max_subjects
    channels = ChannelMap(trainer.val_split.modalities, trainer.canonical, trainer.val_split.directory)
    psnrs, maes, slices = [], [], 0
    with torch.no_grad():
        for subject in list(subject_stacks(trainer.val_split.shards, channels))[:limit]:
            inputs, target = validation_task(subject.present, trainer.task, subject.subject)
            available = torch.zeros(len(trainer.canonical), dtype=torch.bool)
            available[inputs] = True
            images = torch.from_numpy(subject.images)
            count = images.shape[0]
            fake = model(images, available.expand(count, -1), torch.full((count,), target))[:, 0].numpy()
            pred, real, brain = fake * subject.mask, subject.images[:, target], subject.mask
            psnrs.append(10 * np.log10(1 / np.mean((pred[brain] - real[brain]) ** 2)))
            maes.append(np.mean(np.abs(pred[brain] - real[brain])))
            slices += count
    assert summary["val/volumes"] == len(psnrs) == min(limit, len(trainer.val_split.subjects))
    assert summary["val/slices"] == slices
    assert summary["val/psnr"] == pytest.approx(np.mean(psnrs), rel=1e-4)
    assert summary["val/mae"] == pytest.approx(np.mean(maes), rel=1e-4)
    assert np.isfinite(summary["val/through_plane_error"])


def test_tumour_weighted_l1_equals_a_hand_computation():
    fake = torch.tensor([[[[0.0, 0.5], [1.0, 1.5]]]])
    real = torch.tensor([[[[0.25, 0.5], [0.5, 1.0]]]])
    seg = torch.tensor([[[[0, 2], [4, 0]]]], dtype=torch.uint8)
    # errors 0.25, 0, 0.5, 0.5; weights 1, 4, 4, 1 with tumour_weight 3
    assert weighted_l1(fake, real, seg, 3.0).item() == pytest.approx((0.25 + 0 + 4 * 0.5 + 0.5) / 4)
    assert weighted_l1(fake, real, seg, 0.0).item() == pytest.approx((0.25 + 0 + 0.5 + 0.5) / 4)
    assert weighted_l1(fake, real, None, 3.0).item() == pytest.approx((0.25 + 0 + 0.5 + 0.5) / 4)


def test_train_step_weights_the_tumour_when_asked(trainer, monkeypatch):
    batch = trainer._to_device(next(iter(make_loader(trainer.train_stream(), 0))))
    assert batch["seg"].dtype == torch.uint8
    seen = []
    monkeypatch.setattr(trainer.config.training, "tumour_l1_weight", 2.0)
    monkeypatch.setattr(
        "medgan.training.gan_step.weighted_l1",
        lambda fake, real, seg, weight: seen.append((seg, weight)) or fake.mean(),
    )
    trainer.train_step(batch)
    assert seen and seen[0][0] is batch["seg"] and seen[0][1] == 2.0


def test_validation_logs_each_s6_blocks_scan_share(trainer):
    summary = trainer.validate()
    model = trainer._evaluation_generator()
    blocks = [name for name, m in model.named_modules() if isinstance(m, MultiDirectionS6)]
    assert blocks
    assert {f"model/scan_share/{name}" for name in blocks} == {k for k in summary if "scan_share" in k}
    assert all(0 < summary[f"model/scan_share/{name}"] < 10 for name in blocks)


def test_adversarial_weight_zero_trains_g_on_l1_alone_and_leaves_d_unrun(trainer, monkeypatch):
    batch = trainer._to_device(next(iter(make_loader(trainer.train_stream(), 0))))
    monkeypatch.setattr(trainer.config.training, "adversarial_weight", 0.0)
    calls = []
    discriminator = trainer.d_engine.module
    hook = discriminator.register_forward_hook(lambda *_: calls.append(1))
    g_before, d_before = _copy(trainer.g_engine.module), _copy(discriminator)
    try:
        losses = trainer.train_step(batch)
    finally:
        hook.remove()
    assert set(losses) == {"loss_g", "loss_l1"}
    assert losses["loss_g"] == pytest.approx(100.0 * losses["loss_l1"], rel=1e-5)
    assert not calls, "the discriminator ran in an L1-only step"
    assert all(torch.equal(d_before[k], v) for k, v in discriminator.state_dict().items())
    assert any(not torch.equal(g_before[k], v) for k, v in trainer.g_engine.module.state_dict().items())


def test_adversarial_weight_scales_the_adversarial_term(trainer, monkeypatch):
    batch = trainer._to_device(next(iter(make_loader(trainer.train_stream(), 0))))
    monkeypatch.setattr(trainer.config.training, "adversarial_weight", 0.25)
    losses = trainer.train_step(batch)
    assert losses["loss_g"] == pytest.approx(0.25 * losses["loss_adv"] + 100.0 * losses["loss_l1"], rel=1e-5)


def test_cpu_budget_stops_training_with_validation_and_a_checkpoint(trainer, monkeypatch):
    """A budget of one CPU microsecond is spent by the first step: the run validates, saves, says why."""
    monkeypatch.setattr(trainer.config.training, "cpu_budget_seconds", 1e-6)
    monkeypatch.setattr(trainer, "total_steps", trainer.step + 50)
    monkeypatch.setattr(trainer.config.training, "val_every_steps", 1000)
    monkeypatch.setattr(trainer.config.checkpoint, "every_steps", 1000)
    monkeypatch.setattr(trainer, "state", TrainState(step=trainer.step))
    monkeypatch.setattr(trainer, "stop", None)
    validated, printed = [], []
    monkeypatch.setattr(trainer, "_validate_and_keep_best", lambda: validated.append(trainer.step))
    monkeypatch.setattr(trainer, "_start", lambda: None)
    monkeypatch.setattr(trainer.reporter, "print", printed.append)
    start = trainer.step
    trainer.fit()
    assert trainer.step == start + 1 and validated == [start + 1]
    assert trainer.last_saved == trainer.step
    assert trainer.state.train_cpu_seconds > 0
    assert any(line.startswith("CPU budget spent:") and f"at step {start + 1}" in line for line in printed)
    saved = trainer.state.to_client_state(world_size=1, samples_per_step=2)
    assert TrainState.from_client_state(saved, 1, "x").train_cpu_seconds == trainer.state.train_cpu_seconds
    record = read_run_record(trainer.config.checkpoint.dir)
    assert record["stopped_by"] == "cpu_budget" and record["steps"] == start + 1


def test_a_run_resumed_with_its_budget_spent_trains_no_further(trainer, monkeypatch):
    monkeypatch.setattr(trainer.config.training, "cpu_budget_seconds", 5.0)
    monkeypatch.setattr(trainer, "total_steps", trainer.step + 50)
    monkeypatch.setattr(trainer, "state", TrainState(step=trainer.step, train_cpu_seconds=5.0))
    monkeypatch.setattr(trainer, "stop", None)
    monkeypatch.setattr(trainer, "last_saved", trainer.step)
    monkeypatch.setattr(trainer, "_start", lambda: None)
    monkeypatch.setattr(trainer, "train_step", lambda batch: pytest.fail("trained past a spent budget"))
    printed = []
    monkeypatch.setattr(trainer.reporter, "print", printed.append)
    start = trainer.step
    trainer.fit()
    assert trainer.step == start
    assert any(line.startswith("CPU budget spent before this start") for line in printed)


def test_a_sigterm_during_the_ranks_agreement_is_not_lost(trainer, monkeypatch):
    """The signal lands while the all-reduce runs (where a rank waits for the others): the agreement of
    that step says "go on", and the next step must still stop."""
    monkeypatch.setattr(trainer, "state", TrainState(step=7))
    monkeypatch.setattr(trainer, "total_steps", 100)
    monkeypatch.setattr(trainer.stop_policy, "sigterm_received", False)
    monkeypatch.setattr(trainer, "stop", None)

    def signal_during_agreement(value: float) -> float:
        trainer.stop_policy.handle_sigterm(15, None)
        return value  # the other ranks had no signal when the all-reduce started

    monkeypatch.setattr("medgan.training.stopping.max_over_ranks", signal_during_agreement)
    assert trainer._after_step({"loss_g": 1.0, "loss_l1": 0.01}) is False
    assert trainer._after_step({"loss_g": 1.0, "loss_l1": 0.01}) is True
    assert trainer.stop == Stop("sigterm", "SIGTERM: stopping at step 7")


def test_one_all_reduce_per_check_decides_both_the_sigterm_and_the_budget(trainer, monkeypatch):
    """The budget and the SIGTERM flag travel in one collective, and a SIGTERM outranks a spent budget."""
    calls = []
    monkeypatch.setattr(trainer.config.training, "cpu_budget_seconds", 5.0)
    monkeypatch.setattr(trainer, "state", TrainState(step=7, train_cpu_seconds=1.0))
    monkeypatch.setattr(trainer, "total_steps", 100)
    monkeypatch.setattr(trainer.stop_policy, "sigterm_received", False)
    monkeypatch.setattr("medgan.training.stopping.max_over_ranks", lambda value: calls.append(value) or value)
    assert trainer._after_step({"loss_g": 1.0, "loss_l1": 0.01}) is False
    assert len(calls) == 1, "one collective per check"
    policy = StopPolicy(trainer.config.training)
    assert policy.check(7, 4.9) is None
    assert policy.check(7, 5.0).kind == "cpu_budget"
    policy.handle_sigterm(15, None)
    assert policy.check(7, 5.0) == Stop("sigterm", "SIGTERM: stopping at step 7")
    monkeypatch.setattr(trainer.config.training, "cpu_budget_seconds", 0.0)
    assert StopPolicy(trainer.config.training).check(7, 1e9) is None, "no budget: never spent"


def test_the_run_record_holds_steps_cpu_time_parameters_and_every_validation(trainer, monkeypatch):
    """Two steps validated each: the record (read through checkpointing) after each validation and at the
    end, at full precision, with the best tag the trainer marked."""
    start = trainer.step
    monkeypatch.setattr(trainer, "total_steps", start + 2)
    monkeypatch.setattr(trainer.config.training, "val_every_steps", 1)
    monkeypatch.setattr(trainer.config.training, "cpu_budget_seconds", 0.0)
    monkeypatch.setattr(trainer, "state", TrainState(step=start))
    monkeypatch.setattr(trainer, "stop", None)
    monkeypatch.setattr(trainer, "_start", lambda: None)
    scored, written = [], []
    validate = trainer.validate
    monkeypatch.setattr(trainer, "validate", lambda: scored.append(validate()) or scored[-1])
    write = trainer.checkpoints.write_run_record
    monkeypatch.setattr(trainer.checkpoints, "write_run_record", lambda r: written.append(r) or write(r))
    trainer.fit()
    record = read_run_record(trainer.config.checkpoint.dir)
    psnrs = [summary["val/psnr"] for summary in scored]
    assert record["validations"] == [[start + 1, psnrs[0]], [start + 2, psnrs[1]]]
    best = start + 1 + int(np.argmax(psnrs))
    assert (record["best_step"], record["best_tag"]) == (best, read_best_tag(trainer.config.checkpoint.dir))
    assert record["best_tag"] == tag_for_step(best) and record["best_val_psnr"] == max(psnrs)
    assert record["steps"] == start + 2 and record["stopped_by"] == "total_steps"
    assert record["epochs"] == pytest.approx((start + 2) / trainer.batches_per_epoch)
    assert record["train_cpu_seconds"] == trainer.state.train_cpu_seconds > 0
    assert (record["generator_parameters"], record["discriminator_parameters"]) == trainer.parameter_counts
    # rewritten after the first validation, while the run was still going
    assert any(r["validations"] == record["validations"][:1] and r["stopped_by"] is None for r in written)


def test_volume_views_show_three_planes_superior_up():
    depth, size = 6, 8
    real = np.zeros((depth, size, size), np.float32)
    real[-1] = 1.0  # the top slice bright
    synthesized = real.copy()
    synthesized[:, 0, 0] = 0.5
    grid = validation.volume_views([real, synthesized, real])
    assert grid.dtype == np.uint8 and grid.shape == (size + 2 * depth, 4 * size)
    coronal, sagittal = grid[size : size + depth], grid[size + depth :]
    for plane in (coronal, sagittal):
        assert (plane[0, :size] == 255).all() and not plane[1:, :size].any(), "superior (last slice) is up"
    assert grid[size + depth :, 3 * size : 4 * size].max() == 0  # no error in the middle sagittal plane
