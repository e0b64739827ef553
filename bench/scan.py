"""Time and size the fast selective scan against the previous chunked path and the sequential reference.

    python bench/scan.py [--batch 1] [--dim 64] [--dstate 16] [--lengths 256,1024,4096,16384]
                         [--threads N] [--clock {wall,cpu}] [--ref-max-L 4096] [--repeats 7]
                         [--ref-repeats 3] [--old-commit 91bb81f] [--chunk-sizes 16,32,64]
                         [--no-memory]

fp32 inputs of shape ``u, delta [b, d, L]``, ``A [d, n]``, ``B, C [b, n, L]``, with D, delta_bias and
delta_softplus (the generator's call). Three implementations, timed side by side in the same run:
``ref`` is ``selective_scan_ref`` (one Python step per time step, differentiated by autograd); ``old`` is
``selective_scan_chunked`` as it was at ``--old-commit`` (read with ``git show``; the path that kept
``[L, b, n, d]`` states and decays for its backward); ``fast`` is ``selective_scan_chunked`` of this
checkout. "fwd" runs under ``torch.no_grad``; "fwd+bwd" runs the forward with every input requiring grad
and back-propagates one upstream gradient. Each round runs every implementation once, in turn, so that
the machine's load falls on all of them alike; times are the median over the rounds after one warm-up
(the best is printed beside it), wall-clock by default; ``--clock cpu`` measures this process's CPU time
(user + system, all threads), which stays meaningful on a shared, loaded machine, best with
``--threads 1``.

Peak memory is the growth of the peak resident set size (Linux ``VmHWM``, reset just before the call)
over the resident size before it, in a fresh Python process running one call on inputs (and the
upstream gradient) already in memory: what the call itself adds at its worst, its output, the inputs'
gradients and allocator slack included. It is printed in MiB and as a multiple of the inputs' size.
``--chunk-sizes`` adds a table of fast fwd+bwd times per chunk size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from medgan.models.ssm import default_chunk_size, selective_scan_chunked, selective_scan_ref

REPO = Path(__file__).resolve().parent.parent
# the commit before the scan kept only chunk-boundary states (issue 12)
OLD_COMMIT = "91bb81f32f230a9c53608f40a811bc9172ca3211"
MODES = ("fwd", "fwd+bwd")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_inputs(batch: int, dim: int, dstate: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 inputs of the benchmark shape, distributed as in mamba-ssm's tests."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=generator),
        "delta": 0.5 * torch.rand(batch, dim, length, generator=generator),
        "A": -0.5 * torch.rand(dim, dstate, generator=generator),
        "B": torch.randn(batch, dstate, length, generator=generator),
        "C": torch.randn(batch, dstate, length, generator=generator),
        "D": torch.randn(dim, generator=generator),
        "delta_bias": 0.5 * torch.rand(dim, generator=generator),
    }


def input_mib(inputs: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in inputs.values()) / 2**20


def old_scan(commit: str):
    """``selective_scan_chunked`` as it was at ``commit``, loaded from git without touching the checkout."""
    result = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:medgan/models/ssm.py"], capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"error: cannot read medgan/models/ssm.py at {commit} (--old-commit none skips it): "
                 f"{result.stderr.strip()}")  # fmt: skip
    module = types.ModuleType(f"ssm_at_{commit[:7]}")
    exec(compile(result.stdout, f"{commit[:7]}:medgan/models/ssm.py", "exec"), module.__dict__)
    return module.selective_scan_chunked


def implementations(old_commit: str) -> dict:
    scans = {"ref": selective_scan_ref, "fast": selective_scan_chunked}
    if old_commit != "none":
        scans["old"] = old_scan(old_commit)
    return scans


def run_once(scan, inputs, mode: str, upstream: torch.Tensor, **kwargs) -> torch.Tensor:
    """One forward (no grad) or forward+backward of ``scan``; returns the output."""
    if mode == "fwd":
        with torch.no_grad():
            return scan(**inputs, delta_softplus=True, **kwargs)
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items()}
    out = scan(**leaves, delta_softplus=True, **kwargs)
    out.backward(upstream)
    return out


def time_side_by_side(scans: dict, inputs, mode, upstream, repeats: dict, clock) -> dict:
    """``{name: (median ms, best ms)}``; round after round, every implementation once per round."""
    for scan in scans.values():
        run_once(scan, inputs, mode, upstream)
    samples = {name: [] for name in scans}
    for round_index in range(max(repeats.values())):
        for name, scan in scans.items():
            if round_index < repeats[name]:
                start = clock()
                run_once(scan, inputs, mode, upstream)
                samples[name].append(1e3 * (clock() - start))
    return {name: (statistics.median(times), min(times)) for name, times in samples.items()}


def peak_memory_mib(which: str, shape: tuple[int, int, int, int], mode: str, args) -> float:
    """Peak RSS growth of one call, measured in a fresh interpreter (see the module docstring)."""
    command = [sys.executable, __file__, "--measure-memory", which, mode, "--old-commit", args.old_commit]
    command += ["--batch", str(shape[0]), "--dim", str(shape[1]), "--dstate", str(shape[2])]
    command += ["--lengths", str(shape[3])]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)["peak_mib"]


def _rss_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident at its peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(scan, shape: tuple[int, int, int, int], mode: str) -> None:
    """The child side of ``peak_memory_mib``: print the RSS peak growth of one call as JSON."""
    batch, dim, dstate, length = shape
    inputs = make_inputs(batch, dim, dstate, length)
    upstream = torch.randn(batch, dim, length)
    # torch's lazy set-up, not counted
    run_once(scan, make_inputs(1, 4, 2, 64), mode, torch.randn(1, 4, 64))
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    run_once(scan, inputs, mode, upstream)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def _time_cell(values: dict, name: str) -> str:
    return f"{values[name][0]:8.1f} ({values[name][1]:7.1f})" if name in values else f"{'-':>18}"


def _ratio(values: dict, numerator: str, denominator: str) -> str:
    if numerator not in values or denominator not in values:
        return f"{'-':>8}"
    return f"{values[numerator][0] / values[denominator][0]:7.2f}x"


def print_time_table(rows: list, mode: str) -> None:
    """Median (best) per implementation, fast/old and ref/fast ratios of the medians, forward error."""
    print(f"\ntime, {mode}")
    names = f"{'ref':>18} {'old':>18} {'fast':>18}"
    header = f"{'L':>6} {'chunk':>5} | {names} | {'fast/old':>8} {'ref/fast':>8} | rel err"
    print(header)
    print("-" * len(header))
    for length, _, times, _, error in rows:
        values = times[mode]
        cells = " ".join(_time_cell(values, name) for name in ("ref", "old", "fast"))
        ratios = f"{_ratio(values, 'fast', 'old')} {_ratio(values, 'ref', 'fast')}"
        print(f"{length:>6} {default_chunk_size(length):>5} | {cells} | {ratios} | {error:.1e}")


def _memory_cell(memory: dict, name: str, mode: str, size: float) -> str:
    if (name, mode) not in memory:
        return f"{'-':>16}"
    value = memory[name, mode]
    return f"{value:7.1f} ({value / size:5.1f}x)"


def print_memory_table(rows: list) -> None:
    """Peak RSS growth per implementation, in MiB and in multiples of the inputs' size."""
    print("\npeak memory growth in MiB, and as a multiple of the inputs' size")
    header = f"{'L':>6} {'inputs':>7} | {'mode':>7} | {'ref':>16} {'old':>16} {'fast':>16} | {'old/fast':>8}"
    print(header)
    print("-" * len(header))
    for length, size, _, memory, _ in rows:
        for mode in MODES:
            cells = " ".join(_memory_cell(memory, name, mode, size) for name in ("ref", "old", "fast"))
            old_over_fast = f"{'-':>8}"
            if ("old", mode) in memory and memory["fast", mode] > 0:
                old_over_fast = f"{memory['old', mode] / memory['fast', mode]:7.1f}x"
            print(f"{length:>6} {size:7.1f} | {mode:>7} | {cells} | {old_over_fast}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1, help="b")
    parser.add_argument("--dim", type=int, default=64, help="d, channels")
    parser.add_argument("--dstate", type=int, default=16, help="n, state size per channel")
    parser.add_argument("--lengths", default="256,1024,4096,16384", help="comma-separated sequence lengths")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or process CPU time")
    parser.add_argument("--ref-max-L", type=int, default=4096, help="skip the reference above this length")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the chunked paths")
    parser.add_argument("--ref-repeats", type=int, default=3, help="timed rounds of the reference")
    parser.add_argument("--old-commit", default=OLD_COMMIT, help="commit of the old chunked path, or none")
    parser.add_argument("--chunk-sizes", default="", help="also time fast fwd+bwd at these chunk sizes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--measure-memory", nargs=2, metavar=("WHICH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    lengths = [int(x) for x in args.lengths.split(",")]
    scans = implementations(args.old_commit)
    if args.measure_memory:
        which, mode = args.measure_memory
        measure_memory_here(scans[which], (args.batch, args.dim, args.dstate, lengths[0]), mode)
        return

    print(
        f"selective scan, b={args.batch} d={args.dim} n={args.dstate} fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.clock} time in ms, median (best) of {args.repeats} "
        f"rounds, ref of {args.ref_repeats}; old = chunked path at {args.old_commit[:7]}"
    )
    rows = []
    for length in lengths:
        shape = (args.batch, args.dim, args.dstate, length)
        inputs = make_inputs(*shape)
        upstream = torch.randn(args.batch, args.dim, length, generator=torch.Generator().manual_seed(1))
        names = [n for n in ("ref", "old", "fast") if n in scans and (n != "ref" or length <= args.ref_max_L)]
        present = {name: scans[name] for name in names}
        repeats = {name: args.ref_repeats if name == "ref" else args.repeats for name in names}
        times = {mode: time_side_by_side(present, inputs, mode, upstream, repeats, clock) for mode in MODES}
        memory = {}
        if not args.no_memory:
            memory = {(n, m): peak_memory_mib(n, shape, m, args) for n in names for m in MODES}
        error = float("nan")
        if "ref" in names:
            fast_out = run_once(selective_scan_chunked, inputs, "fwd", upstream)
            ref_out = run_once(selective_scan_ref, inputs, "fwd", upstream)
            error = ((fast_out - ref_out).abs().max() / ref_out.abs().max()).item()
        rows.append((length, input_mib(inputs), times, memory, error))

    for mode in MODES:
        print_time_table(rows, mode)
    if not args.no_memory:
        print_memory_table(rows)

    if args.chunk_sizes:
        chunks = [int(x) for x in args.chunk_sizes.split(",")]
        print("\nfast fwd+bwd (ms) by chunk size, median (best)")
        print(f"{'L':>6} | " + " ".join(f"{c:>16}" for c in chunks))
        for length in lengths:
            inputs = make_inputs(args.batch, args.dim, args.dstate, length)
            upstream = torch.randn(args.batch, args.dim, length)
            by_chunk = {c: (lambda c=c, **kw: selective_scan_chunked(**kw, chunk_size=c)) for c in chunks}
            results = time_side_by_side(
                by_chunk, inputs, "fwd+bwd", upstream, dict.fromkeys(chunks, args.repeats), clock
            )
            print(
                f"{length:>6} | " + " ".join(f"{results[c][0]:7.1f} ({results[c][1]:6.1f})" for c in chunks)
            )


if __name__ == "__main__":
    main()
