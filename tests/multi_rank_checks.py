"""Checks that need real ranks, run in one process group to spare DeepSpeed launches (tests/test_training.py
starts it once on 1 rank with ``--validation-only`` and once on 2 with ``deepspeed``):

1. the EMA follows the optimizer's fp32 masters under bf16 with ZeRO 2 (a bf16 copy would lose the update);
2. validation scores of fixed weights on the whole val split, to compare across world sizes;
3. ``python -m medgan --mode test`` on a raw folder (rank 0 shards and evaluates, the others wait).

Each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from medgan.config import load_config
from medgan.distributed import DistributedContext, init_distributed, set_thread_share
from medgan.training.ema import ExponentialMovingAverage
from medgan.training.trainer import GANTrainer

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {
    "generator": {
        "arch": "ssm", "base_channels": 8, "depth": 2, "ssm_levels": [1], "ssm_state": 4, "condition_dim": 8,
        "attention_heads": 2,
    },
    "discriminator": {"base_channels": 8, "layers": 2},
}  # fmt: skip


def ema_under_bf16_zero2(context: DistributedContext) -> dict[str, float]:
    """One Adam step of lr 1e-4 on a weight of 1.0: the fp32 master moves to 0.9999, the bf16 weight (step
    2**-8 below 1) stays 1.0. Returns the weight, master and EMA extremes and the EMA's error."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    settings = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": context.world_size,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=settings)
    ema = ExponentialMovingAverage(engine.module, decay=0.999)
    engine.backward(engine(torch.ones(1, 8, dtype=torch.bfloat16)).float().sum())
    engine.step()
    ema.update(engine.module, engine.global_steps)
    master = safe_get_full_fp32_param(engine.module.weight).float().cpu()
    expected = 1.0 + (1.0 - ema.decay_at(engine.global_steps)) * (master - 1.0)
    shadow = ema.shadow["weight"].cpu()
    weight = engine.module.weight.detach().float()
    return {
        "weight_min": float(weight.min()),
        "weight_max": float(weight.max()),
        "master_max": float(master.max()),
        "ema_max": float(shadow.max()),
        "ema_error": float((shadow - expected).abs().max()),
    }


def validation_scores(shards: str, out: Path, context: DistributedContext) -> dict[str, float]:
    """The trainer's validation of its seeded initial weights (EMA = weights) on the whole val split."""
    overrides = {
        "model": TINY_MODEL,
        "data": {
            "data_path": shards, "input_modalities": [], "target_modality": "any", "batch_size": 2,
            "num_workers": 0,
        },
        "training": {"val_max_subjects": 0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "logging": {"wandb": "disabled", "progress_bar": False},
        "checkpoint": {"dir": str(out / "validation")},
    }  # fmt: skip
    config = load_config(REPO / "configs" / "demo.yaml", overrides)
    return GANTrainer(config, context).validate()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--validation-only", action="store_true")
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank
    context = init_distributed()
    set_thread_share(context)
    results: dict = {}
    if not args.validation_only:
        results["ema"] = ema_under_bf16_zero2(context)
    results["validation"] = validation_scores(args.shards, args.out, context)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.validation_only:
        from medgan.__main__ import main as medgan

        # last: rank 0 then evaluates alone, and the other ranks leave
        results["front_door_exit"] = medgan(
            [
                "--mode", "test", "--data_path", args.raw, "--checkpoint_dir", str(args.out / "front"),
                "--checkpoint_file", args.checkpoint, "--input_modalities", "t1", "t2",
                "--target_modality", "flair", "--batch_size", "2",
            ]
        )  # fmt: skip
    (args.out / f"rank{context.rank}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
