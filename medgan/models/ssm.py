"""The selective scan of Mamba (S6): a fast pure-PyTorch path, its sequential reference, and dispatch.

All three functions share mamba-ssm's signature and semantics (``selective_scan_fn`` /
``selective_scan_ref`` in ``mamba_ssm/ops/selective_scan_interface.py``)::

    delta  = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h_{-1} = 0
    y_t    = <C_t, h_t>                              (sum over the state dimension n)
    out    = (y + D * u) * silu(z)                   (D and z optional)

Shapes: ``u, delta, z: [b, d, L]``; ``A: [d, n]`` (real, normally negative); ``B, C: [b, n, L]``;
``D, delta_bias: [d]``; the last state ``h_L: [b, d, n]``.

``selective_scan`` calls mamba-ssm's CUDA kernel when it is installed and the tensors are on a GPU, and
``selective_scan_chunked`` (pure PyTorch, any device) otherwise. ``selective_scan_ref`` is the plain
sequential recurrence that the tests hold the fast path equal to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except (ImportError, OSError):  # the CUDA extension is optional: pure PyTorch is the documented fallback
    _mamba_selective_scan_fn = None

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_ref", "default_chunk_size"]


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError naming the offending shapes when the arguments do not fit together."""
    if u.dim() != 3:
        raise ValueError(f"u must be [b, d, L], got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be [d, n] with d={dim} (from u {tuple(u.shape)}), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported; A must be real [d, n]")
    dstate = A.shape[1]
    expected = {"delta": (delta, (batch, dim, length)), "B": (B, (batch, dstate, length))}
    expected["C"] = (C, (batch, dstate, length))
    if z is not None:
        expected["z"] = (z, (batch, dim, length))
    if D is not None:
        expected["D"] = (D, (dim,))
    if delta_bias is not None:
        expected["delta_bias"] = (delta_bias, (dim,))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {list(shape)} for u {tuple(u.shape)} and A {tuple(A.shape)}, "
                f"got {tuple(tensor.shape)}"
            )


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp64 inputs are computed in fp64, everything else (fp32, fp16, bf16) in fp32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan as a plain sequential recurrence: one Python step per time step.

    Args:
        u: ``[b, d, L]`` input sequence.
        delta: ``[b, d, L]`` step sizes (``>= 0`` after the optional bias and softplus).
        A: ``[d, n]`` real state matrix (diagonal per channel), normally negative.
        B: ``[b, n, L]`` input projection, per time step.
        C: ``[b, n, L]`` output projection, per time step.
        D: ``[d]`` skip connection, or None.
        z: ``[b, d, L]`` gate, applied as ``out * silu(z)``, or None.
        delta_bias: ``[d]`` added to delta before the softplus, or None.
        delta_softplus: apply softplus to ``delta (+ delta_bias)``.
        return_last_state: also return the final state ``h_L``.

    Returns:
        ``out [b, d, L]`` in u's dtype; with ``return_last_state``, ``(out, h_L)`` where ``h_L`` is
        ``[b, d, n]`` in the compute dtype. Computed in fp32 (fp64 when u is fp64) and cast back, as
        mamba-ssm's reference does; differentiable by autograd, with memory linear in L.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    compute = _compute_dtype(u)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    # unbind, not indexing: the backward of x[:, :, i] allocates a full-size gradient per step (O(L^2))
    decays, drives, outputs = decay.unbind(2), drive.unbind(2), C.unbind(2)
    state = u.new_zeros((batch, dim, dstate))
    ys = []
    for step in range(u.shape[2]):
        state = decays[step] * state + drives[step]
        ys.append(torch.einsum("bdn,bn->bd", state, outputs[step]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, state) if return_last_state else out


def default_chunk_size(length: int) -> int:
    """The chunk size the fast path uses for a sequence of ``length`` steps.

    One scan issues about ``chunk + length / chunk`` tensor operations, fewest at ``chunk ~ sqrt(length)``.
    Measured on 2 CPU cores (docs/performance.md), chunks of 16 to 128 lie within about 10% of each other
    for L = 1k..16k and 16 is best at L = 256; the square root, rounded to a power of two and clamped to
    [16, 128], stays in that flat region. Lengths up to 16 are one chunk.
    """
    if length <= 16:
        return max(length, 1)
    return int(min(128, max(16, 2 ** round(math.log2(math.sqrt(length))))))


def _chunked_linear_scan_(
    decay: torch.Tensor, chunk_decay: torch.Tensor, states: torch.Tensor, reverse: bool
) -> torch.Tensor:
    """Solve the linear recurrence ``h_t = a_t * h_{t-1} + x_t``, or its adjoint, in place, from zero.

    ``reverse`` solves the adjoint, ``h_t = a_{t+1} * h_{t+1} + x_t`` from the last step back: the
    backward pass of the forward recurrence, with the same decays. Every tensor is chunk-major: time
    ``t = c * chunk + p`` sits at ``[p, c]``, so one position of all chunks is one contiguous slab.

    Args:
        decay: ``a``, ``[chunk, n_chunks, b, n, d]``, in ``[0, 1]`` for ``A <= 0``.
        chunk_decay: ``[n_chunks, b, n, d]``, the product of the decays that chunk ``c`` applies to the
            state entering it (``_chunk_decays``).
        states: ``[chunk, n_chunks, b, n, d]``, holding ``x`` on entry and ``h`` on return.
        reverse: solve the adjoint.

    Returns ``states``. Only products of decays appear, never their inverses, so for ``A <= 0`` nothing
    can overflow: decays underflow to 0. No tensor of the size of ``states`` is allocated: on the CPU,
    touching fresh pages costs more than the arithmetic.

    Two levels, each vectorised over the other: (1) every chunk is scanned from a zero state, all chunks
    at once, one tensor op per position in the chunk; (2) the true state entering each chunk is carried
    across chunks (one op per chunk); (3) the entering state, decayed step by step, is added to every
    position of its chunk.
    """
    chunk, n_chunks = decay.shape[:2]
    positions = range(chunk - 1, -1, -1) if reverse else range(chunk)
    step = 1 if reverse else -1  # offset of the neighbour a position depends on
    shift = 1 if reverse else 0  # the adjoint applies the decay of the step after
    for p in positions[1:]:
        torch.addcmul(states[p], decay[p + shift], states[p + step], out=states[p])
    if n_chunks == 1:
        return states
    entering = torch.empty_like(states[0])
    order = range(n_chunks - 1, -1, -1) if reverse else range(n_chunks)
    entering[order[0]].zero_()
    for previous, current in zip(order[:-1], order[1:]):
        # the true state leaving `previous` = its local (zero-start) end state + decayed entering state
        torch.addcmul(
            states[positions[-1], previous], chunk_decay[previous], entering[previous], out=entering[current]
        )
    # the first chunk in scan order already started from the true (zero) state
    later = slice(0, n_chunks - 1) if reverse else slice(1, n_chunks)
    carried = entering[later]
    # chunk c enters through its own first decay; the adjoint's chunk c through chunk c+1's first decay
    carried.mul_(decay[0, 1:])
    states[positions[0], later] += carried
    for p in positions[1:]:
        carried.mul_(decay[p + shift, later])
        states[p, later] += carried
    return states


def _chunk_decays(delta: torch.Tensor, rate: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Per chunk, the product of the decays ``exp(delta_t * A)`` applied to the state entering it.

    ``delta [chunk, n_chunks, b, d]`` chunk-major, ``rate [n, d]``; returns ``[n_chunks, b, n, d]``.
    Forward, a chunk applies its own steps; the adjoint applies steps 1.. of the chunk and step 0 of the
    next one. exp of a sum of ``delta * A <= 0``: never above 1.
    """
    if not reverse:
        return torch.mul(delta.sum(0)[..., None, :], rate).exp_()
    total = delta[1:].sum(0)
    total[:-1] += delta[0, 1:]
    return torch.mul(total[..., None, :], rate).exp_()


# elements of one [rows, n, d] block: 2 MiB in fp32, so a block's temporaries stay in the L2 cache
_BLOCK_ELEMENTS = 2**19


def _row_blocks(rows: int, per_row: int) -> list[slice]:
    """Consecutive slices covering ``range(rows)`` with about ``_BLOCK_ELEMENTS`` elements each."""
    step = max(1, _BLOCK_ELEMENTS // per_row)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _input_gradients(states, grad_states, delta, u, B, grad_y, rate):
    """Gradients of the scan's inputs from the states and their gradients, row by row.

    A row is one (time step, batch element); rows may come in any order, the same in every argument.
    Args: ``states, grad_states [r, n, d]`` (r = L * b rows), ``delta, u, grad_y [r, d]``, ``B [r, n]``,
    ``rate [n, d]`` (A transposed).
    Returns ``grad_u [r, d]``, ``grad_delta [r, d]``, ``grad_rate [n, d]``, ``grad_B [r, n]``,
    ``grad_C [r, n]``. Works block by block so that the ``[r, n, d]`` temporaries stay in cache.
    """
    dstate, dim = rate.shape
    rows = delta.shape[0]
    delta_u = delta * u
    grad_u, grad_delta = torch.empty_like(delta), torch.empty_like(delta)
    grad_B, grad_C = B.new_empty(rows, dstate), B.new_empty(rows, dstate)
    grad_rate = torch.zeros_like(rate)
    block_rows = min(rows, max(1, _BLOCK_ELEMENTS // (dim * dstate)))
    scratch, product = (states.new_empty(block_rows, dstate, dim) for _ in range(2))
    for block in _row_blocks(rows, dim * dstate):
        count = block.stop - block.start
        h, dh, work, prod = states[block], grad_states[block], scratch[:count], product[:count]
        torch.mul(h, grad_y[block, None, :], out=work)
        torch.sum(work, -1, out=grad_C[block])
        torch.mul(dh, delta_u[block, None, :], out=work)
        torch.sum(work, -1, out=grad_B[block])
        # sum_n dh * B serves both du (times delta) and ddelta (times u)
        grad_drive = torch.bmm(B[block, None, :], dh).squeeze(1)
        torch.mul(grad_drive, delta[block], out=grad_u[block])
        torch.mul(grad_drive, u[block], out=grad_delta[block])
        # d(delta_t A) = dh_t * exp(delta_t A) h_{t-1} = dh_t * (h_t - drive_t): no shifted copy of h
        torch.mul(B[block, :, None], delta_u[block, None, :], out=work)
        torch.sub(h, work, out=work)
        work.mul_(dh)
        torch.mul(work, rate, out=prod)
        grad_delta[block] += prod.sum(1)
        torch.mul(work, delta[block, None, :], out=prod)
        grad_rate += prod.sum(0)
    return grad_u, grad_delta, grad_rate, grad_B, grad_C


def _to_chunk_major(tensor: torch.Tensor, chunk: int, padded: int) -> torch.Tensor:
    """``[b, c, L]`` -> contiguous chunk-major ``[chunk, padded // chunk, b, c]``, zero-padded in time.

    Time ``i * chunk + p`` lands at ``[p, i]``; steps ``L .. padded - 1`` are zeros.
    """
    batch, channels, length = tensor.shape
    if padded > length:
        tensor = F.pad(tensor, (0, padded - length))
    return tensor.reshape(batch, channels, padded // chunk, chunk).permute(3, 2, 0, 1).contiguous()


def _from_chunk_major(tensor: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Chunk-major ``[chunk, n_chunks, b, c]`` -> contiguous ``[b, c, length]`` in ``dtype``."""
    chunk, n_chunks, batch, channels = tensor.shape
    time_ordered = tensor.permute(2, 3, 1, 0).reshape(batch, channels, chunk * n_chunks)
    return time_ordered[:, :, :length].to(dtype).contiguous()


def _effective_delta(delta, delta_bias, delta_softplus, compute):
    """``softplus(delta + delta_bias)`` in the compute dtype, plus the pre-softplus value (or None)."""
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if not delta_softplus:
        return delta, None
    return F.softplus(delta), delta


class _SelectiveScanChunked(torch.autograd.Function):
    """Chunked selective scan with a hand-written backward (the reverse recurrence)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk):
        ctx.set_materialize_grads(False)
        compute = _compute_dtype(u)
        batch, dim, length = u.shape
        padded = math.ceil(length / chunk) * chunk
        delta_eff, delta_pre = _effective_delta(delta, delta_bias, delta_softplus, compute)
        # padding with delta = 0 gives decay 1 and drive 0: the state passes through unchanged
        delta_cm = _to_chunk_major(delta_eff, chunk, padded)
        u_cm = _to_chunk_major(u.to(compute), chunk, padded)
        B_cm = _to_chunk_major(B.to(compute), chunk, padded)
        C_cm = _to_chunk_major(C.to(compute), chunk, padded)
        rate = A.to(compute).t().contiguous()
        states = (delta_cm * u_cm)[..., None, :] * B_cm[..., None]
        decay = torch.mul(delta_cm[..., None, :], rate).exp_()
        _chunked_linear_scan_(decay, _chunk_decays(delta_cm, rate, False), states, reverse=False)
        rows = padded * batch
        y = torch.bmm(C_cm.view(rows, 1, -1), states.view(rows, -1, dim))
        y = _from_chunk_major(y.view(chunk, -1, batch, dim), length, compute)
        if D is not None:
            y = y + u.to(compute) * D.to(compute)[:, None]
        out = y if z is None else y * F.silu(z.to(compute))
        last_state = None
        if return_last_state:
            last_state = states[(length - 1) % chunk, (length - 1) // chunk].transpose(1, 2).contiguous()
        # the decays are kept for the adjoint scan: recomputing them costs as much as the scan itself
        ctx.save_for_backward(
            u, delta, A, B, C, D, z, delta_bias, states, decay, y if z is not None else None
        )
        ctx.delta_softplus = delta_softplus
        out = out.to(u.dtype)
        return (out, last_state) if return_last_state else out

    @staticmethod
    def backward(ctx, grad_out, grad_last_state=None):
        u, delta, A, B, C, D, z, delta_bias, states, decay, pre_gate = ctx.saved_tensors
        compute = _compute_dtype(u)
        batch, dim, length = u.shape
        chunk, n_chunks = states.shape[:2]
        padded = chunk * n_chunks
        u_c, rate = u.to(compute), A.to(compute).t().contiguous()
        grad_out = torch.zeros_like(u_c) if grad_out is None else grad_out.to(compute)
        grad_z = grad_D = None
        if z is not None:
            z_c = z.to(compute)
            gate = torch.sigmoid(z_c)
            # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
            grad_z = (grad_out * pre_gate * gate * (1 + z_c * (1 - gate))).to(z.dtype)
            grad_out = grad_out * (z_c * gate)
        if D is not None:
            grad_D = (grad_out * u_c).sum((0, 2)).to(D.dtype)

        delta_eff, delta_pre = _effective_delta(delta, delta_bias, ctx.delta_softplus, compute)
        delta_cm = _to_chunk_major(delta_eff, chunk, padded)
        u_cm = _to_chunk_major(u_c, chunk, padded)
        B_cm = _to_chunk_major(B.to(compute), chunk, padded)
        C_cm = _to_chunk_major(C.to(compute), chunk, padded)
        grad_y_cm = _to_chunk_major(grad_out, chunk, padded)

        # dh_t = C_t * dy_t + exp(delta_{t+1} A) * dh_{t+1}: the adjoint of the forward recurrence
        grad_states = grad_y_cm[..., None, :] * C_cm[..., None]
        if grad_last_state is not None:
            last = grad_states[(length - 1) % chunk, (length - 1) // chunk]
            last += grad_last_state.to(compute).transpose(1, 2)
        chunk_decay = _chunk_decays(delta_cm, rate, True)
        _chunked_linear_scan_(decay, chunk_decay, grad_states, reverse=True)

        rows = padded * batch
        grad_u, grad_delta, grad_rate, grad_B, grad_C = _input_gradients(
            states.view(rows, -1, dim),
            grad_states.view(rows, -1, dim),
            delta_cm.view(rows, dim),
            u_cm.view(rows, dim),
            B_cm.view(rows, -1),
            grad_y_cm.view(rows, dim),
            rate,
        )
        chunk_major = (chunk, n_chunks, batch, -1)
        grad_u, grad_delta = grad_u.view(chunk_major), grad_delta.view(chunk_major)
        grad_B, grad_C = grad_B.view(chunk_major), grad_C.view(chunk_major)
        grad_delta = _from_chunk_major(grad_delta, length, compute)
        if delta_pre is not None:
            grad_delta = grad_delta * torch.sigmoid(delta_pre)
        grad_bias = None if delta_bias is None else grad_delta.sum((0, 2)).to(delta_bias.dtype)
        grad_u = _from_chunk_major(grad_u, length, compute)
        if D is not None:
            grad_u = grad_u + grad_out * D.to(compute)[:, None]
        return (
            grad_u.to(u.dtype),
            grad_delta.to(delta.dtype),
            grad_rate.t().to(A.dtype),
            _from_chunk_major(grad_B, length, B.dtype),
            _from_chunk_major(grad_C, length, C.dtype),
            grad_D,
            grad_z,
            grad_bias,
            None,
            None,
            None,
        )


def selective_scan_chunked(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    chunk_size: int | None = None,
):
    """The selective scan in pure PyTorch, chunked, with a hand-written backward; any device.

    Arguments, shapes, result and dtypes as ``selective_scan_ref`` (which see); ``chunk_size`` (>= 1)
    defaults to ``default_chunk_size(L)`` and changes only speed, not the result beyond rounding.

    Promises: equal to ``selective_scan_ref`` forward and backward within rounding of the compute dtype
    (fp32, or fp64 for fp64 inputs); no inf/NaN for any ``A <= 0`` and ``delta >= 0`` however large,
    at any chunk size (only decays ``<= 1`` are multiplied, never divided by); memory linear in L: two
    ``[L, b, n, d]`` tensors in the compute dtype (states and decays, kept for the backward), a third
    during the backward. Python-level work is ``O(chunk_size + L / chunk_size)`` tensor operations per
    scan, each vectorised over all chunks; never one per time step.

    Why not Mamba-2's segment-sum form (a masked ``[chunk, chunk]`` decay matrix per chunk, applied by
    matmul): with an ``A`` that differs per ``(d, n)`` that matrix differs per ``(d, n)`` too, which
    costs ``O(L * chunk * d * n)`` exps and products against this scan's ``O(L * d * n)``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    chunk = default_chunk_size(u.shape[2]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _SelectiveScanChunked.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state), chunk
    )


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan: mamba-ssm's CUDA kernel where available, else the pure-PyTorch fast path.

    Arguments, shapes, result and dtypes as ``selective_scan_ref`` (which see). The CUDA kernel is used
    when ``mamba_ssm`` is importable and ``u`` is on a CUDA device; otherwise ``selective_scan_chunked``
    with its default chunk size. A missing extension is not an error and is not logged.
    """
    if _mamba_selective_scan_fn is not None and u.is_cuda:
        return _mamba_selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
