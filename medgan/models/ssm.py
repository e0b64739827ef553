"""The selective scan of Mamba (S6): a fast pure-PyTorch path, its sequential reference, and dispatch.

All three functions share mamba-ssm's signature and semantics (``selective_scan_fn`` /
``selective_scan_ref`` in ``mamba_ssm/ops/selective_scan_interface.py``)::

    delta  = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h_{-1} = 0
    y_t    = <C_t, h_t>                              (sum over the state dimension n)
    out    = (y + D * u) * silu(z)                   (D and z optional)

Shapes: ``u, delta, z: [b, d, L]``; ``A: [d, n]`` (real, normally negative); ``B, C: [b, n, L]``, or
grouped ``[b, G, n, L]`` with ``d`` divisible by ``G``, channel ``i`` reading group ``i // (d // G)``
(``G = 1`` is the ungrouped form); ``D, delta_bias: [d]``; the last state ``h_L: [b, d, n]``.

``selective_scan`` calls, for tensors on a GPU, mamba-ssm's CUDA kernel when it is installed, else
``selective_scan_chunked`` (pure PyTorch, any device); the Triton kernels of ``medgan.models.ssm_triton``
only when asked for (``backend="triton"``). ``selective_scan_ref`` is the plain sequential recurrence
that the tests hold the fast paths equal to.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except (ImportError, OSError):  # the CUDA extension is optional: pure PyTorch is the documented fallback
    _mamba_selective_scan_fn = None

__all__ = [
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "default_chunk_size",
    "BACKENDS",
    "choose_backend",
]


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> int:
    """Raise ValueError naming the offending shapes when the arguments do not fit together.

    Returns the number of groups ``G`` of B and C (1 for ``[b, n, L]``).
    """
    if u.dim() != 3:
        raise ValueError(f"u must be [b, d, L], got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be [d, n] with d={dim} (from u {tuple(u.shape)}), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported; A must be real [d, n]")
    dstate = A.shape[1]
    groups = B.shape[1] if B.dim() == 4 else 1
    if B.dim() == 4 and dim % groups:
        raise ValueError(f"B has {groups} groups (shape {tuple(B.shape)}), which must divide d={dim}")
    grouped = (batch, groups, dstate, length) if B.dim() == 4 else (batch, dstate, length)
    expected = {"delta": (delta, (batch, dim, length)), "B": (B, grouped), "C": (C, grouped)}
    if z is not None:
        expected["z"] = (z, (batch, dim, length))
    if D is not None:
        expected["D"] = (D, (dim,))
    if delta_bias is not None:
        expected["delta_bias"] = (delta_bias, (dim,))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {list(shape)} for u {tuple(u.shape)}, A {tuple(A.shape)} and "
                f"B {tuple(B.shape)}, got {tuple(tensor.shape)}"
            )
    return groups


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp64 inputs are computed in fp64, everything else (fp32, fp16, bf16) in fp32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _per_channel(projection: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C, ``[b, n, L]`` or ``[b, G, n, L]``, as ``[b, d, n, L]``: each channel's own group."""
    if projection.dim() == 3:
        return projection[:, None].expand(-1, dim, -1, -1)
    return projection.repeat_interleave(dim // projection.shape[1], dim=1)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan as a plain sequential recurrence: one Python step per time step.

    Args:
        u: ``[b, d, L]`` input sequence.
        delta: ``[b, d, L]`` step sizes (``>= 0`` after the optional bias and softplus).
        A: ``[d, n]`` real state matrix (diagonal per channel), normally negative.
        B: ``[b, n, L]`` or ``[b, G, n, L]`` (``G`` divides ``d``) input projection, per time step.
        C: the output projection, per time step, shaped as B.
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
    B, C = _per_channel(B, dim), _per_channel(C, dim)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    # unbind, not indexing: the backward of x[:, :, i] allocates a full-size gradient per step (O(L^2))
    decays, drives, outputs = decay.unbind(2), drive.unbind(2), C.unbind(3)
    state = u.new_zeros((batch, dim, dstate))
    ys = []
    for step in range(u.shape[2]):
        state = decays[step] * state + drives[step]
        ys.append(torch.einsum("bdn,bdn->bd", state, outputs[step]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, state) if return_last_state else out


def default_chunk_size(length: int) -> int:
    """The chunk size the fast path uses for a sequence of ``length`` steps: 16, or ``length`` if shorter.

    The chunk is the spacing of the states the forward keeps for the backward (``b * d * n * L / chunk``
    elements: at most ``b * d * L`` for ``n <= 16``) and the length of the Python loops inside a block.
    Measured on 2 CPU cores (docs/performance.md): 16 is within a few percent of the best of 8..64 for
    L = 256..16k, and shorter chunks keep more states.
    """
    return max(1, min(length, 16))


# elements of one [chunk, chunks per block, b, n, d] work buffer. On the CPU a few of them stay in the
# L2/L3 cache (2**19 and 2**21 measured 10% and 18% slower); on a GPU each op must hide a kernel launch.
_BLOCK_ELEMENTS = 2**20
_DEVICE_BLOCK_ELEMENTS = 2**26


def _chunks_per_block(chunk: int, state_elements: int, n_chunks: int, device: torch.device) -> int:
    """How many chunks one block scans at once: as many as fit the work-buffer budget of ``device``."""
    budget = _BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(1, min(n_chunks, budget // (chunk * state_elements)))


def _chunked_linear_scan_(
    decay: torch.Tensor,
    chunk_decay: torch.Tensor,
    states: torch.Tensor,
    carry: torch.Tensor,
    entering: torch.Tensor,
    reverse: bool,
) -> torch.Tensor:
    """Solve ``h_t = a_t * h_{t-1} + x_t`` over one block of chunks, or its adjoint, in place.

    Args:
        decay: ``a``, ``[chunk, k, *S]`` (``k`` chunks of the block; ``S`` any state shape), in ``[0, 1]``
            for ``A <= 0``. Chunk-major: time ``c * chunk + p`` of the block sits at ``[p, c]``.
        chunk_decay: ``[k, *S]``, the product of each chunk's decays.
        states: ``[chunk, k, *S]``, holding ``x`` on entry and ``h`` on return.
        carry: ``[*S]``. Forward: the state before the block's first step. Reverse: ``a_{t+1} g_{t+1}``
            from the step after the block (zero after the last).
        entering: ``[k, *S]``, filled with what enters each chunk: forward the state before its first
            step, reverse ``a_{t+1} g_{t+1}`` from the step after its last.
        reverse: solve the adjoint ``g_t = a_{t+1} * g_{t+1} + x_t``, from the block's last step back.

    Returns the carry for the next block in scan order: forward the state after the block's last step,
    reverse ``a_{t0} g_{t0}`` of its first step. Only products of decays appear, never their inverses,
    so for ``A <= 0`` nothing can overflow: decays underflow to 0.

    (1) every chunk is scanned from zero, all ``k`` at once, one op per position; (2) what enters each
    chunk is carried across the chunks (one op per chunk); (3) it is added, decayed step by step, to
    every position of its chunk.
    """
    chunk, chunks = decay.shape[:2]
    if reverse:
        for p in range(chunk - 2, -1, -1):
            torch.addcmul(states[p], decay[p + 1], states[p + 1], out=states[p])
        entering[chunks - 1].copy_(carry)
        for c in range(chunks - 1, 0, -1):
            # a_first * g_first of chunk c: its local first value, decayed once, plus its entering, decayed
            # through the whole chunk
            torch.mul(decay[0, c], states[0, c], out=entering[c - 1])
            entering[c - 1].addcmul_(chunk_decay[c], entering[c])
        outgoing = torch.mul(decay[0, 0], states[0, 0]).addcmul_(chunk_decay[0], entering[0])
        states[chunk - 1] += entering
        carried = entering * decay[chunk - 1]
        for p in range(chunk - 2, -1, -1):
            states[p] += carried
            if p:
                carried.mul_(decay[p])
        return outgoing
    for p in range(1, chunk):
        torch.addcmul(states[p], decay[p], states[p - 1], out=states[p])
    entering[0].copy_(carry)
    for c in range(chunks - 1):
        torch.addcmul(states[chunk - 1, c], chunk_decay[c], entering[c], out=entering[c + 1])
    outgoing = torch.addcmul(states[chunk - 1, chunks - 1], chunk_decay[chunks - 1], entering[chunks - 1])
    carried = entering * decay[0]
    states[0] += carried
    for p in range(1, chunk):
        carried.mul_(decay[p])
        states[p] += carried
    return outgoing


def _input_gradients(states, grad_states, delta, u, B, grad_y, rate, work):
    """Gradients of the scan's inputs from the states and their gradients, row by row.

    A row is one (time step, batch element); rows may come in any order, the same in every argument.
    Args: ``states, grad_states [r, G, n, g]`` (``g = d / G`` channels per group), ``delta, u, grad_y
    [r, G, g]``, ``B [r, G, n]``, ``rate [G, n, g]`` (A per group, transposed), ``work``: scratch shaped
    as ``states``. ``grad_states`` is overwritten (used as a second scratch once it has been read).
    Returns ``grad_u [r, G, g]``, ``grad_delta [r, G, g]``, ``grad_rate [G, n, g]``, ``grad_B [r, G, n]``,
    ``grad_C [r, G, n]``.
    """
    delta_u = (delta * u)[:, :, None, :]
    grad_C = torch.mul(states, grad_y[:, :, None, :], out=work).sum(-1)
    grad_B = torch.mul(grad_states, delta_u, out=work).sum(-1)
    # sum_n dh * B serves both du (times delta) and ddelta (times u)
    grad_drive = torch.matmul(B[:, :, None, :], grad_states).squeeze(2)
    grad_u = grad_drive * delta
    grad_delta = grad_drive.mul_(u)
    # d(delta_t A) = dh_t * exp(delta_t A) h_{t-1} = dh_t * (h_t - drive_t): no shifted copy of h
    # product, then difference (not one fused addcmul): h_t - drive_t is then exactly 0 where h_{t-1} = 0
    torch.mul(B[..., None], delta_u, out=work)
    torch.sub(states, work, out=work)
    work.mul_(grad_states)
    grad_delta += torch.mul(work, rate, out=grad_states).sum(2)
    grad_rate = work.mul_(delta[:, :, None, :]).sum(0)
    return grad_u, grad_delta, grad_rate, grad_B, grad_C


def _chunk_major(piece: torch.Tensor, chunk: int, chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """A time slice ``[b, c, steps]`` -> contiguous chunk-major ``[chunk, chunks, b, c]`` in ``dtype``.

    Time ``i * chunk + p`` of the slice lands at ``[p, i]``; steps past its end are zeros.
    """
    if piece.shape[2] < chunk * chunks:
        piece = F.pad(piece, (0, chunk * chunks - piece.shape[2]))
    # a compact copy first: gathering straight from the full-length tensor touches a page per element
    piece = piece.to(dtype=dtype, memory_format=torch.contiguous_format)
    batch, channels = piece.shape[:2]
    out = torch.empty((chunk, chunks, batch, channels), dtype=dtype, device=piece.device)
    return out.copy_(piece.view(batch, channels, chunks, chunk).permute(3, 2, 0, 1))


def _store_time_major_(target: torch.Tensor, block: torch.Tensor, start: int) -> None:
    """Write chunk-major ``block [chunk, chunks, b, c]`` into ``target [b, c, L]`` from time ``start`` on."""
    chunk, chunks, batch, channels = block.shape
    steps = min(chunk * chunks, target.shape[2] - start)
    # transposed within the block first, then written in runs of consecutive time steps (see _chunk_major)
    time_major = block.permute(2, 3, 1, 0).reshape(batch, channels, chunk * chunks)
    target[:, :, start : start + steps].copy_(time_major[:, :, :steps])


class _Block:
    """One block of ``chunks`` chunks of the scan: its inputs chunk-major, in the compute dtype.

    ``delta [chunk, chunks, b, d]`` is the effective step (bias and softplus applied, 0 past the end of
    the sequence, which makes those steps pass the state through); ``softplus_slope`` is d softplus /
    d input there (None without softplus or grad_y); ``u`` and ``grad_y`` (when given)
    ``[chunk, chunks, b, d]``, ``B`` and ``C`` ``[chunk, chunks, b, G * n]``.
    """

    def __init__(
        self, first, chunks, chunk, u, delta, B, C, delta_bias, delta_softplus, compute, grad_y=None
    ):
        length = u.shape[2]
        self.start = first * chunk
        stop = min(self.start + chunks * chunk, length)

        def piece(tensor):
            return _chunk_major(tensor[..., self.start : stop], chunk, chunks, compute)

        pre = delta[:, :, self.start : stop].to(compute)
        if delta_bias is not None:
            pre = pre + delta_bias.to(compute)[:, None]
        self.softplus_slope = None
        if delta_softplus:
            pre = F.softplus(pre)
        self.delta = _chunk_major(pre, chunk, chunks, compute)
        if delta_softplus and grad_y is not None:
            # sigmoid(x) = 1 - exp(-softplus(x)): from the converted steps, not another conversion
            self.softplus_slope = torch.neg(self.delta).expm1_().neg_()
        self.u, self.B, self.C = piece(u), piece(B), piece(C)
        self.grad_y = None if grad_y is None else piece(grad_y)


def _decays_and_drives(block: _Block, rate2: torch.Tensor, decay: torch.Tensor, drive: torch.Tensor) -> None:
    """Fill ``decay = exp(delta * A) = 2 ** (delta * rate2)`` and ``drive = delta * u * B``,
    ``[chunk, chunks, b, G, n, g]``; ``rate2 = A * log2(e)`` in the state's layout (``_rates``)."""
    groups, dstate, per_group = rate2.shape
    chunk, chunks, batch = block.delta.shape[:3]
    per_channel = (chunk, chunks, batch, groups, 1, per_group)
    torch.mul(block.delta.view(per_channel), rate2, out=decay).exp2_()
    delta_u = (block.delta * block.u).view(per_channel)
    torch.mul(delta_u, block.B.view(chunk, chunks, batch, groups, dstate, 1), out=drive)


def _chunk_decays(block: _Block, rate2: torch.Tensor) -> torch.Tensor:
    """``[chunks, b, G, n, g]``: the product of each chunk's decays, 2 to a sum of ``delta * rate2 <= 0``."""
    groups, _, per_group = rate2.shape
    chunks, batch = block.delta.shape[1:3]
    return torch.mul(block.delta.sum(0).view(chunks, batch, groups, 1, per_group), rate2).exp2_()


def _rates(A: torch.Tensor, groups: int, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [d, n]`` -> ``(A, A * log2(e))``, each ``[G, n, d / G]`` (the layout of the state) in the compute
    dtype. Decays are taken as powers of 2: ``exp2`` costs half of ``exp`` on the CPU."""
    dim, dstate = A.shape
    rate = A.to(compute).view(groups, dim // groups, dstate).transpose(1, 2).contiguous()
    return rate, rate * math.log2(math.e)


def _buffers(count: int, shape: tuple[int, ...], like: torch.Tensor) -> list[torch.Tensor]:
    """``count`` work buffers of ``shape``, reused by every block: fresh pages cost more than arithmetic."""
    return [like.new_empty(shape) for _ in range(count)]


def _leading(buffer: torch.Tensor, chunks: int) -> torch.Tensor:
    """The first ``chunks`` chunks of a ``[chunk, max_chunks, ...]`` buffer, contiguous (the last block
    may be shorter)."""
    chunk, _, *rest = buffer.shape
    return buffer.view(-1)[: chunk * chunks * math.prod(rest)].view(chunk, chunks, *rest)


class _SelectiveScanChunked(torch.autograd.Function):
    """Chunked selective scan that keeps the states at chunk boundaries; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk):
        ctx.set_materialize_grads(False)
        compute = _compute_dtype(u)
        batch, dim, length = u.shape
        groups = B.shape[1] if B.dim() == 4 else 1
        dstate = A.shape[1]
        B_flat, C_flat = B.reshape(batch, -1, length), C.reshape(batch, -1, length)
        rate, rate2 = _rates(A, groups, compute)
        state_shape = (batch, groups, dstate, dim // groups)
        n_chunks = math.ceil(length / chunk)
        per_block = _chunks_per_block(chunk, batch * dim * dstate, n_chunks, u.device)
        work = u.new_empty(0, dtype=compute)
        decay_buffer, state_buffer = _buffers(2, (chunk, per_block, *state_shape), work)
        keep = any(ctx.needs_input_grad[:8])
        # the state entering every chunk: all the backward needs to recompute the rest, chunk by chunk
        boundaries = work.new_empty((n_chunks if keep else per_block, *state_shape))
        y = work.new_empty((batch, dim, length))
        carry = work.new_zeros(state_shape)
        for first in range(0, n_chunks, per_block):
            chunks = min(per_block, n_chunks - first)
            block = _Block(
                first, chunks, chunk, u, delta, B_flat, C_flat, delta_bias, delta_softplus, compute
            )
            decay, states = _leading(decay_buffer, chunks), _leading(state_buffer, chunks)
            _decays_and_drives(block, rate2, decay, states)
            entering = boundaries[first : first + chunks] if keep else boundaries[:chunks]
            carry = _chunked_linear_scan_(decay, _chunk_decays(block, rate2), states, carry, entering, False)
            rows = chunk * chunks * batch * groups
            y_block = torch.bmm(block.C.view(rows, 1, dstate), states.view(rows, dstate, -1))
            _store_time_major_(y, y_block.view(chunk, chunks, batch, dim), block.start)
        if D is not None:
            y = y.addcmul_(u.to(compute), D.to(compute)[:, None])
        out = y if z is None else y * F.silu(z.to(compute))
        last_state = None
        if return_last_state:
            # steps past L have delta = 0 and pass the state through: the carry is h_{L-1}
            last_state = carry.transpose(2, 3).reshape(batch, dim, dstate)
        if keep:
            ctx.save_for_backward(
                u, delta, A, B, C, D, z, delta_bias, boundaries, y if z is not None else None
            )
        ctx.delta_softplus, ctx.chunk, ctx.per_block = delta_softplus, chunk, per_block
        out = out.to(u.dtype)
        return (out, last_state) if return_last_state else out

    @staticmethod
    def backward(ctx, grad_out, grad_last_state=None):
        u, delta, A, B, C, D, z, delta_bias, boundaries, pre_gate = ctx.saved_tensors
        compute = _compute_dtype(u)
        batch, dim, length = u.shape
        groups = B.shape[1] if B.dim() == 4 else 1
        dstate, per_group = A.shape[1], dim // groups
        chunk, per_block = ctx.chunk, ctx.per_block
        n_chunks = boundaries.shape[0]
        B_flat, C_flat = B.reshape(batch, -1, length), C.reshape(batch, -1, length)
        rate, rate2 = _rates(A, groups, compute)
        state_shape = (batch, groups, dstate, per_group)
        u_c = u.to(compute)
        grad_y = torch.zeros_like(u_c) if grad_out is None else grad_out.to(compute)
        grad_z = grad_D = None
        if z is not None:
            z_c = z.to(compute)
            gate = torch.sigmoid(z_c)
            # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
            grad_z = (grad_y * pre_gate * gate * (1 + z_c * (1 - gate))).to(z.dtype)
            grad_y = grad_y * (z_c * gate)
        if D is not None:
            grad_D = (grad_y * u_c).sum((0, 2)).to(D.dtype)

        grad_u, grad_delta = torch.empty_like(u_c), torch.empty_like(u_c)
        grad_B, grad_C = (
            B_flat.new_empty(B_flat.shape, dtype=compute),
            C_flat.new_empty(C_flat.shape, dtype=compute),
        )
        grad_rate = torch.zeros_like(rate)
        decay_buffer, state_buffer, grad_state_buffer = _buffers(3, (chunk, per_block, *state_shape), u_c)
        entering = u_c.new_empty((per_block, *state_shape))
        carry = u_c.new_zeros(state_shape)
        last_block = (n_chunks - 1) // per_block * per_block
        for first in range(last_block, -1, -per_block):
            chunks = min(per_block, n_chunks - first)
            block = _Block(
                first,
                chunks,
                chunk,
                u,
                delta,
                B_flat,
                C_flat,
                delta_bias,
                ctx.delta_softplus,
                compute,
                grad_y,
            )
            decay, states = _leading(decay_buffer, chunks), _leading(state_buffer, chunks)
            grad_states = _leading(grad_state_buffer, chunks)
            _decays_and_drives(block, rate2, decay, states)
            # recompute the states from the one kept at each chunk's start: one op per position
            states[0].addcmul_(decay[0], boundaries[first : first + chunks])
            for p in range(1, chunk):
                torch.addcmul(states[p], decay[p], states[p - 1], out=states[p])
            # dh_t = C_t * dy_t + exp(delta_{t+1} A) * dh_{t+1}: the adjoint of the forward recurrence
            grad_y_per_group = block.grad_y.view(chunk, chunks, batch, groups, 1, per_group)
            torch.mul(
                grad_y_per_group, block.C.view(chunk, chunks, batch, groups, dstate, 1), out=grad_states
            )
            if grad_last_state is not None and first == last_block:
                last = (length - 1) - block.start
                grad_last = grad_last_state.to(compute).view(batch, groups, per_group, dstate).transpose(2, 3)
                grad_states[last % chunk, last // chunk] += grad_last
            carry = _chunked_linear_scan_(
                decay, _chunk_decays(block, rate2), grad_states, carry, entering[:chunks], True
            )
            rows = chunk * chunks * batch
            grads = _input_gradients(
                states.view(rows, groups, dstate, per_group),
                grad_states.view(rows, groups, dstate, per_group),
                block.delta.view(rows, groups, per_group),
                block.u.view(rows, groups, per_group),
                block.B.view(rows, groups, dstate),
                block.grad_y.view(rows, groups, per_group),
                rate,
                decay.view(rows, groups, dstate, per_group),  # the decays are spent: scratch
            )
            block_grad_u, block_grad_delta, block_grad_rate, block_grad_B, block_grad_C = grads
            grad_rate += block_grad_rate
            if block.softplus_slope is not None:
                block_grad_delta.mul_(block.softplus_slope.view(rows, groups, per_group))
            chunk_major = (chunk, chunks, batch, -1)
            _store_time_major_(grad_u, block_grad_u.view(chunk_major), block.start)
            _store_time_major_(grad_delta, block_grad_delta.view(chunk_major), block.start)
            _store_time_major_(grad_B, block_grad_B.view(chunk_major), block.start)
            _store_time_major_(grad_C, block_grad_C.view(chunk_major), block.start)
        grad_bias = None if delta_bias is None else grad_delta.sum((0, 2)).to(delta_bias.dtype)
        if D is not None:
            grad_u.addcmul_(grad_y, D.to(compute)[:, None])
        return (
            grad_u.to(u.dtype),
            grad_delta.to(delta.dtype),
            grad_rate.transpose(1, 2).reshape(dim, dstate).to(A.dtype),
            grad_B.view(B.shape).to(B.dtype),
            grad_C.view(C.shape).to(C.dtype),
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

    Arguments, shapes, result and dtypes as ``selective_scan_ref`` (which see), grouped B and C included;
    ``chunk_size`` (>= 1) defaults to ``default_chunk_size(L)`` and changes only speed and memory, not the
    result beyond rounding.

    Promises: equal to ``selective_scan_ref`` forward and backward within rounding of the compute dtype
    (fp32, or fp64 for fp64 inputs); no inf/NaN for any ``A <= 0`` and ``delta >= 0`` however large,
    at any chunk size (only decays ``<= 1`` are multiplied, never divided by). Memory: kept for the
    backward, the inputs and the states entering each chunk (``b * d * n * L / chunk_size`` elements in
    the compute dtype, plus the pre-gate output ``[b, d, L]`` when z is given); while running, two (forward)
    or three (backward) work buffers of at most 2**20 elements on the CPU, 2**26 on other devices (or one
    chunk, if larger), and the ``[b, d, L]`` output and gradients.
    The backward recomputes the states chunk by chunk from the kept ones. Python-level work is
    ``O(L / chunks_per_block + L / chunk_size)`` tensor operations per scan, each vectorised over the
    chunks of a block; never one per time step.

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


BACKENDS = ("auto", "mamba", "triton", "chunked")
# looked up, not imported: importing Triton costs a second and the CPU default never needs it
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def choose_backend(requested: str, on_cuda: bool, mamba_available: bool) -> str:
    """The scan path ``selective_scan`` runs: ``requested`` itself unless it is ``"auto"``.

    ``"auto"`` is mamba-ssm's kernel for CUDA tensors when it is installed, else ``"chunked"``; never
    ``"triton"``: the Triton kernels run only when asked for (``model.generator.scan_backend: triton``),
    until ``bench/gpu.py`` has shown them equal to the reference on that GPU (docs/performance.md).
    Raises ValueError in one line naming ``requested`` when it is not one of ``BACKENDS``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {requested!r}")
    if requested != "auto":
        return requested
    return "mamba" if on_cuda and mamba_available else "chunked"


def selective_scan(
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
    backend: str = "auto",
):
    """The selective scan: the fastest path available for the tensors' device.

    Arguments, shapes, result and dtypes as ``selective_scan_ref`` (which see), grouped B and C included.
    ``backend="auto"`` runs, for ``u`` on a CUDA device, mamba-ssm's kernel when ``mamba_ssm`` is
    importable; everywhere else ``selective_scan_chunked`` with its default chunk size (``choose_backend``).
    It never picks the Triton kernels (``medgan.models.ssm_triton``): they run only when forced. A missing
    extension is not an error and is not logged. ``"mamba"``, ``"triton"`` or ``"chunked"`` forces that
    path (tests use ``"triton"`` on the CPU under ``TRITON_INTERPRET=1``); a forced path that is not
    installed raises one line saying what to install.
    """
    backend = choose_backend(backend, u.is_cuda, _mamba_selective_scan_fn is not None)
    if backend == "mamba":
        if _mamba_selective_scan_fn is None:
            raise RuntimeError("backend='mamba' needs mamba-ssm's CUDA kernel: pip install mamba-ssm")
        return _mamba_selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    if backend == "triton":
        from medgan.models.ssm_triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
