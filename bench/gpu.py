"""GPU benchmark of the selective scan and of the brats.yaml generators: run it before spending GPU time.

    python bench/gpu.py              # one GPU; under 4 minutes on an H100-class device (no install needed)
    python bench/gpu.py --dry-run    # the whole script on the CPU with tiny shapes (the test suite runs it)

    python bench/gpu.py --triton-compile 90    # compile the Triton scan for sm_90 here, without a GPU

Needs only torch, pyyaml and ``medgan.models``: a bare GPU machine has no DeepSpeed, data or network.

1. **Correctness on the device.** First one line on the Triton scan (which runs only when asked for):
   against ``selective_scan_ref``, forward and every input's gradient, fp32, B and C plain and grouped,
   its largest relative errors and MATCH (``model.generator.scan_backend: triton`` is then safe on this
   GPU) or MISMATCH; it does not stop the script. Then ``selective_scan`` (the dispatch: mamba-ssm's
   kernel where it is installed, else the chunked path), ``selective_scan_chunked`` and mamba-ssm's kernel
   the same way; a mismatch of one of those stops the script with exit status 1, before anything is timed.
2. **Peak rate.** The device's measured bf16 matmul rate (square matmuls), beside its datasheet dense
   bf16 figure where the device is known.
3. **The scan.** Every available path (``chunked``, pure PyTorch; ``triton`` when Triton is installed;
   ``mamba-ssm`` when importable), forward
   and forward + backward: median time and peak memory growth (``torch.cuda.max_memory_allocated`` over
   what was allocated before) for L = 1k..64k, bf16 u, delta, B, C as the bf16 generator passes them.
   The default b, d, n are those of brats.yaml's first SSM stage for 2 images (4 directions each).
   Before the table, the Triton scan's first call with an empty kernel cache (compile and autotune, forward
   and backward, one shape family: keyed on d and n, not L), a second call, and a call at another L.
4. **Generator step.** brats.yaml's generator (``ssm``; ``ssm`` with ``checkpoint_stages``; the
   parameter-matched ``unet``) at 256 x 256, bf16 weights and activations with fp32 master weights and
   Adam (as DeepSpeed's bf16 mode keeps them): forward, L1 loss, backward, Adam step, for batch 1, 2, 4,
   ... until out of memory, with ``torch.cuda.set_per_process_memory_fraction`` capping the device at
   80 GiB (an A100/H100 80GB). Per batch: images/s, peak memory, model FLOPs utilisation (MFU).

How FLOPs are counted: ``torch.utils.flop_counter.FlopCounterMode`` counts the matmuls, convolutions
and attention of one forward + backward at batch 1. It cannot see the scan (mamba-ssm's kernel is opaque
to it, and the chunked path's internal ops are not the model's arithmetic), so while counting, the scan
is replaced by a stand-in without FLOPs that still passes gradients to all its inputs, and each scan
call is counted analytically: per element of ``[b, d, L, n]``, 7 FLOPs forward (``exp(delta A)``: 2,
``delta B u``: 1, state update: 2, ``<C, h>``: 2) and twice that backward, 21 in all. Recomputation by
``checkpoint_stages`` is not counted (model FLOPs, not hardware FLOPs). MFU = model FLOPs per image x
images/s / peak, against the measured matmul rate and against the datasheet figure.

``--triton-compile SM`` compiles the Triton scan's kernels for CUDA ``sm_SM`` on this machine (no GPU
needed): per autotune config, seconds to compile, registers per thread and the stack and local memory per
thread (spills land there; Triton's bundled ``cuobjdump``), for the default scan shape, bf16 activations.
Written against Triton 3.9's ``ASTSource`` API.

The generator's cost on the CPU is bench/generator.py's (one CPU benchmark, not two).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
# a bare GPU machine has the checkout, not an installed package
sys.path.insert(0, str(REPO))

from medgan.models import blocks, ssm  # noqa: E402
from medgan.models.context import input_shape  # noqa: E402
from medgan.models.generator import GeneratorConfig, build_generator, count_parameters  # noqa: E402

CAP_BYTES = 80 * 2**30
SCAN_FLOPS_PER_ELEMENT = 21  # forward 7, backward 14, per (b, d, L, n): see the module docstring
# dense (no sparsity) bf16 tensor-core TFLOP/s from the vendor's datasheets; the first matching name wins
DATASHEET_BF16_TFLOPS = [
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
]
FULL = {
    "scan_lengths": [1024, 2048, 4096, 8192, 16384, 32768, 65536],
    "scan_shape": (8, 256, 16),
    "check_length": 300,
    "matmul_size": 8192,
    "image_size": 256,
    "max_batch": 512,
    "seconds_per_model": 60,  # keeps the whole run under 4 minutes
    "steps": 3,
    "repeats": 3,
}
DRY = {
    "scan_lengths": [64, 256],
    "scan_shape": (2, 8, 4),
    # Triton's interpreter calls the scan's combine once per element: a short check
    "check_length": 40,
    "matmul_size": 128,
    "image_size": 32,
    "max_batch": 2,
    "seconds_per_model": 60,
    "steps": 1,
    "repeats": 1,
}
# the generators compared, as overrides of the config's model.generator
VARIANTS = [
    ("ssm", {"arch": "ssm", "checkpoint_stages": False}),
    ("ssm, checkpoint_stages", {"arch": "ssm", "checkpoint_stages": True}),
    ("unet (matched)", {"arch": "unet", "checkpoint_stages": False}),
]
# brats.yaml's generator, shrunk for --dry-run (same keys and switches, tiny widths)
DRY_GENERATOR = dict(
    base_channels=8, depth=2, ssm_levels=[1], ssm_state=4, scales=[1, 2], attention_heads=2, condition_dim=8
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device: torch.device, repeats: int) -> float:
    """Median wall time of ``function()`` after one warm-up, the device synchronised around each call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict filled on exit: ``"peak"``, the most allocated on the device inside (bytes), and
    ``"growth"``, that over what was allocated before; None off CUDA."""
    result = {"peak": None, "growth": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    yield result
    if device.type == "cuda":
        synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device)
        result["growth"] = result["peak"] - before


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def scan_inputs(batch, dim, dstate, length, device, dtype, groups=None, seed=0):
    """Inputs distributed as in mamba-ssm's tests; A, D and delta_bias fp32 as the generator passes them."""
    generator = torch.Generator().manual_seed(seed)
    projection = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)

    def draw(kind, *shape, scale=1.0, data_type=dtype):
        values = (torch.randn if kind == "n" else torch.rand)(*shape, generator=generator)
        return (scale * values).to(device=device, dtype=data_type)

    return {
        "u": draw("n", batch, dim, length),
        "delta": draw("u", batch, dim, length, scale=0.5),
        "A": draw("u", dim, dstate, scale=-0.5, data_type=torch.float32),
        "B": draw("n", *projection),
        "C": draw("n", *projection),
        "D": draw("n", dim, data_type=torch.float32),
        "delta_bias": draw("u", dim, scale=0.5, data_type=torch.float32),
    }


def forward_backward(scan, inputs, upstream):
    """Forward with every input a leaf that requires grad, then one backward; returns (out, gradients)."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    out = scan(**leaves, delta_softplus=True)
    out.backward(upstream)
    return out, {name: leaf.grad for name, leaf in leaves.items()}


def triton_on(device: torch.device) -> bool:
    """Whether the Triton scan compiles for ``device``: a GPU, Triton installed and not interpreting."""
    if device.type != "cuda" or not ssm._TRITON_INSTALLED:
        return False
    from medgan.models import ssm_triton

    return not ssm_triton.interpreting()


def triton_interpreted(device: torch.device) -> bool:
    """Whether the Triton scan runs on ``device`` in Triton's interpreter: CPU tensors, TRITON_INTERPRET=1."""
    if device.type != "cpu" or not ssm._TRITON_INSTALLED:
        return False
    from medgan.models import ssm_triton

    return ssm_triton.interpreting()


def scan_paths(device: torch.device) -> dict:
    paths = {"chunked": ssm.selective_scan_chunked}
    if triton_on(device):
        from medgan.models.ssm_triton import selective_scan_triton

        paths["triton"] = selective_scan_triton
    if device.type == "cuda" and ssm._mamba_selective_scan_fn is not None:
        paths["mamba-ssm"] = ssm._mamba_selective_scan_fn
    return paths


# fp32: largest error over the largest reference magnitude; 5e-6 is typical
CHECK_TOLERANCE = 1e-4


def errors_against_reference(scan, device: torch.device, groups: int | None, length: int = 300) -> dict:
    """``scan`` against ``selective_scan_ref`` on ``device``, fp32, b=2 d=8 n=4, softplus, D and bias:
    per compared tensor (``"out"``, then each input's gradient by name) the largest error relative to the
    largest reference magnitude, a float."""
    inputs = scan_inputs(2, 8, 4, length, device, torch.float32, groups=groups, seed=1)
    upstream = torch.randn(2, 8, length, generator=torch.Generator().manual_seed(2)).to(device)
    expected_out, expected_grads = forward_backward(ssm.selective_scan_ref, inputs, upstream)
    out, grads = forward_backward(scan, inputs, upstream)
    errors = {"out": ((out - expected_out).abs().max() / expected_out.abs().max()).item()}
    for key, grad in grads.items():
        errors[key] = ((grad - expected_grads[key]).abs().max() / expected_grads[key].abs().max()).item()
    return errors


def check_on_device(device: torch.device) -> bool:
    """Every path ``auto`` may run against the reference, forward and backward, fp32; one line per case.
    The Triton scan, which runs only when asked for, is :func:`triton_verdict`'s."""
    paths = {"selective_scan (dispatch)": ssm.selective_scan, **scan_paths(device)}
    paths.pop("triton", None)
    passed = True
    for groups in (None, 2):
        for name, scan in paths.items():
            errors = errors_against_reference(scan, device, groups)
            worst = max(errors, key=errors.get)
            ok = errors[worst] <= CHECK_TOLERANCE
            passed &= ok
            label = "B, C [b, n, L]" if groups is None else f"B, C [b, {groups}, n, L]"
            print(
                f"  {name:<26} {label:<18} largest relative error {errors[worst]:.1e} ({worst}): "
                f"{'ok' if ok else 'MISMATCH'}"
            )
    return passed


def triton_verdict(device: torch.device, device_name: str, length: int = 300) -> str:
    """One line: whether the Triton scan equals ``selective_scan_ref`` on ``device``, forward and every
    gradient, B and C plain and grouped, with the largest relative errors, and what a user may then set.
    On the CPU it runs in Triton's interpreter (TRITON_INTERPRET=1), which says nothing of a GPU."""
    prefix = f"triton scan vs reference on {device_name}"
    interpreted = triton_interpreted(device)
    if not (triton_on(device) or interpreted):
        why = "Triton is not installed" if not ssm._TRITON_INSTALLED else "no GPU and no TRITON_INTERPRET=1"
        return f"{prefix}: not checked ({why}); keep model.generator.scan_backend: auto"
    from medgan.models.ssm_triton import selective_scan_triton

    forward = backward = 0.0
    for groups in (None, 2):
        errors = errors_against_reference(selective_scan_triton, device, groups, length)
        forward = max(forward, errors.pop("out"))
        backward = max(backward, *errors.values())
    measured = f"{prefix}: forward max err {forward:.1e}, backward {backward:.1e}"
    if max(forward, backward) > CHECK_TOLERANCE:
        return f"{measured}: MISMATCH — keep model.generator.scan_backend: auto"
    if interpreted:
        return f"{measured}: MATCH in Triton's interpreter (says nothing of a GPU)"
    return f"{measured}: MATCH — safe to set model.generator.scan_backend: triton"


def measured_matmul_tflops(device: torch.device, size: int, repeats: int) -> float:
    """bf16 ``[size, size] @ [size, size]`` rate, TFLOP/s (median of ``repeats`` x 10 products)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def ten_products():
        for _ in range(10):
            torch.mm(a, b)

    seconds = median_seconds(ten_products, device, max(repeats, 3))
    return 10 * 2 * size**3 / seconds / 1e12


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in DATASHEET_BF16_TFLOPS if key in name), None)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def triton_first_calls(device: torch.device, settings: dict) -> None:
    """Seconds of the Triton scan's first forward + backward (an empty kernel cache: compile and autotune
    both kernels), of a second call, and of a call at 4x the length (no recompile: keyed on d and n)."""
    from medgan.models.ssm_triton import selective_scan_triton

    batch, dim, dstate = settings["scan_shape"]
    length = settings["scan_lengths"][0]
    cells = []
    for steps in (length, length, 4 * length):
        inputs = scan_inputs(batch, dim, dstate, steps, device, torch.bfloat16)
        upstream = torch.randn(batch, dim, steps, device=device, dtype=torch.bfloat16)
        synchronize(device)
        start = time.perf_counter()
        forward_backward(selective_scan_triton, inputs, upstream)
        synchronize(device)
        cells.append(time.perf_counter() - start)
    print(
        f"\nTriton scan, b={batch} d={dim} n={dstate}, bf16, fwd+bwd: first call (compile + autotune) "
        f"{cells[0]:.1f} s at L={length}; second call {1e3 * cells[1]:.1f} ms; "
        f"L={4 * length} {1e3 * cells[2]:.1f} ms"
    )


ACTIVATION_POINTERS = {"u", "delta", "B", "C", "z", "out", "grad_out", "grad_u", "grad_delta", "grad_z"}


def triton_compile_table(arch: int, shape: tuple[int, int, int]) -> None:
    """Compile both Triton kernels for CUDA ``sm_<arch>`` here, for every autotune config (the docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from medgan.models import ssm_triton

    if ssm_triton.interpreting():
        sys.exit("error: TRITON_INTERPRET=1 is set; unset it to compile the kernels")
    # the cubin Triton made, read by its bundled cuobjdump (its plain ptxas is older than the PTX it emits)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    _, dim, dstate = shape
    block_d, block_n = ssm_triton.block_sizes(dim, dstate, 1)
    options = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=block_d, BLOCK_N=block_n)
    options["CHUNK"] = ssm_triton.CHUNK
    print(f"## Triton {triton.__version__} scan kernels for sm_{arch}: d={dim} n={dstate}, BLOCK_D={block_d}")
    print("| kernel | num_warps | num_stages | compile s | registers | stack bytes | local bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, kernel, extra in (
        ("forward", ssm_triton._forward_kernel, {"KEEP": True}),
        ("backward", ssm_triton._backward_kernel, {"HAS_GRAD_LAST": False, "grad_last_ptr": None}),
    ):
        fn, constants = kernel.fn, {**options, **extra}
        signature = {}
        for arg in fn.arg_names:
            if arg in constants:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*bf16" if arg.removesuffix("_ptr") in ACTIVATION_POINTERS else "*fp32"
            else:
                signature[arg] = "i32"
        constexprs = {(fn.arg_names.index(arg),): value for arg, value in constants.items()}
        for config in kernel.configs:
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            start = time.perf_counter()
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as folder:
                cubin = Path(folder) / "kernel.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run(
                    [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
                ).stdout
            resources = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
            usage = " | ".join(resources.get(key, "-") for key in ("REG", "STACK", "LOCAL"))
            print(f"| {name} | {config.num_warps} | {config.num_stages} | {seconds:.2f} | {usage} |")


def scan_table(device: torch.device, settings: dict) -> None:
    batch, dim, dstate = settings["scan_shape"]
    print(f"\n## Selective scan: b={batch} d={dim} n={dstate}, bf16 u/delta/B/C, fp32 A/D/delta_bias")
    print("| path | L | fwd ms | fwd peak growth GiB | fwd+bwd ms | fwd+bwd peak growth GiB |")
    print("|---|---|---|---|---|---|")
    for name, scan in scan_paths(device).items():
        for length in settings["scan_lengths"]:
            inputs = scan_inputs(batch, dim, dstate, length, device, torch.bfloat16)
            upstream = torch.randn(batch, dim, length, device=device, dtype=torch.bfloat16)
            cells = []
            try:

                def forward(scan=scan, inputs=inputs):
                    with torch.no_grad():
                        scan(**inputs, delta_softplus=True)

                def both(scan=scan, inputs=inputs, upstream=upstream):
                    forward_backward(scan, inputs, upstream)

                for function in (forward, both):
                    with peak_memory(device) as peak:
                        seconds = median_seconds(function, device, settings["repeats"])
                    cells += [f"{1e3 * seconds:.1f}", gib(peak["growth"])]
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                cells += ["out of memory"] * (4 - len(cells))
            print(f"| {name} | {length} | " + " | ".join(cells) + " |")
            del inputs, upstream
            if device.type == "cuda":
                torch.cuda.empty_cache()


@contextmanager
def scan_counted_analytically(calls: list):
    """Replace the generator's scan by a FLOP-free stand-in that records ``(b, d, L, n)`` per call."""

    def stand_in(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **_):
        calls.append((u.shape[0], u.shape[1], u.shape[2], A.shape[1]))
        # sums and products by zero are not FLOPs to the counter, but keep every input in the graph
        touch = (delta.sum() + B.sum() + C.sum() + A.sum() + (0 if D is None else D.sum())) * 0
        if delta_bias is not None:
            touch = touch + delta_bias.sum() * 0
        return u * 1 + touch.to(u.dtype)

    original = blocks.selective_scan
    blocks.selective_scan = stand_in
    try:
        yield
    finally:
        blocks.selective_scan = original


def make_batch(
    batch: int,
    size: int,
    modalities: int,
    device: torch.device,
    dtype=torch.bfloat16,
    context_slices: int = 0,
):
    """Images in [0, 1] (with each slice's 2.5D context when the generator takes one), the first two
    contrasts available, the third the target."""
    images = torch.rand(input_shape(batch, modalities, size, size, context_slices), device=device).to(dtype)
    available = torch.zeros(batch, modalities, dtype=torch.bool, device=device)
    available[:, :2] = True
    target = torch.full((batch,), 2, dtype=torch.long, device=device)
    return images, available, target


def model_flops_per_image(model: torch.nn.Module, size: int, modalities: int, device) -> tuple[float, float]:
    """(all FLOPs, of which the scan's) of one forward + backward of one image (see the docstring)."""
    dtype, context = next(model.parameters()).dtype, model.config.context_slices
    images, available, target = make_batch(1, size, modalities, device, dtype, context)
    calls = []
    with scan_counted_analytically(calls), FlopCounterMode(display=False) as counter:
        out = model(images, available, target)
        F.l1_loss(out, images[:, 2:3]).backward()
    model.zero_grad(set_to_none=True)
    scan = sum(SCAN_FLOPS_PER_ELEMENT * b * d * length * n for b, d, length, n in calls)
    return counter.get_total_flops() + scan, scan


class MasterAdam:
    """Adam on fp32 master copies of bf16 parameters, copied back after each step (DeepSpeed's bf16 way)."""

    def __init__(self, parameters) -> None:
        self.parameters = list(parameters)
        self.master = [p.detach().float() for p in self.parameters]
        self.optimizer = torch.optim.Adam(self.master, lr=1e-4)

    def step(self) -> None:
        for parameter, master in zip(self.parameters, self.master):
            master.grad = parameter.grad.float()
            parameter.grad = None
        self.optimizer.step()
        with torch.no_grad():
            for parameter, master in zip(self.parameters, self.master):
                parameter.copy_(master)


def generator_rows(name, config, device, settings, peaks, flops=None):
    """Print one table row per batch size until out of memory; returns the FLOPs per image used."""
    modalities = len(config.modalities)
    size = settings["image_size"]
    model = build_generator(config).to(device=device, dtype=torch.bfloat16).train()
    if flops is None:
        flops = model_flops_per_image(model, size, modalities, device)
    optimizer = MasterAdam(model.parameters())
    total, scan = flops
    started = time.perf_counter()
    batch = 1
    while batch <= settings["max_batch"]:
        if time.perf_counter() - started > settings["seconds_per_model"]:
            print(
                f"| {name} | {batch} | not run: {settings['seconds_per_model']} s per model spent | | | | |"
            )
            break
        images, available, target = make_batch(
            batch, size, modalities, device, context_slices=model.config.context_slices
        )

        def step(images=images, available=available, target=target, model=model, optimizer=optimizer):
            out = model(images, available, target)
            F.l1_loss(out, images[:, 2:3]).backward()
            optimizer.step()

        try:
            with peak_memory(device) as peak:
                seconds = median_seconds(step, device, settings["steps"])
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            model.zero_grad(set_to_none=True)
            print(f"| {name} | {batch} | out of memory under the cap | | | | |")
            break
        finally:
            del images, available, target
            if device.type == "cuda":
                torch.cuda.empty_cache()
        images_per_second = batch / seconds
        achieved = total * images_per_second / 1e12
        mfu = [f"{100 * achieved / peak_rate:.3g}%" if peak_rate else "-" for peak_rate in peaks]
        print(
            f"| {name} | {batch} | {images_per_second:.3g} | {gib(peak['peak'])} | {achieved:.3g} | "
            f"{mfu[0]} | {mfu[1]} |"
        )
        batch *= 2
    print(
        f"  ({name}: {count_parameters(model) / 1e6:.3g} M parameters; {total / 1e9:.3g} GFLOP per image "
        f"forward + backward, of which the scan {scan / 1e9:.3g})"
    )
    return flops


def generator_settings(path: Path) -> dict:
    """A config file's ``model.generator`` over its ``base:`` file's, as ``medgan.config.read_yaml``
    merges them (that module imports nibabel, which a GPU machine may lack)."""
    loaded = yaml.safe_load(path.read_text()) or {}
    inherited = generator_settings(path.parent / loaded["base"]) if "base" in loaded else {}
    return {**inherited, **loaded.get("model", {}).get("generator", {})}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="the whole script on the CPU, tiny shapes")
    parser.add_argument("--config", default=str(REPO / "configs" / "brats.yaml"), help="model.generator from")
    parser.add_argument("--skip-scan", action="store_true", help="skip the scan table")
    parser.add_argument("--skip-generator", action="store_true", help="skip the generator tables")
    parser.add_argument("--triton-compile", type=int, metavar="SM", help="compile the Triton scan for sm_SM")
    args = parser.parse_args()
    if args.triton_compile:
        with tempfile.TemporaryDirectory(prefix="bench-triton-cache-") as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # compiled, not loaded from an earlier run's cache
            triton_compile_table(args.triton_compile, FULL["scan_shape"])
        return
    settings = DRY if args.dry_run else FULL
    if args.dry_run:
        device = torch.device("cpu")
        # one thread: on a shared CPU, parallel ops of tiny tensors wait for descheduled threads
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        # an empty kernel cache, so that the Triton scan's first call shows its compile time
        os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="bench-triton-cache-"))
    else:
        sys.exit("error: no CUDA device; run with --dry-run to check the script on the CPU")
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"# bench/gpu.py on {name}, torch {torch.__version__}, mamba-ssm kernel: "
          f"{'yes' if ssm._mamba_selective_scan_fn is not None else 'no'}, Triton scan: "
          f"{'yes' if triton_on(device) else 'no'}")  # fmt: skip
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total), device)
        print(f"device memory {total / 2**30:.1f} GiB, capped at {min(total, CAP_BYTES) / 2**30:.1f} GiB")

    print("\n## Scan against selective_scan_ref on the device")
    # the Triton scan is opt-in: its verdict informs the user and does not stop the benchmark
    print(triton_verdict(device, name, settings["check_length"]))
    if not check_on_device(device):
        sys.exit("error: a fast scan path disagrees with selective_scan_ref on this device")

    measured = measured_matmul_tflops(device, settings["matmul_size"], settings["repeats"])
    datasheet = datasheet_tflops(device)
    print(f"\nbf16 matmul peak: measured {measured:.1f} TFLOP/s ({settings['matmul_size']}^2 products), "
          f"datasheet {'-' if datasheet is None else f'{datasheet:.1f}'} TFLOP/s dense")  # fmt: skip

    if not args.skip_scan:
        if triton_on(device):
            triton_first_calls(device, settings)
        scan_table(device, settings)

    if not args.skip_generator:
        generator = generator_settings(Path(args.config))
        if args.dry_run:
            generator = {**generator, **DRY_GENERATOR}
        size = settings["image_size"]
        print(
            f"\n## Generator step at {size} x {size}: forward, L1, backward, Adam (fp32 master); bf16; "
            f"memory capped at {CAP_BYTES / 2**30:.0f} GiB"
        )
        print(
            "| model | batch | images/s | peak allocated GiB | TFLOP/s | MFU (measured peak) "
            "| MFU (datasheet) |"
        )
        print("|---|---|---|---|---|---|---|")
        peaks = (measured, datasheet)
        flops = None
        for name, overrides in VARIANTS:
            config = GeneratorConfig(**{**generator, **overrides})
            if overrides["arch"] == "ssm":
                # checkpointing recomputes, it does not change the model's FLOPs: count them once
                flops = generator_rows(name, config, device, settings, peaks, flops)
            else:
                generator_rows(name, config, device, settings, peaks)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
