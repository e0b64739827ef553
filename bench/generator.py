"""The generator's cost against the matched U-Net on the CPU: issue 16's budget, measured side by side.

    python bench/generator.py [--config configs/brats.yaml] [--size 128] [--rounds 3] [--threads 1]
                              [--variant NAME '{"key": value, ...}' ...] [--old-commit C] [--quick]

The SSM generator of brats.yaml's ``model.generator`` settings (``arch: ssm`` whatever the config's arch;
activation checkpointing off) and the U-Net baseline at width ``--unet-width`` (72: the width that
matched the SSM generator's parameter count when the budget was set; fixed, so the budget does not move
with the design), one ``size x size`` sample in fp32,
``g(x, available, target).mean().backward()`` in training mode after a 32 x 32 warm-up. Each
measurement runs in a fresh process (one model's allocations cannot hide the next one's peak) and the
models take turns, round after round, so a change in the machine's load falls on all of them; the table
gives per model the median over rounds of the process's CPU time (user + system) and wall time, and of
the peak memory growth: the peak resident set (``VmHWM``, reset after the warm-up) over the resident size
before the timed call, with the parameters and their gradients already resident, so activations and
temporaries. Ratios are of the medians, against the U-Net. The budget: time <= 2.5x, memory <= 2x.

``--hybrid [LEVELS ...]`` compares the hybrid (``arch: hybrid``, branches at the config's ``ssm_levels`` or
at each comma-separated level set given, and the bottleneck) with the U-Net trunk it is built on (the
config's ``unet_base_channels``, or with 0 the width matched to the SSM generator), on one slab of
``--slab-slices`` (8) slices; its budget is 1.3x the trunk's time and 1.5x its memory. The last column is
the share of the step's CPU time spent inside the selective scans, forward and backward (timed in a
second step).

``--variant NAME JSON`` adds a design to the table (overrides of the config's ``model.generator``); with
none, the config's design and the U-Net. ``--old-commit C`` adds the first design again, calling the scan as
it was at commit ``C`` (read with ``git show``), to measure what a change of the scan saved. ``--quick`` is
a 32 x 32, one-round smoke run (the tests). This is the one CPU benchmark of the generator; bench/gpu.py
measures on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medgan.config import read_yaml  # noqa: E402
from medgan.models import blocks  # noqa: E402
from medgan.models.context import input_shape  # noqa: E402
from medgan.models.generator import (  # noqa: E402
    GeneratorConfig,
    build_generator,
    count_parameters,
    matched_unet_width,
)

UNET_WIDTH = 72
TIME_BUDGET, MEMORY_BUDGET = 2.5, 2.0
# The hybrid's budget against the U-Net trunk it is built on (issue 23), on one slab of HYBRID_SLAB slices.
HYBRID_TIME_BUDGET, HYBRID_MEMORY_BUDGET, HYBRID_SLAB = 1.3, 1.5, 8


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class ScanClock:
    """CPU seconds spent inside ``selective_scan``, forward and backward, while installed: each call is
    timed, and its output's backward node timed by hooks before and after it runs (the CPU backward runs on
    the calling thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = blocks.selective_scan

    def __enter__(self) -> ScanClock:
        def timed(*args, **options):
            start = time.process_time()
            out = self._original(*args, **options)
            self.seconds += time.process_time() - start
            node = out.grad_fn
            if node is not None:
                began: list[float] = []
                node.register_prehook(lambda grads: began.append(time.process_time()))
                node.register_hook(lambda inputs, outputs: self._add(time.process_time() - began.pop()))
            return out

        blocks.selective_scan = timed
        return self

    def _add(self, seconds: float) -> None:
        self.seconds += seconds

    def __exit__(self, *exc) -> None:
        blocks.selective_scan = self._original


def measure_here(config: GeneratorConfig, size: int, slab_slices: int = 1) -> dict:
    """One sample's forward + backward in this process (``slab_slices`` slices of it, one slab): CPU and
    wall seconds, peak memory growth in bytes, and in a second step the share of its CPU time spent in the
    selective scans (0 for a model without them)."""
    torch.manual_seed(0)
    model = build_generator(config).train()
    modalities = len(config.modalities)

    def step(pixels: int) -> None:
        images = torch.rand(input_shape(slab_slices, modalities, pixels, pixels, config.context_slices))
        available = torch.zeros(slab_slices, modalities, dtype=torch.bool)
        available[:, :2] = True
        target = torch.full((slab_slices,), 2)
        model(images, available, target, slab_slices=slab_slices).mean().backward()
        # kept, not freed: the parameters' gradients are then in the resident size before, not in the growth
        model.zero_grad(set_to_none=False)

    step(32)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    step(size)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    growth = (_status_kib("VmHWM") - before) * 1024
    with ScanClock() as clock:
        start_cpu = time.process_time()
        step(size)
        scan_share = clock.seconds / (time.process_time() - start_cpu)
    return {
        "parameters": count_parameters(model),
        "wall": wall,
        "cpu": cpu,
        "peak_bytes": growth,
        "scan_share": scan_share,
    }


def use_scan_at(commit: str) -> None:
    """Make the generator's blocks call ``selective_scan`` as it was at ``commit`` (``git show``)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:medgan/models/ssm.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    namespace = {"__name__": f"ssm_at_{commit[:7]}"}
    exec(compile(source, f"{commit[:7]}:medgan/models/ssm.py", "exec"), namespace)
    scan_then = namespace["selective_scan"]

    def selective_scan(*args, backend: str = "auto", **options):
        # a scan of then may predate the backend argument; the CPU measurement runs auto anyway
        return scan_then(*args, **options)

    blocks.selective_scan = selective_scan


def measure_in_child(
    settings: dict, size: int, threads: int, scan_at: str | None = None, slab_slices: int = 1
) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(settings), "--size", str(size)]
    command += ["--threads", str(threads), "--slab-slices", str(slab_slices)]
    command += ["--scan-at", scan_at] if scan_at else []
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def load_generator_settings(path: Path) -> dict:
    return {**read_yaml(path)["model"]["generator"], "checkpoint_stages": False}


def run_table(
    variants: list[tuple[str, dict]],
    size: int,
    rounds: int,
    threads: int,
    scan_at: dict | None = None,
    slab_slices: int = 1,
) -> list[dict]:
    """Every variant once per round, in turn; per variant the medians and the ratios to the last one.
    ``scan_at`` maps a variant's name to the commit whose scan it calls."""
    scan_at = scan_at or {}
    samples: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, settings in variants:
            samples[name].append(measure_in_child(settings, size, threads, scan_at.get(name), slab_slices))
    rows = []
    for name, _ in variants:
        runs = samples[name]
        rows.append(
            {
                "name": name,
                "parameters": runs[0]["parameters"],
                **{
                    key: statistics.median(r[key] for r in runs)
                    for key in ("cpu", "wall", "peak_bytes", "scan_share")
                },
                "cpu_runs": [round(r["cpu"], 2) for r in runs],
            }
        )
    baseline = rows[-1]
    for row in rows:
        row["time_ratio"] = row["cpu"] / baseline["cpu"]
        row["memory_ratio"] = row["peak_bytes"] / baseline["peak_bytes"]
    return rows


def print_table(
    rows: list[dict],
    size: int,
    rounds: int,
    threads: int,
    slab_slices: int = 1,
    budget: tuple[float, float] = (TIME_BUDGET, MEMORY_BUDGET),
) -> None:
    sample = f"{slab_slices} x {size} x {size} slab" if slab_slices > 1 else f"{size} x {size} sample"
    print(f"## Generator fwd+bwd, CPU fp32, one {sample}, {threads} thread(s), {rounds} round(s)")
    print(
        "| model | parameters | CPU s (median) | wall s | peak growth GiB | time / U-Net | memory / U-Net "
        "| scan's share of the step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['parameters'] / 1e6:.1f} M | {row['cpu']:.2f} {row['cpu_runs']} | "
            f"{row['wall']:.2f} | {row['peak_bytes'] / 2**30:.3f} | {row['time_ratio']:.2f}x | "
            f"{row['memory_ratio']:.2f}x | {row['scan_share']:.0%} |"
        )
    print(f"budget: time <= {budget[0]}x, memory <= {budget[1]}x the U-Net's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "brats.yaml"), help="model.generator from")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each measurement")
    parser.add_argument("--unet-width", type=int, default=UNET_WIDTH)
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "JSON"))
    parser.add_argument("--old-commit", metavar="C", help="also the first design with the scan of commit C")
    parser.add_argument("--quick", action="store_true", help="32 x 32, one round (a smoke test)")
    parser.add_argument(
        "--hybrid",
        nargs="*",
        metavar="LEVELS",
        help="the hybrid against its U-Net trunk alone on one slab, at the config's ssm_levels or at each "
        "comma-separated LEVELS given (e.g. 3 2,3; '' for the bottleneck alone); budget 1.3x time, 1.5x "
        "memory",
    )
    parser.add_argument(
        "--slab-slices", type=int, default=None, help="slices per sample (default 1; 8 with --hybrid)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scan-at", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        if args.scan_at:
            use_scan_at(args.scan_at)
        slab = args.slab_slices or 1
        print(json.dumps(measure_here(GeneratorConfig(**json.loads(args.child)), args.size, slab)))
        return 0
    if args.quick:
        args.size, args.rounds = 32, 1
    generator = load_generator_settings(Path(args.config))
    if args.hybrid is not None:
        return hybrid_table(generator, args)
    # the SSM generator of the config's settings, whatever its arch (brats.yaml's is the U-Net since the
    # second study, docs/results.md)
    ssm = {**generator, "arch": "ssm"}
    variants = [(name, {**ssm, **json.loads(text)}) for name, text in args.variant]
    variants = variants or [("ssm (config)", ssm)]
    scan_at = {}
    if args.old_commit:
        name = f"{variants[0][0]}, scan at {args.old_commit[:7]}"
        variants.insert(1, (name, variants[0][1]))
        scan_at[name] = args.old_commit
    unet = {**generator, "arch": "unet", "unet_base_channels": args.unet_width}
    variants.append((f"unet, width {args.unet_width}", unet))
    rows = run_table(variants, args.size, args.rounds, args.threads, scan_at)
    print_table(rows, args.size, args.rounds, args.threads)
    return 0


def hybrid_table(generator: dict, args: argparse.Namespace) -> int:
    """The hybrid (at each level set asked for) against the U-Net trunk it is built on, one slab."""
    slab = args.slab_slices or HYBRID_SLAB
    # the trunk is what arch: unet builds from the config: its unet_base_channels, or 0 -> the matched width
    width = generator.get("unet_base_channels") or matched_unet_width(GeneratorConfig(**generator))
    trunk = {**generator, "arch": "unet", "unet_base_channels": width}
    level_sets = [[int(level) for level in text.split(",") if level.strip()] for text in args.hybrid] or [
        list(generator["ssm_levels"])
    ]
    variants = [
        (
            f"hybrid, branches at levels {levels or 'none'} + bottleneck",
            {**trunk, "arch": "hybrid", "ssm_levels": levels},
        )
        for levels in level_sets
    ]
    variants.append((f"unet trunk alone, width {width}", trunk))
    rows = run_table(variants, args.size, args.rounds, args.threads, slab_slices=slab)
    print_table(rows, args.size, args.rounds, args.threads, slab, (HYBRID_TIME_BUDGET, HYBRID_MEMORY_BUDGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
