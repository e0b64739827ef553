"""The fast selective scan equals its sequential reference, forward and backward, on the CPU.

In the manner of mamba-ssm's ``tests/ops/test_selective_scan.py``: seeded inputs, cloned with
``detach().clone().requires_grad_()`` for each path, the same upstream gradient through both, and the
output and every input's gradient compared with per-dtype tolerances.
"""

from __future__ import annotations

import pytest
import torch

from medgan.models import ssm
from medgan.models.ssm import (
    default_chunk_size,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

# Relative to the largest reference magnitude of each compared tensor (and element-wise): fp64 is held to
# 1e-9 (measured 1e-15); fp32 to 5e-6 (measured 4e-7: sums over L of fp32 products); bf16 results
# are rounded to 8 mantissa bits (measured 2e-3, half a step of 2^-8), held to two steps (8e-3) of
# the fp64 reference of the same bf16 inputs.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 5e-6, torch.bfloat16: 8e-3}
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# (D, z, delta_bias, delta_softplus, return_last_state)
OPTION_SETS = [
    (False, False, False, False, False),
    (True, True, True, True, True),
    (True, False, True, True, False),
    (False, True, False, False, True),
]


def make_inputs(batch, dim, dstate, length, dtype, with_D, with_z, with_bias, seed=0, groups=None):
    """Seeded inputs distributed as in mamba-ssm's test; the optional ones are None when not asked for.

    ``groups``: None for ``B, C [b, n, L]``, else grouped ``[b, groups, n, L]``.
    """
    generator = torch.Generator().manual_seed(seed)
    projection = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64).to(dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return {
        "u": randn(batch, dim, length),
        "delta": 0.5 * rand(batch, dim, length),
        "A": -0.5 * rand(dim, dstate),
        "B": randn(*projection),
        "C": randn(*projection),
        "D": randn(dim) if with_D else None,
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": 0.5 * rand(dim) if with_bias else None,
    }


def leaf_copies(inputs, dtype=None):
    """Fresh leaf tensors (optionally cast) that collect their own gradients; None stays None."""
    return {
        name: None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_()
        for name, t in inputs.items()
    }


def run_with_gradient(scan, inputs, upstream, delta_softplus, return_last_state, **kwargs):
    """Forward ``scan``, send ``upstream`` (out's, and the last state's) back; return the outputs."""
    result = scan(**inputs, delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
    out, last_state = result if return_last_state else (result, None)
    loss = (out.to(upstream[0].dtype) * upstream[0]).sum()
    if last_state is not None:
        loss = loss + (last_state.to(upstream[1].dtype) * upstream[1]).sum()
    loss.backward()
    return out, last_state


def assert_close(actual, expected, rtol, what):
    """Element-wise relative check with an absolute floor of ``rtol`` times the largest reference value."""
    expected = expected.detach().double()
    floor = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        actual.detach().double(), expected, rtol=rtol, atol=floor, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(inputs, dtype, delta_softplus, return_last_state, chunk_size=None):
    """Run fast and reference paths on the same inputs and upstream gradients and compare everything."""
    rtol = TOLERANCES[dtype]
    fast_inputs = leaf_copies(inputs)
    # bf16 is compared with the fp64 reference of the same (bf16-valued) inputs; others in their own dtype
    ref_dtype = torch.float64 if dtype == torch.bfloat16 else dtype
    ref_inputs = leaf_copies(inputs, ref_dtype)
    u = inputs["u"]
    generator = torch.Generator().manual_seed(1)
    upstream_out = torch.randn(u.shape, generator=generator, dtype=torch.float64).to(dtype)
    dstate = inputs["A"].shape[1]
    upstream_last = torch.randn(u.shape[0], u.shape[1], dstate, generator=generator, dtype=torch.float64)
    upstream_fast = (
        upstream_out,
        upstream_last.to(torch.float64 if dtype == torch.float64 else torch.float32),
    )
    upstream_ref = (upstream_out.to(ref_dtype), upstream_last.to(ref_dtype))

    out, last = run_with_gradient(
        selective_scan_chunked,
        fast_inputs,
        upstream_fast,
        delta_softplus,
        return_last_state,
        chunk_size=chunk_size,
    )
    ref_out, ref_last = run_with_gradient(
        selective_scan_ref, ref_inputs, upstream_ref, delta_softplus, return_last_state
    )
    assert out.dtype == dtype and out.shape == u.shape
    assert_close(out, ref_out, rtol, "out")
    if return_last_state:
        assert last.shape == (u.shape[0], u.shape[1], dstate)
        assert_close(last, ref_last, rtol, "last state")
    for name in INPUT_NAMES:
        if inputs[name] is None:
            continue
        grad, ref_grad = fast_inputs[name].grad, ref_inputs[name].grad
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == dtype, f"gradient of {name} is {grad.dtype}, input is {dtype}"
        assert_close(grad, ref_grad, rtol, f"gradient of {name}")


@pytest.mark.parametrize(
    "options", OPTION_SETS, ids=lambda o: "D{}-z{}-bias{}-softplus{}-last{}".format(*map(int, o))
)
@pytest.mark.parametrize("length", [1, 7, 67, 300, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_fast_path_matches_reference(dtype, length, options):
    with_D, with_z, with_bias, delta_softplus, return_last_state = options
    inputs = make_inputs(2, 4, 3, length, dtype, with_D, with_z, with_bias)
    check_against_reference(inputs, dtype, delta_softplus, return_last_state)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16, 64, 67, 128])
def test_every_chunk_size_matches_reference(chunk_size):
    inputs = make_inputs(2, 3, 5, 67, torch.float64, True, True, True, seed=2)
    check_against_reference(inputs, torch.float64, True, True, chunk_size=chunk_size)


def test_wider_state_and_batch():
    inputs = make_inputs(3, 8, 16, 130, torch.float32, True, True, True, seed=3)
    check_against_reference(inputs, torch.float32, True, True)


def test_long_sequence():
    inputs = make_inputs(1, 2, 4, 4096, torch.float32, True, False, True, seed=4)
    check_against_reference(inputs, torch.float32, True, False)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 256, 1000])
@pytest.mark.parametrize("softplus", [False, True])
def test_strong_decay_and_large_steps_stay_finite(chunk_size, softplus):
    inputs = make_inputs(2, 3, 4, 300, torch.float32, True, True, True, seed=5)
    inputs["A"] = torch.full_like(inputs["A"], -1e4)
    inputs["A"][0, 0] = -1e-4  # one slow channel beside the fast ones
    inputs["delta"] = 1e3 + 1e3 * inputs["delta"]
    leaves = leaf_copies(inputs)
    out, last = selective_scan_chunked(
        **leaves, delta_softplus=softplus, return_last_state=True, chunk_size=chunk_size
    )
    (out.sum() + last.sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    for name in INPUT_NAMES:
        assert torch.isfinite(leaves[name].grad).all(), f"non-finite gradient of {name}"
    ref_out = selective_scan_ref(**inputs, delta_softplus=softplus)
    assert_close(out, ref_out, TOLERANCES[torch.float32], "out")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few chunks, so that short test sequences cross several blocks (as long ones do)."""
    monkeypatch.setattr(ssm, "_BLOCK_ELEMENTS", 1)


@pytest.mark.parametrize(
    "options", OPTION_SETS, ids=lambda o: "D{}-z{}-bias{}-softplus{}-last{}".format(*map(int, o))
)
@pytest.mark.parametrize("length", [1, 16, 67, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_many_blocks_match_reference(small_blocks, dtype, length, options):
    with_D, with_z, with_bias, delta_softplus, return_last_state = options
    inputs = make_inputs(2, 4, 3, length, dtype, with_D, with_z, with_bias, seed=6)
    check_against_reference(inputs, dtype, delta_softplus, return_last_state, chunk_size=5)


@pytest.mark.parametrize("block_elements", [1, 3 * 40 * 2, 3 * 40 * 3, 2**20])
@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_every_block_size_matches_reference(monkeypatch, block_elements, chunk_size):
    monkeypatch.setattr(ssm, "_BLOCK_ELEMENTS", block_elements)
    inputs = make_inputs(2, 5, 4, 100, torch.float64, True, True, True, seed=7, groups=None)
    check_against_reference(inputs, torch.float64, True, True, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "options", OPTION_SETS, ids=lambda o: "D{}-z{}-bias{}-softplus{}-last{}".format(*map(int, o))
)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_grouped_B_and_C_match_reference(small_blocks, dtype, groups, options):
    with_D, with_z, with_bias, delta_softplus, return_last_state = options
    inputs = make_inputs(2, 8, 3, 45, dtype, with_D, with_z, with_bias, seed=8, groups=groups)
    check_against_reference(inputs, dtype, delta_softplus, return_last_state, chunk_size=4)


def test_grouped_reference_is_one_scan_per_group():
    """Channel i reads group i // (d / G): G scans over the channel slices give the same result."""
    groups, dim = 4, 8
    inputs = make_inputs(2, dim, 3, 30, torch.float64, True, True, True, seed=9, groups=groups)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    width = dim // groups
    for group in range(groups):
        channels = slice(group * width, (group + 1) * width)
        per_group = {
            name: t if name in ("B", "C") else t[..., channels, :] if t.dim() == 3 else t[channels]
            for name, t in inputs.items()
        }
        per_group["B"], per_group["C"] = inputs["B"][:, group], inputs["C"][:, group]
        expected, expected_last = selective_scan_ref(**per_group, delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(out[:, channels], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(last[:, channels], expected_last, rtol=1e-12, atol=1e-12)


def test_one_group_is_the_ungrouped_scan():
    inputs = make_inputs(2, 4, 3, 50, torch.float32, True, True, True, seed=10)
    grouped = {**inputs, "B": inputs["B"][:, None], "C": inputs["C"][:, None]}
    plain_leaves, grouped_leaves = leaf_copies(inputs), leaf_copies(grouped)
    upstream = torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(0))
    plain_out = selective_scan_chunked(**plain_leaves, delta_softplus=True)
    grouped_out = selective_scan_chunked(**grouped_leaves, delta_softplus=True)
    (plain_out * upstream).sum().backward()
    (grouped_out * upstream).sum().backward()
    torch.testing.assert_close(grouped_out, plain_out, rtol=0, atol=0)
    for name in INPUT_NAMES:
        expected = plain_leaves[name].grad
        actual = grouped_leaves[name].grad
        torch.testing.assert_close(actual.view(expected.shape), expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("with_z", [False, True])
def test_what_the_fast_path_keeps_for_the_backward_is_linear_in_b_d_L(with_z):
    """Besides its inputs, only the states entering each chunk (b * d * n * L / chunk elements) and, with
    z, the pre-gate output (b * d * L): not the [L, b, n, d] states."""
    batch, dim, dstate, length, chunk = 2, 8, 4, 256, 16
    leaves = leaf_copies(make_inputs(batch, dim, dstate, length, torch.float32, True, with_z, True))
    inputs = {t.data_ptr() for t in leaves.values() if t is not None}
    kept = []

    def pack(tensor):
        if tensor.data_ptr() not in inputs:
            kept.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        selective_scan_chunked(**leaves, delta_softplus=True, chunk_size=chunk).sum().backward()
    expected = batch * dim * dstate * length // chunk + (batch * dim * length if with_z else 0)
    assert sum(kept) == expected, kept


@pytest.mark.parametrize("groups", [None, 2])
def test_dispatch_on_cpu_is_the_pure_pytorch_path(groups):
    inputs = make_inputs(1, 4, 3, 50, torch.float32, True, True, True, groups=groups)
    fast = selective_scan(**inputs, delta_softplus=True)
    chunked = selective_scan_chunked(**inputs, delta_softplus=True)
    torch.testing.assert_close(fast, chunked, rtol=0, atol=0)


class LooksLikeCuda(torch.Tensor):
    """A CPU tensor that says it is on a GPU: what the dispatch sees of a CUDA tensor, here without one."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_auto_on_a_gpu_without_mamba_runs_the_chunked_path_not_triton(monkeypatch):
    """Triton importable and the GPU new enough, mamba-ssm absent: ``auto`` still never runs the Triton
    kernels (they have not been shown equal to the reference on any GPU); the chunked path runs."""
    from medgan.models import ssm_triton

    called = []
    monkeypatch.setattr(ssm, "_mamba_selective_scan_fn", None)
    # the code before this change asked this whether the Triton scan could run on the tensor's GPU
    monkeypatch.setattr(ssm, "_triton_runs_on", lambda u: True, raising=False)
    monkeypatch.setattr(ssm_triton, "selective_scan_triton", lambda *args: called.append("triton"))
    monkeypatch.setattr(ssm, "selective_scan_chunked", lambda *args: called.append("chunked"))
    inputs = make_inputs(1, 4, 3, 20, torch.float32, True, True, True)
    u = inputs.pop("u").as_subclass(LooksLikeCuda)
    assert u.is_cuda
    selective_scan(u, **inputs, delta_softplus=True)
    assert called == ["chunked"]


@pytest.mark.parametrize(
    "requested, on_cuda, mamba_available, chosen",
    [
        ("auto", True, True, "mamba"),
        ("auto", True, False, "chunked"),
        ("auto", False, True, "chunked"),
        ("auto", False, False, "chunked"),
        ("triton", True, True, "triton"),
        ("triton", False, False, "triton"),
        ("mamba", False, False, "mamba"),
        ("chunked", True, True, "chunked"),
    ],
)
def test_choose_backend_never_picks_triton_unasked(requested, on_cuda, mamba_available, chosen):
    assert ssm.choose_backend(requested, on_cuda, mamba_available) == chosen


def test_choose_backend_refuses_an_unknown_name_in_one_line():
    with pytest.raises(
        ValueError, match=r"^backend must be one of auto, mamba, triton, chunked; got 'torch'$"
    ):
        ssm.choose_backend("torch", True, True)


def test_gradient_check_is_sharp_enough_to_catch_a_wrong_result():
    inputs = make_inputs(1, 3, 4, 40, torch.float64, True, True, True)
    out = selective_scan_chunked(**inputs, delta_softplus=True)
    wrong = selective_scan_ref(**{**inputs, "A": inputs["A"] * (1 + 1e-7)}, delta_softplus=True)
    with pytest.raises(AssertionError):
        assert_close(out, wrong, TOLERANCES[torch.float64], "out")


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("delta", (1, 4, 9)),
        ("A", (5, 3)),
        ("B", (1, 2, 10)),
        ("B", (1, 3, 3, 10)),
        ("C", (1, 2, 3, 10)),
        ("D", (3,)),
        ("z", (1, 4, 11)),
    ],
)
def test_mismatched_shapes_are_refused_with_both_shapes_named(name, shape):
    inputs = make_inputs(1, 4, 3, 10, torch.float32, True, True, True)
    inputs[name] = torch.zeros(shape)
    for scan in (selective_scan_chunked, selective_scan_ref):
        with pytest.raises(ValueError, match=name):
            scan(**inputs)


def test_default_chunk_size_is_16_or_the_whole_sequence():
    assert default_chunk_size(1) == 1
    assert default_chunk_size(10) == 10
    assert all(default_chunk_size(length) == 16 for length in (16, 17, 4096, 1 << 20))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**make_inputs(1, 2, 2, 5, torch.float32, False, False, False), chunk_size=0)
