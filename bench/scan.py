"""Time the fast selective scan against its sequential reference on the CPU.

    python bench/scan.py [--lengths 256,1024,4096,16384] [--threads N] [--clock {wall,cpu}]
                         [--ref-max-L 16384] [--repeats 7] [--ref-repeats 3]
                         [--chunk-sizes 16,32,64,128] [--no-memory]

Shapes b=1, d=64, n=16, fp32, with D, delta_bias and delta_softplus (the generator's call). The baseline
is ``selective_scan_ref``: mamba-ssm's reference recurrence, one Python step per time step, differentiated
by autograd. "fwd" runs under ``torch.no_grad``; "fwd+bwd" runs the forward with every input requiring
grad and back-propagates one upstream gradient. Times are the best of the repeats after one warm-up (as
``timeit`` advises: the other runs measure other processes' load, not the code), wall-clock by default;
``--clock cpu`` measures this process's CPU time (user + system, all threads) instead, which stays
meaningful on a shared, loaded machine, best with ``--threads 1`` (no thread waits for a descheduled
sibling).

Peak memory is the growth of the peak resident set size (Linux ``VmHWM``, reset just before the call)
over the resident size before it, in a fresh Python process running one call on inputs already in
memory: what the call itself adds at its worst, allocator slack included. ``--chunk-sizes`` adds a
table of fast fwd+bwd times per chunk size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from medgan.models.ssm import default_chunk_size, selective_scan_chunked, selective_scan_ref

BATCH, DIM, DSTATE = 1, 64, 16
MODES = ("fwd", "fwd+bwd")


def make_inputs(length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 inputs of the benchmark shape, distributed as in mamba-ssm's tests."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(BATCH, DIM, length, generator=generator),
        "delta": 0.5 * torch.rand(BATCH, DIM, length, generator=generator),
        "A": -0.5 * torch.rand(DIM, DSTATE, generator=generator),
        "B": torch.randn(BATCH, DSTATE, length, generator=generator),
        "C": torch.randn(BATCH, DSTATE, length, generator=generator),
        "D": torch.randn(DIM, generator=generator),
        "delta_bias": 0.5 * torch.rand(DIM, generator=generator),
    }


def run_once(scan, inputs, mode: str, upstream: torch.Tensor, **kwargs) -> torch.Tensor:
    """One forward (no grad) or forward+backward of ``scan``; returns the output."""
    if mode == "fwd":
        with torch.no_grad():
            return scan(**inputs, delta_softplus=True, **kwargs)
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items()}
    out = scan(**leaves, delta_softplus=True, **kwargs)
    out.backward(upstream)
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_ms(scan, inputs, mode, upstream, repeats, clock, **kwargs) -> float:
    run_once(scan, inputs, mode, upstream, **kwargs)
    times = []
    for _ in range(repeats):
        start = clock()
        run_once(scan, inputs, mode, upstream, **kwargs)
        times.append(clock() - start)
    return 1e3 * min(times)


def peak_memory_mib(which: str, length: int, mode: str, threads: int | None) -> float:
    """Peak RSS growth of one call, measured in a fresh interpreter (see the module docstring)."""
    command = [sys.executable, __file__, "--measure-memory", which, str(length), mode]
    if threads is not None:
        command += ["--threads", str(threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)["peak_mib"]


def _rss_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident at its peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(which: str, length: int, mode: str) -> None:
    """The child side of ``peak_memory_mib``: print the RSS peak growth of one call as JSON."""
    inputs = make_inputs(length)
    upstream = torch.randn(BATCH, DIM, length)
    scan = selective_scan_chunked if which == "fast" else selective_scan_ref
    run_once(scan, make_inputs(64), mode, torch.randn(BATCH, DIM, 64))  # torch's lazy set-up, not counted
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    run_once(scan, inputs, mode, upstream)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def format_row(length: int, times: dict, memory: dict, error: float) -> str:
    """One line of the table; a dash where the reference or the memory was not measured."""

    def time_cell(key):
        return f"{times[key]:8.1f}" if key in times else f"{'-':>8}"

    def speedup(mode):
        return f"{times['ref', mode] / times['fast', mode]:6.1f}x" if ("ref", mode) in times else f"{'-':>7}"

    def memory_cell(which):
        if (which, "fwd") not in memory:
            return f"{'-':>14}"
        return f"{memory[which, 'fwd']:6.1f}/{memory[which, 'fwd+bwd']:<7.1f}"

    return (
        f"{length:>6} {default_chunk_size(length):>5} | "
        f"{time_cell(('ref', 'fwd'))} {time_cell(('fast', 'fwd'))} "
        f"{speedup('fwd')} | {time_cell(('ref', 'fwd+bwd'))} {time_cell(('fast', 'fwd+bwd'))} "
        f"{speedup('fwd+bwd')} | {memory_cell('ref')} {memory_cell('fast')} | {error:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="256,1024,4096,16384", help="comma-separated sequence lengths")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or process CPU time")
    parser.add_argument("--ref-max-L", type=int, default=16384, help="skip the reference above this length")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of the fast path")
    parser.add_argument("--ref-repeats", type=int, default=3, help="timed repeats of the reference")
    parser.add_argument("--chunk-sizes", default="", help="also time fwd+bwd at these chunk sizes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--measure-memory", nargs=3, metavar=("WHICH", "L", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    if args.measure_memory:
        which, length, mode = args.measure_memory
        measure_memory_here(which, int(length), mode)
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    print(
        f"selective scan, b={BATCH} d={DIM} n={DSTATE} fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.clock} time in ms (best of {args.repeats}, ref best of "
        f"{args.ref_repeats}), memory in MiB (peak RSS growth)"
    )
    header = (
        f"{'L':>6} {'chunk':>5} | {'ref fwd':>8} {'fast fwd':>8} {'speedup':>7} | {'ref f+b':>8} "
        f"{'fast f+b':>8} {'speedup':>7} | {'mem ref f/f+b':>14} {'mem fast f/f+b':>14} | rel err"
    )
    print(header)
    print("-" * len(header))
    for length in lengths:
        inputs = make_inputs(length)
        upstream = torch.randn(BATCH, DIM, length, generator=torch.Generator().manual_seed(1))
        implementations = ("fast", "ref") if length <= args.ref_max_L else ("fast",)
        times, memory = {}, {}
        for mode in MODES:
            for which in implementations:
                scan = selective_scan_chunked if which == "fast" else selective_scan_ref
                repeats = args.repeats if which == "fast" else args.ref_repeats
                times[which, mode] = best_ms(scan, inputs, mode, upstream, repeats, clock)
                if not args.no_memory:
                    memory[which, mode] = peak_memory_mib(which, length, mode, args.threads)
        error = float("nan")
        if "ref" in implementations:
            fast_out = run_once(selective_scan_chunked, inputs, "fwd", upstream)
            ref_out = run_once(selective_scan_ref, inputs, "fwd", upstream)
            error = ((fast_out - ref_out).abs().max() / ref_out.abs().max()).item()
        print(format_row(length, times, memory, error))

    if args.chunk_sizes:
        chunks = [int(x) for x in args.chunk_sizes.split(",")]
        print("\nfast fwd+bwd (ms) by chunk size")
        print(f"{'L':>6} | " + " ".join(f"{c:>7}" for c in chunks))
        for length in lengths:
            inputs = make_inputs(length)
            upstream = torch.randn(BATCH, DIM, length)
            row = [
                best_ms(
                    selective_scan_chunked, inputs, "fwd+bwd", upstream, args.repeats, clock, chunk_size=c
                )
                for c in chunks
            ]
            print(f"{length:>6} | " + " ".join(f"{t:7.1f}" for t in row))


if __name__ == "__main__":
    main()
