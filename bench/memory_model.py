"""The per-GPU memory model of a config's training step, measured on the CPU (no GPU needed).

    python bench/memory_model.py [--config configs/brats.yaml] [--size 256] [--batch 16] [--gpu-gib 80]
                                 [--slab-slices S] [--arch ssm|unet|hybrid]

What a training step keeps on a GPU is (1) the tensors autograd saves for the backward (activations),
which grow with the batch, and (2) the weights, gradients and optimizer states, which do not. (1) is
measured here exactly, per top-level stage of the generator, as the bytes of the unique tensors that
autograd's saved-tensor hooks see during one forward of one sample (the scan's own saved tensors
included), in fp32 and in bf16 (the model and its inputs cast, as DeepSpeed's bf16 mode runs them), with
and without ``checkpoint_stages``. The discriminator's activations are measured the same way for its
three forwards per step (real, fake for D, fake for G's adversarial term). (2) is counted: DeepSpeed
bf16 with ZeRO keeps per parameter bf16 weights (2 bytes), fp32 master weights (4), bf16 and fp32
gradients (2 + 4) and Adam's two fp32 moments (8): 20 bytes, all on one rank here (ZeRO 1-3 divide the
last 16 over the ranks, so this is the one-GPU bound).

A generator that scans across slices (``arch: hybrid``) is measured on one slab of ``data.slab_slices``
slices (``--slab-slices`` overrides it), as it trains; its bytes are reported per slice, as the batch
counts slices.

What it leaves out, and the margin asks for: temporaries that live only inside one op (the largest is
about one activation of the largest layer), cuDNN workspaces, the CUDA context (about 0.5-1 GiB) and the
caching allocator's fragmentation (10-20%). ``bench/gpu.py`` measures the real peak on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medgan.config import load_config  # noqa: E402
from medgan.models.conditioning import condition_stack  # noqa: E402
from medgan.models.context import input_shape  # noqa: E402
from medgan.models.discriminator import PatchDiscriminator  # noqa: E402
from medgan.models.generator import build_generator  # noqa: E402

BYTES_PER_PARAMETER = 2 + 4 + 2 + 4 + 8
GIB = 2**30


class SavedBytes:
    """Bytes of the unique tensors autograd saves, attributed to the top-level child running when saved."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.current = "(between stages)"
        self.bytes: dict[str, int] = {}
        # the weights autograd saves (a convolution keeps its weight) are counted once, with the
        # optimizer's bytes, not per sample
        self.seen: set[tuple[int, int]] = {
            (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()
        }
        for name, child in model.named_children():
            # containers are never called themselves: attribute to their members (encoder.0, ...)
            members = (
                [(f"{name}.{n}", c) for n, c in child.named_children()]
                if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict))
                else [(name, child)]
            )
            for member_name, member in members:
                member.register_forward_pre_hook(lambda _m, _a, n=member_name: self._enter(n))
                member.register_forward_hook(lambda _m, _a, _o: self._enter("(between stages)"))

    def _enter(self, name: str) -> None:
        self.current = name

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.bytes[self.current] = self.bytes.get(self.current, 0) + storage.nbytes()
        return tensor

    def total(self) -> int:
        return sum(self.bytes.values())


def measure(model: torch.nn.Module, run) -> SavedBytes:
    saved = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        run()
    return saved


def generator_step(generator, dtype, size, slab_slices: int = 1):
    """One forward of one sample (a slab of ``slab_slices`` slices for a generator that scans across
    slices) and its mean: what :func:`measure` runs."""
    modalities = len(generator.config.modalities) if hasattr(generator, "config") else 5
    context = generator.config.context_slices if hasattr(generator, "config") else 0
    images = torch.rand(input_shape(slab_slices, modalities, size, size, context), dtype=dtype)
    available = torch.tensor([[True, True, True, False, False][:modalities]]).expand(slab_slices, -1)
    target = torch.full((slab_slices,), 3)
    if getattr(generator, "scans_across_slices", False):
        return lambda: generator(images, available, target, slab_slices=slab_slices).float().mean()
    return lambda: generator(images, available, target).float().mean()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/brats.yaml")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the config's)")
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--slab-slices", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--arch", choices=("ssm", "unet", "hybrid"), default=None, help="default: the config's"
    )
    args = parser.parse_args()
    config = load_config(args.config, {"model": {"generator": {"arch": args.arch}}} if args.arch else None)
    batch = args.batch or config.data.batch_size
    torch.manual_seed(0)
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        for checkpointing in (False, True):
            settings = dataclasses.replace(config.model.generator, checkpoint_stages=checkpointing)
            generator = build_generator(settings).to(dtype).train()
            slab = (
                (args.slab_slices or config.data.slab_slices)
                if getattr(generator, "scans_across_slices", False)
                else 1
            )
            run = generator_step(generator, dtype, args.size, slab)
            saved = measure(generator, run)
            saved.bytes = {name: count // slab for name, count in saved.bytes.items()}  # per slice
            rows[(dtype, checkpointing)] = saved
    generator_parameters = sum(p.numel() for p in generator.parameters())
    discriminator = PatchDiscriminator(config.model.discriminator, 5).to(torch.bfloat16)
    condition = condition_stack(
        torch.rand(1, 5, args.size, args.size, dtype=torch.bfloat16),
        torch.tensor([[True, True, True, False, False]]),
        torch.tensor([3]),
    )
    fake = torch.rand(1, 1, args.size, args.size, dtype=torch.bfloat16, requires_grad=True)
    d_saved = measure(discriminator, lambda: discriminator(condition, fake).float().mean()).total() * 3
    discriminator_parameters = sum(p.numel() for p in discriminator.parameters())

    names = list(rows[(torch.float32, False)].bytes)
    slabs = f", measured on a slab of {slab} slices" if slab > 1 else ""
    print(
        f"## Activation bytes per slice, {args.config} generator ({config.model.generator.arch}) at "
        f"{args.size} x {args.size}, one forward{slabs}"
    )
    print("| stage | fp32 MiB | bf16 MiB | bf16, checkpoint_stages MiB |")
    print("|---|---|---|---|")
    for name in names:
        cells = [rows[key].bytes.get(name, 0) / 2**20 for key in
                 ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True))]  # fmt: skip
        print(f"| {name} | {cells[0]:.1f} | {cells[1]:.1f} | {cells[2]:.1f} |")
    totals = {key: saved.total() for key, saved in rows.items()}
    print(
        f"| **generator total** | {totals[(torch.float32, False)] / 2**20:.0f} | "
        f"{totals[(torch.bfloat16, False)] / 2**20:.0f} | {totals[(torch.bfloat16, True)] / 2**20:.0f} |"
    )
    print(f"| discriminator, 3 forwards (bf16) | | {d_saved / 2**20:.1f} | {d_saved / 2**20:.1f} |")
    static = (generator_parameters + discriminator_parameters) * BYTES_PER_PARAMETER
    print(
        f"\nParameters: generator {generator_parameters / 1e6:.1f} M, discriminator "
        f"{discriminator_parameters / 1e6:.1f} M; weights, gradients and Adam states at "
        f"{BYTES_PER_PARAMETER} bytes each on one GPU: {static / GIB:.2f} GiB"
    )
    print(f"\n## Per GPU at batch {batch} (bf16), against {args.gpu_gib:g} GiB")
    for checkpointing in (False, True):
        per_sample = totals[(torch.bfloat16, checkpointing)] + d_saved
        need = batch * per_sample + static
        label = "checkpoint_stages" if checkpointing else "no checkpointing"
        share = f"{need / GIB / args.gpu_gib:.0%} of {args.gpu_gib:g} GiB"
        print(
            f"- {label}: {batch} x {per_sample / GIB:.3f} GiB + {static / GIB:.2f} GiB = {need / GIB:.1f} "
            f"GiB ({share} before context, temporaries and fragmentation)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
