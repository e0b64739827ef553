"""Training throughput and step-time breakdown of the GAN engine, SSM generator beside the U-Net baseline.

    python bench/train.py --data_path runs/demo/shards [--steps 20] [--warmup 3] [--config configs/demo.yaml]

Runs the real engine (one DeepSpeed rank, the config's ZeRO stage and precision) for ``--steps`` steps after
``--warmup`` and prints images/s, the time per phase (data, G forward, D forward/backward/optimizer, G's
adversarial forward, G backward/optimizer, EMA) and peak RSS, for ``model.generator.arch: ssm`` and then the
parameter-matched ``unet`` baseline. Without ``--data_path`` a small phantom is made and sharded first.
On a GPU, ``--precision bf16`` also reports the model FLOP utilisation against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# the repository first: bench/ (this script's folder, sys.path[0]) has a data_prep.py that would shadow
# the data_prep package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medgan.config import load_config  # noqa: E402
from medgan.distributed import init_distributed, set_thread_share  # noqa: E402
from medgan.training.loader import make_loader  # noqa: E402
from medgan.training.step_logging import PhaseTimer  # noqa: E402
from medgan.training.trainer import GANTrainer  # noqa: E402

PHASES = (
    "data",
    "g_forward",
    "d_forward",
    "d_backward",
    "d_optimizer",
    "g_adversarial_forward",
    "g_backward",
    "g_optimizer",
    "ema",
)


def make_phantom_shards(folder: Path, size: int) -> Path:
    raw, shards = folder / "raw", folder / "shards"
    for command in (
        [
            "phantom",
            "--layout",
            "brats",
            "--subjects",
            "6",
            "--out",
            str(raw),
            "--shape",
            str(size),
            str(size),
            "48",
        ],
        ["shard", "--format", "brats", "--src", str(raw), "--out", str(shards), "--size", str(size)],
    ):
        subprocess.run([sys.executable, "-m", "data_prep", *command], check=True, capture_output=True)
    return shards


def training_flops_per_image(trainer: GANTrainer, batch: dict) -> float | None:
    """FLOPs of one training step per image, counted by torch's FlopCounterMode (matmuls and convolutions;
    the scan's elementwise work is not counted, so MFU is a lower bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
    return counter.get_total_flops() / batch["images"].shape[0]


def measure(arch: str, args: argparse.Namespace, context) -> dict:
    overrides = {
        "data": {
            "data_path": str(args.data_path),
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
        },
        "model": {"generator": {"arch": arch}},
        "logging": {"wandb": "disabled", "progress_bar": False},
        "checkpoint": {"dir": tempfile.mkdtemp(prefix="bench_train_")},
    }
    if args.precision:
        overrides["deepspeed"] = {"precision": args.precision}
    config = load_config(args.config, overrides)
    trainer = GANTrainer(config, context)
    trainer.timer = PhaseTimer(synchronize=True)
    batches = iter(make_loader(trainer.train_stream(), config.data.num_workers))
    flops = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            trainer.timer.pop()
            started = time.perf_counter()
        with trainer.timer("data"):
            batch = trainer._to_device(next(batches))
        if step == 0 and args.mfu:
            flops = training_flops_per_image(trainer, batch)
            continue
        trainer.train_step(batch)
    elapsed = time.perf_counter() - started
    phases = {phase: seconds / args.steps for phase, seconds in trainer.timer.pop().items()}
    images = args.steps * config.data.batch_size * context.world_size
    return {
        "arch": arch,
        "parameters": trainer.parameter_counts[0],
        "images_per_s": images / elapsed,
        "step_s": elapsed / args.steps,
        "phases": phases,
        "flops_per_image": flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--data_path", type=Path, help="shard folder (default: a phantom made here)")
    parser.add_argument("--size", type=int, default=96, help="phantom in-plane size when no --data_path")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    parser.add_argument(
        "--archs", default="ssm,unet", help="comma-separated; the first is measured against the rest"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: this rank's share of the cores)")
    parser.add_argument("--mfu", action="store_true", help="count FLOPs (one extra step) and report MFU")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="accelerator peak (H100 SXM bf16 dense)"
    )
    args = parser.parse_args()

    context = init_distributed()
    threads = set_thread_share(context)
    if args.threads:
        torch.set_num_threads(args.threads)
        threads = args.threads
    if args.data_path is None:
        args.data_path = make_phantom_shards(Path(tempfile.mkdtemp(prefix="bench_train_data_")), args.size)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {threads} thread(s)"
    print(f"# {args.config}, shards {args.data_path}, batch {args.batch_size}, {device}")
    print(f"# torch {torch.__version__}, {args.steps} steps after {args.warmup} warm-up")
    results = [measure(arch, args, context) for arch in args.archs.split(",")]

    header = f"{'':24s}" + "".join(
        f"{r['arch'] + ' (' + format(r['parameters'], ',') + ' p)':>26s}" for r in results
    )
    print(header)
    print(f"{'images/s':24s}" + "".join(f"{r['images_per_s']:26.2f}" for r in results))
    print(f"{'step (ms)':24s}" + "".join(f"{1000 * r['step_s']:26.1f}" for r in results))
    for phase in PHASES:
        cells = []
        for r in results:
            seconds = r["phases"].get(phase, 0.0)
            cells.append(f"{1000 * seconds:17.1f} ms {100 * seconds / r['step_s']:4.0f}%")
        print(f"  {phase:22s}" + "".join(cells))
    if args.mfu:
        for r in results:
            if r["flops_per_image"]:
                achieved = r["flops_per_image"] * r["images_per_s"] / 1e12
                utilisation = 100 * achieved / args.peak_tflops
                print(f"{r['arch']}: {r['flops_per_image'] / 1e9:.2f} GFLOP/image, {achieved:.3f} TFLOP/s, "
                      f"MFU {utilisation:.2f}% of {args.peak_tflops:g} TFLOP/s")  # fmt: skip
    baseline = results[-1]
    print(f"{results[0]['arch']} runs at {results[0]['images_per_s'] / baseline['images_per_s']:.2f}x the "
          f"{baseline['arch']} baseline's images/s")  # fmt: skip
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
