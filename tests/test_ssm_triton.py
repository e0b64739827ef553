"""The Triton selective scan equals its sequential reference, forward and backward.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports Triton. With a GPU (and the interpreter off) the same tests
run the compiled kernels on it. In the manner of tests/test_ssm.py: seeded inputs cloned per path, the
same upstream gradient through both, the output and every input's gradient compared.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from test_ssm import INPUT_NAMES, OPTION_SETS, assert_close, leaf_copies, make_inputs, run_with_gradient

from medgan.models import ssm, ssm_triton
from medgan.models.ssm import selective_scan, selective_scan_chunked, selective_scan_ref
from medgan.models.ssm_triton import CHUNK, selective_scan_triton

HAS_CUDA_KERNELS = (
    ssm_triton.triton_available() and not ssm_triton.interpreting() and torch.cuda.is_available()
)
needs_triton = pytest.mark.skipif(
    not ssm_triton.triton_available(),
    reason="Triton is not installed (pip install -e '.[dev]' on x86-64 Linux)",
)
runs_kernels = pytest.mark.skipif(
    not (ssm_triton.interpreting() or HAS_CUDA_KERNELS),
    reason="no GPU, and the kernels were defined without TRITON_INTERPRET=1 (set by tests/conftest.py "
    "unless something imported Triton first, or TRITON_INTERPRET was set otherwise)",
)
DEVICE = torch.device("cuda" if HAS_CUDA_KERNELS else "cpu")

# Relative to the largest reference magnitude of each compared tensor (and element-wise), against the fp64
# reference of the same input values. fp32: measured 4e-7 (sums over L and n in fp32), held to 1e-5.
# fp16 and bf16 u, delta, B, C, z: results rounded to nearest at 11 and 8 mantissa bits, measured 4e-4
# and 3.5e-3 (under half a bf16 step, 2^-8); bf16 held to 8e-3 as tests/test_ssm.py holds the chunked path.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
# the inputs that take the activations' dtype; A, D and delta_bias stay fp32 as DeepSpeed's bf16 mode has them
ACTIVATIONS = ("u", "delta", "B", "C", "z")


def mixed_inputs(dtype, batch, dim, dstate, length, options, groups=None, seed=0):
    """Inputs with u, delta, B, C, z in ``dtype`` and A, D, delta_bias in fp32, on the test device."""
    with_D, with_z, with_bias = options[:3]
    inputs = make_inputs(batch, dim, dstate, length, torch.float64, with_D, with_z, with_bias, seed, groups)
    return {
        name: None if t is None else t.to(DEVICE, dtype if name in ACTIVATIONS else torch.float32)
        for name, t in inputs.items()
    }


def check_triton_against_reference(inputs, delta_softplus, return_last_state, **kwargs):
    """Triton on ``inputs`` against the fp64 reference of the same values: output, last state, gradients."""
    dtype = inputs["u"].dtype
    rtol = TOLERANCES[dtype]
    generator = torch.Generator().manual_seed(1)
    u = inputs["u"]
    dstate = inputs["A"].shape[1]
    upstream_out = torch.randn(u.shape, generator=generator, dtype=torch.float64)
    upstream_last = torch.randn(u.shape[0], u.shape[1], dstate, generator=generator, dtype=torch.float64)
    fast_upstream = (upstream_out.to(DEVICE, dtype), upstream_last.to(DEVICE, torch.float32))
    ref_upstream = (upstream_out.to(dtype).double(), upstream_last)
    fast_inputs = leaf_copies(inputs)
    ref_inputs = leaf_copies({n: None if t is None else t.cpu() for n, t in inputs.items()}, torch.float64)

    def scan(**arguments):
        return selective_scan_triton(**arguments, **kwargs)

    out, last = run_with_gradient(scan, fast_inputs, fast_upstream, delta_softplus, return_last_state)
    ref_out, ref_last = run_with_gradient(
        selective_scan_ref, ref_inputs, ref_upstream, delta_softplus, return_last_state
    )
    assert out.dtype == dtype and out.shape == u.shape and out.device == u.device
    assert_close(out.cpu(), ref_out, rtol, "out")
    if return_last_state:
        assert last.dtype == torch.float32 and last.shape == (u.shape[0], u.shape[1], dstate)
        assert_close(last.cpu(), ref_last, rtol, "last state")
    for name in INPUT_NAMES:
        if inputs[name] is None:
            continue
        grad = fast_inputs[name].grad
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == inputs[name].dtype, (
            f"gradient of {name} is {grad.dtype}, not {inputs[name].dtype}"
        )
        assert_close(grad.cpu(), ref_inputs[name].grad, rtol, f"gradient of {name}")
    return fast_inputs


OPTION_IDS = "D{}-z{}-bias{}-softplus{}-last{}".format


def _scan_slices(self, inputs):
    """Triton's interpreter's ``associative_scan`` with a custom combine: the same left fold along the axis,
    ``acc_i = combine(acc_{i-1}, x_i)``, over whole slices instead of one Python call per element (the
    interpreter's own way, which costs about 100 us per element of a [BLOCK_D, n, CHUNK] tile)."""
    axis, arrays = self.axis, [tensor.handle.data for tensor in inputs]
    outputs = [np.empty_like(array) for array in arrays]
    accumulated = None
    for i in range(arrays[0].shape[axis]):
        current = tuple(self.to_tensor(np.take(a, i, axis), t.dtype) for a, t in zip(arrays, inputs))
        if accumulated is None:
            accumulated = current
        else:
            combined = self.combine_fn.fn(*accumulated, *current)
            accumulated = combined if isinstance(combined, tuple) else (combined,)
        for output, value in zip(outputs, accumulated):
            np.moveaxis(output, axis, 0)[i] = value.handle.data
    return [self.to_tensor(output, tensor.dtype) for output, tensor in zip(outputs, inputs)]


@pytest.fixture(autouse=True)
def fast_interpreter_scan(monkeypatch):
    """The interpreter scans slice by slice (``_scan_slices``); bitwise the same results, see
    test_sliced_interpreter_scan_is_bitwise_the_interpreters_own."""
    if ssm_triton.interpreting():
        from triton.runtime import interpreter

        if hasattr(getattr(interpreter, "ScanOps", None), "generic_scan"):
            monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _scan_slices)


@needs_triton
@runs_kernels
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: OPTION_IDS(*map(int, o)))
@pytest.mark.parametrize("groups", [None, 2], ids=["plain", "G2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_reference(dtype, groups, options):
    # 37 steps: two whole chunks and a partial one
    inputs = mixed_inputs(dtype, 2, 4, 3, 2 * CHUNK + 5, options, groups=groups)
    check_triton_against_reference(inputs, *options[3:])


@needs_triton
@runs_kernels
def test_fp16_activations_match_reference():
    inputs = mixed_inputs(torch.float16, 2, 4, 3, 2 * CHUNK + 5, (True, True, True), groups=2, seed=13)
    check_triton_against_reference(inputs, True, True)


if ssm_triton.triton_available():
    import triton
    import triton.language as tl

    from medgan.models.ssm_triton import _store_rounded

    @triton.jit
    def _store_rounded_kernel(bits_ptr, out_ptr):
        offsets = tl.arange(0, 8)
        bits = tl.load(bits_ptr + offsets)
        _store_rounded(out_ptr + offsets, bits.to(tl.float32, bitcast=True), offsets < 8)


@needs_triton
@runs_kernels
def test_bf16_stores_round_to_nearest_even_and_keep_nan_and_inf():
    """Among them a GPU's NaN, 0x7FFFFFFF: rounding up its bits alone would make it -0.0."""
    values = torch.tensor(
        [1 + 2**-9, 1 + 3 * 2**-9, -(1 + 2**-8 + 2**-10), 3.4e38, float("inf"), -float("inf")]
    )
    bits = torch.cat([values.view(torch.int32), torch.tensor([0x7FFFFFFF, 0x7FC00000], dtype=torch.int32)])
    out = torch.empty(8, dtype=torch.bfloat16, device=DEVICE)
    _store_rounded_kernel[(1,)](bits.to(DEVICE), out)
    expected = bits.view(torch.float32).to(torch.bfloat16)  # torch rounds to nearest even
    assert torch.equal(out.cpu()[:6], expected[:6]), (out, expected)
    assert out.cpu()[6:].isnan().all(), out


@needs_triton
@runs_kernels
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1])
def test_lengths_around_one_chunk(length):
    inputs = mixed_inputs(torch.float32, 1, 3, 5, length, (True, True, True), seed=2)
    check_triton_against_reference(inputs, True, True)


@needs_triton
@runs_kernels
@pytest.mark.parametrize(("dim", "groups", "block_d"), [(6, 2, 2), (10, 2, 4), (5, None, 4), (7, None, 1)])
def test_group_width_not_a_multiple_of_the_block(dim, groups, block_d):
    """Blocks of channels that run past their group's last channel (masked), over several groups."""
    inputs = mixed_inputs(torch.float32, 3, dim, 4, 23, (True, True, True), groups=groups, seed=3)
    check_triton_against_reference(inputs, True, True, block_d=block_d)


@needs_triton
@runs_kernels
@pytest.mark.parametrize("groups", [None, 4])
def test_gradients_are_deterministic(groups):
    """The reductions over b, L and channel blocks are sums in a fixed order, not atomics: bitwise equal."""
    inputs = mixed_inputs(torch.float32, 2, 8, 4, 40, (True, True, True), groups=groups, seed=4)
    grads = []
    for _ in range(2):
        leaves = leaf_copies(inputs)
        out, last = selective_scan_triton(**leaves, delta_softplus=True, return_last_state=True, block_d=2)
        (out.square().sum() + last.sum()).backward()
        grads.append({name: leaves[name].grad for name in INPUT_NAMES})
    for name in INPUT_NAMES:
        assert torch.equal(grads[0][name], grads[1][name]), name


@needs_triton
@runs_kernels
@pytest.mark.parametrize("softplus", [False, True])
def test_strong_decay_and_large_steps_stay_finite(softplus):
    inputs = mixed_inputs(torch.float32, 2, 3, 4, 50, (True, True, True), seed=5)
    inputs["A"] = torch.full_like(inputs["A"], -1e4)
    inputs["A"][0, 0] = -1e-4  # one slow channel beside the fast ones
    inputs["delta"] = 1e3 + 1e3 * inputs["delta"]
    leaves = leaf_copies(inputs)
    out, last = selective_scan_triton(**leaves, delta_softplus=softplus, return_last_state=True)
    (out.sum() + last.sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    for name in INPUT_NAMES:
        assert torch.isfinite(leaves[name].grad).all(), f"non-finite gradient of {name}"
    reference = selective_scan_ref(
        **{n: t.cpu().double() for n, t in inputs.items()}, delta_softplus=softplus
    )
    assert_close(out.cpu(), reference, TOLERANCES[torch.float32], "out")


@needs_triton
@runs_kernels
def test_without_gradients_keeps_nothing_and_matches():
    inputs = mixed_inputs(torch.float32, 1, 4, 3, 20, (True, True, True), seed=6)
    with torch.no_grad():
        out = selective_scan_triton(**inputs, delta_softplus=True)
    reference = selective_scan_ref(**{n: t.cpu().double() for n, t in inputs.items()}, delta_softplus=True)
    assert_close(out.cpu(), reference, TOLERANCES[torch.float32], "out")


@needs_triton
@runs_kernels
def test_only_some_inputs_require_gradients():
    inputs = mixed_inputs(torch.float32, 2, 4, 3, 20, (True, True, True), seed=7)
    u = inputs["u"].clone().requires_grad_()
    out = selective_scan_triton(**{**inputs, "u": u}, delta_softplus=True)
    out.sum().backward()
    leaf = inputs["u"].double().cpu().requires_grad_()
    reference = {n: t.double().cpu() for n, t in inputs.items()}
    selective_scan_ref(**{**reference, "u": leaf}, delta_softplus=True).sum().backward()
    assert_close(u.grad.cpu(), leaf.grad, TOLERANCES[torch.float32], "gradient of u")


@needs_triton
@pytest.mark.skipif(not ssm_triton.interpreting(), reason="compiled kernels: no interpreter scan to patch")
def test_sliced_interpreter_scan_is_bitwise_the_interpreters_own(monkeypatch):
    inputs = mixed_inputs(torch.float32, 1, 3, 2, 19, (True, True, True), groups=None, seed=11)
    results = []
    for _ in range(2):
        leaves = leaf_copies(inputs)
        out, last = selective_scan_triton(**leaves, delta_softplus=True, return_last_state=True)
        (out.square().sum() + last.sum()).backward()
        results.append([out, last] + [leaves[name].grad for name in INPUT_NAMES])
        monkeypatch.undo()  # the second run: the interpreter's element-by-element scan
    for name, sliced, own in zip(["out", "last", *INPUT_NAMES], *results):
        assert torch.equal(sliced, own), name


@needs_triton
def test_fp64_runs_the_chunked_path():
    inputs = make_inputs(2, 4, 3, 30, torch.float64, True, True, True, seed=8, groups=2)
    expected = selective_scan_chunked(**inputs, delta_softplus=True)
    actual = selective_scan_triton(**inputs, delta_softplus=True)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@needs_triton
@runs_kernels
@pytest.mark.parametrize("groups", [None, 2])
def test_dispatch_runs_the_forced_backend(groups):
    inputs = mixed_inputs(torch.float32, 1, 4, 3, 30, (True, True, True), groups=groups, seed=9)
    forced = selective_scan(**inputs, delta_softplus=True, backend="triton")
    direct = selective_scan_triton(**inputs, delta_softplus=True)
    torch.testing.assert_close(forced, direct, rtol=0, atol=0)
    cpu = {n: t.cpu() for n, t in inputs.items()}
    chunked = selective_scan(**cpu, delta_softplus=True, backend="chunked")
    torch.testing.assert_close(chunked, selective_scan_chunked(**cpu, delta_softplus=True), rtol=0, atol=0)


def test_dispatch_refuses_an_unknown_or_missing_backend(monkeypatch):
    inputs = make_inputs(1, 2, 2, 5, torch.float32, False, False, False)
    with pytest.raises(ValueError, match="backend must be one of auto, mamba, triton, chunked; got 'cuda'"):
        selective_scan(**inputs, backend="cuda")
    monkeypatch.setattr(ssm, "_mamba_selective_scan_fn", None)
    with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
        selective_scan(**inputs, backend="mamba")
    monkeypatch.setattr(ssm_triton, "triton", None)
    with pytest.raises(RuntimeError, match="pip install triton"):
        selective_scan(**inputs, backend="triton")


def test_kernels_use_no_reverse_scan():
    """triton-lang/triton#4362: ``associative_scan(reverse=True)`` with a non-commutative combine, such as
    the scan's, is reported to compile to wrong results; the backward scans reversed loads forward."""
    source = inspect.getsource(ssm_triton)
    assert "associative_scan(" in source and "reverse=" not in source


def test_models_import_without_triton():
    """A bare GPU machine or a CPU user without Triton imports the models; a forced Triton scan says what
    to install, in one line."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, medgan.models\n"
        "from medgan.models.ssm import selective_scan\n"
        "x, A = torch.zeros(1, 2, 3), torch.zeros(2, 2)\n"
        "try:\n"
        "    selective_scan(x, x, A, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "the Triton selective scan needs Triton: pip install triton"


@needs_triton
@runs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("groups", [None, 4], ids=["plain", "G4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_generator_sized_scan_matches_reference(dtype, groups):
    """n = 16 and d / G = 24 (two blocks of 16 channels, the second part-full) over 8 chunks and a bit."""
    inputs = mixed_inputs(
        dtype, 2, 96 if groups else 24, 16, 8 * CHUNK + 9, (True, True, True), groups=groups
    )
    check_triton_against_reference(inputs, True, True)


@needs_triton
@runs_kernels
@pytest.mark.slow
def test_long_sequence_matches_reference():
    inputs = mixed_inputs(torch.float32, 1, 4, 8, 1000, (True, False, True), seed=10)
    check_triton_against_reference(inputs, True, False)


@needs_triton
@runs_kernels
@pytest.mark.slow
def test_wide_bf16_scan_matches_reference():
    """The generator's mix at a larger size: bf16 activations, fp32 A/D/bias, d = 64 in 2 groups, n = 16."""
    inputs = mixed_inputs(torch.bfloat16, 2, 64, 16, 300, (True, True, True), groups=2, seed=12)
    check_triton_against_reference(inputs, True, True)


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(
    ssm_triton.triton_available()
    and tuple(int(part) for part in ssm_triton.triton.__version__.split(".")[:2]) < (3, 9),
    reason="bench/gpu.py --triton-compile is written against Triton 3.9's ASTSource",
)
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter accepts more than the compiler: both kernels must compile for sm_90, every config."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "bench/gpu.py", "--triton-compile", "90"]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| forward", "| backward"))]
    assert any(row.startswith("| forward") for row in rows), result.stdout
    assert any(row.startswith("| backward") for row in rows), result.stdout
    for row in rows:
        local_bytes = row.split("|")[-2].strip()
        assert local_bytes == "0", row
