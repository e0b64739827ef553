"""The selective scan as Triton kernels: forward and backward, grouped B/C, states in registers.

``selective_scan_triton`` has ``selective_scan_ref``'s signature and semantics (``medgan.models.ssm``). One
program holds the states ``[BLOCK_D, n]`` of a block of channels of one group of one batch element in
registers and walks the sequence in chunks of ``CHUNK`` steps: per chunk it loads ``[BLOCK_D, CHUNK]``
slabs of u, delta (and z), ``[n, CHUNK]`` of B and C, solves the chunk with ``tl.associative_scan`` over
``(decay, drive)`` pairs from the state carried in, and keeps the state entering every chunk for the
backward. The backward walks the chunks from the last, recomputes each chunk's states from the kept one,
solves the adjoint with a forward ``tl.associative_scan`` over the chunk loaded in reversed time order
(a reverse ``associative_scan`` with a non-commutative combine is reported to compile to wrong results,
triton-lang/triton#4362) and forms every input's gradient, stored back with the same reversed offsets.

Memory: besides inputs and outputs, the chunk-boundary states ``[b, d, L / CHUNK, n]`` (fp32); the
backward adds partial sums of the B and C gradients, one per block of channels of a group
(``b * d * n * L / BLOCK_D`` elements, ``<= b * d * L`` since ``BLOCK_D >= n`` whenever ``d / G >= n``),
and ``[b, d, n]`` / ``[b, d]`` partials of the A, D and bias gradients. All reductions over the batch,
the blocks and the sequence are sums in a fixed order (in registers, then ``torch.sum`` of the partials):
no atomics, so the gradients are bitwise deterministic run to run for a given config. ``num_warps``
changes the order of the sums inside a tile, so processes that autotune to different configs may differ
in the last bits.

Triton is optional: this module imports without it, and calling the scan without it raises one line
saying ``pip install triton``. On the CPU the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), which is how the tests run them.
"""

# no `from __future__ import annotations`: Triton 3.0's interpreter needs tl.constexpr annotations as objects
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the pure-PyTorch path is the fallback everywhere
    triton = tl = None

__all__ = ["selective_scan_triton", "triton_available", "interpreting", "block_sizes"]

# the chunk length: 16 keeps ``[b, d, n, L / 16]`` boundary states (``b * d * L`` for n = 16), as the
# pure-PyTorch path does, and a [BLOCK_D, n, 16] tile per live tensor in registers
CHUNK = 16
# elements of one [BLOCK_D, n, CHUNK] tile: a handful of them are live at once in the backward
_TILE_ELEMENTS = 4096


def triton_available() -> bool:
    """Whether Triton could be imported."""
    return triton is not None


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (on CPU tensors): Triton decides when a kernel is
    defined, i.e. by ``TRITON_INTERPRET`` when this module was first imported."""
    return triton is not None and type(_forward_kernel.fn).__name__ == "InterpretedFunction"


_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_triton(u: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the Triton selective scan needs Triton: pip install triton")
    if not u.is_cuda and not interpreting():
        raise RuntimeError(
            f"the Triton selective scan runs {u.device.type} tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing medgan.models.ssm_triton, or pass CUDA tensors"
        )


def block_sizes(dim: int, dstate: int, groups: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_N)``: channels per program (a power of 2, at most the group's width rounded up)
    and the state padded to a power of 2; a ``[BLOCK_D, BLOCK_N, CHUNK]`` tile is at most 4096 elements."""
    block_n = max(2, triton.next_power_of_2(dstate)) if triton else max(2, 1 << (dstate - 1).bit_length())
    per_group = dim // groups
    block_d = max(1, min(1 << max(0, per_group - 1).bit_length(), _TILE_ELEMENTS // (block_n * CHUNK)))
    return block_d, block_n


if triton is not None:

    def _configs():
        """The configs to try; the interpreter gets one (the autotuner then runs nothing extra).

        Compiled for sm_90 (``bench/gpu.py --triton-compile 90``, Triton 3.9): 2 warps spill (232 / 1160
        stack bytes, forward / backward, at n = 16), 4 and 8 do not; each config costs 2-8 s to compile
        on the CPU, and the autotuner compiles all of them on the first call of a shape family.
        """
        if _INTERPRET_AT_IMPORT:
            return [triton.Config({}, num_warps=4)]
        return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (8, 1), (8, 2))]

    @triton.jit
    def _combine(decay_left, value_left, decay_right, value_right):
        # composing h -> a1 h + b1 then h -> a2 h + b2: the recurrence's step, associatively
        return decay_left * decay_right, decay_right * value_left + value_right

    @triton.jit
    def _reverse_steps(x, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        """``x`` [BLOCK_D, BLOCK_N, CHUNK] with its last axis reversed (CHUNK a power of two): each round
        moves the highest bit of the step index to the lowest and swaps its two halves, so after log2(CHUNK)
        rounds every bit is flipped, s -> CHUNK - 1 - s. tl.flip does the same with one xor reduction per
        bit, which Triton's interpreter runs element by element (700x slower on a [16, 16, 64] tile)."""
        rows: tl.constexpr = BLOCK_D * BLOCK_N
        y = tl.reshape(x, [rows, CHUNK])
        for _ in tl.static_range(CHUNK.bit_length() - 1):
            low, high = tl.split(tl.permute(tl.reshape(y, [rows, 2, CHUNK // 2]), (0, 2, 1)))
            y = tl.reshape(tl.join(high, low), [rows, CHUNK])
        return tl.reshape(y, [BLOCK_D, BLOCK_N, CHUNK])

    @triton.jit
    def _softplus(x):
        # max(x, 0) + log(1 + exp(-|x|)): no overflow for large x
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _store_rounded(pointers, value, mask):
        """Store fp32 ``value`` in the pointers' dtype. bf16 is rounded to nearest even by hand: a GPU's
        conversion does that already, Triton's interpreter truncates (errors of a whole bf16 step)."""
        if pointers.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            # NaNs stay NaN: the bias would carry a GPU's NaN (0x7FFFFFFF) into the sign bit, -0.0
            value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
        tl.store(pointers, value.to(pointers.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_steps(delta_ptr, offsets, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """(pre-softplus input, effective step) of a [BLOCK_D, CHUNK] slab; the step is 0 where masked."""
        raw = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw = raw + bias[:, None]
        step = raw
        if SOFTPLUS:
            step = _softplus(raw)
        return raw, tl.where(mask, step, 0.0)

    @triton.autotune(configs=_configs(), key=["dim", "dstate", "groups"])
    @triton.jit(do_not_specialize=["length"])
    def _forward_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        out_ptr, boundary_ptr, last_ptr,
        length, dim, dstate, groups,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        KEEP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        batch_group, block = tl.program_id(0), tl.program_id(1)
        batch, group = batch_group // groups, batch_group % groups
        per_group = dim // groups
        local = block * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = local < per_group
        channel = group * per_group + local
        rows = batch.to(tl.int64) * dim + channel
        state = tl.arange(0, BLOCK_N)
        mask_n = state < dstate
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + channel[:, None] * dstate + state[None, :], mask=mask_dn, other=0.0)
        D = tl.load(D_ptr + channel, mask=mask_d, other=0.0) if HAS_D else None
        bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0) if HAS_BIAS else None
        projection_rows = (batch_group.to(tl.int64) * dstate + state) * length
        steps = tl.arange(0, CHUNK)
        n_chunks = tl.cdiv(length, CHUNK)
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        for c in range(0, n_chunks):
            t = c * CHUNK + steps
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            offsets = rows[:, None] * length + t[None, :]
            u = tl.load(u_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
            _, delta = _load_steps(delta_ptr, offsets, mask_dt, bias, HAS_BIAS, SOFTPLUS)
            mask_nt = mask_n[:, None] & mask_t[None, :]
            projection = projection_rows[:, None] + t[None, :]
            B = tl.load(B_ptr + projection, mask=mask_nt, other=0.0).to(tl.float32)
            C = tl.load(C_ptr + projection, mask=mask_nt, other=0.0).to(tl.float32)
            if KEEP:
                boundary = (rows[:, None] * n_chunks + c) * dstate + state[None, :]
                tl.store(boundary_ptr + boundary, h, mask=mask_dn)
            decay = tl.exp(delta[:, None, :] * A[:, :, None])
            drive = (delta * u)[:, None, :] * B[None, :, :]
            drive += tl.where(steps[None, None, :] == 0, decay * h[:, :, None], 0.0)
            _, states = tl.associative_scan((decay, drive), 2, _combine)
            y = tl.sum(states * C[None, :, :], axis=1)
            if HAS_D:
                y += D[:, None] * u
            if HAS_Z:
                z = tl.load(z_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
                y = y * z * _sigmoid(z)
            _store_rounded(out_ptr + offsets, y, mask_dt)
            # steps past the end have delta = 0 and pass the state through: the last one is h_{L-1}
            h = tl.sum(tl.where(steps[None, None, :] == CHUNK - 1, states, 0.0), axis=2)
        tl.store(last_ptr + rows[:, None] * dstate + state[None, :], h, mask=mask_dn)

    @triton.autotune(configs=_configs(), key=["dim", "dstate", "groups"])
    @triton.jit(do_not_specialize=["length"])
    def _backward_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        grad_out_ptr, grad_last_ptr, boundary_ptr,
        grad_u_ptr, grad_delta_ptr, grad_z_ptr, grad_B_ptr, grad_C_ptr, grad_A_ptr, grad_D_ptr, grad_bias_ptr,
        length, dim, dstate, groups,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_GRAD_LAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        batch_group, block = tl.program_id(0), tl.program_id(1)
        batch, group = batch_group // groups, batch_group % groups
        per_group = dim // groups
        local = block * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = local < per_group
        channel = group * per_group + local
        rows = batch.to(tl.int64) * dim + channel
        state = tl.arange(0, BLOCK_N)
        mask_n = state < dstate
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + channel[:, None] * dstate + state[None, :], mask=mask_dn, other=0.0)
        D = tl.load(D_ptr + channel, mask=mask_d, other=0.0) if HAS_D else None
        bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0) if HAS_BIAS else None
        state_offsets = rows[:, None] * dstate + state[None, :]
        grad_last = tl.load(grad_last_ptr + state_offsets, mask=mask_dn, other=0.0) if HAS_GRAD_LAST else None
        projection_rows = (batch_group.to(tl.int64) * dstate + state) * length
        # the partial B and C gradients of this block of channels: [blocks, b * G, n, L]
        partial_rows = ((block * tl.num_programs(0) + batch_group).to(tl.int64) * dstate + state) * length
        steps = tl.arange(0, CHUNK)
        # the chunk is held in reversed time order: position s is its step CHUNK - 1 - s, so the adjoint,
        # which runs from the last step back, is a forward scan (triton-lang/triton#4362)
        backwards = CHUNK - 1 - steps
        at_last_step = steps[None, None, :] == 0
        at_first_step = steps[None, None, :] == CHUNK - 1
        n_chunks = tl.cdiv(length, CHUNK)
        grad_next = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # dh at the first step of the next chunk
        grad_A = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        grad_D = tl.zeros([BLOCK_D], dtype=tl.float32)
        grad_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            # the chunk's states, recomputed in time order from the one kept at its start
            t = c * CHUNK + steps
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            offsets = rows[:, None] * length + t[None, :]
            u = tl.load(u_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
            _, delta = _load_steps(delta_ptr, offsets, mask_dt, bias, HAS_BIAS, SOFTPLUS)
            mask_nt = mask_n[:, None] & mask_t[None, :]
            B = tl.load(B_ptr + projection_rows[:, None] + t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
            boundary = (rows[:, None] * n_chunks + c) * dstate + state[None, :]
            h0 = tl.load(boundary_ptr + boundary, mask=mask_dn, other=0.0)
            decay = tl.exp(delta[:, None, :] * A[:, :, None])
            drive = (delta * u)[:, None, :] * B[None, :, :]
            _, states = tl.associative_scan(
                (decay, drive + tl.where(steps[None, None, :] == 0, decay * h0[:, :, None], 0.0)), 2, _combine
            )
            # into reversed order; everything below is loaded and stored with reversed offsets
            states = _reverse_steps(states, BLOCK_D, BLOCK_N, CHUNK)
            t = c * CHUNK + backwards
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            offsets = rows[:, None] * length + t[None, :]
            u = tl.load(u_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
            raw, delta = _load_steps(delta_ptr, offsets, mask_dt, bias, HAS_BIAS, SOFTPLUS)
            # the step after each one: its decay carries dh back
            mask_next = mask_d[:, None] & (t[None, :] + 1 < length)
            _, delta_next = _load_steps(delta_ptr, offsets + 1, mask_next, bias, HAS_BIAS, SOFTPLUS)
            mask_nt = mask_n[:, None] & mask_t[None, :]
            projection = projection_rows[:, None] + t[None, :]
            B = tl.load(B_ptr + projection, mask=mask_nt, other=0.0).to(tl.float32)
            C = tl.load(C_ptr + projection, mask=mask_nt, other=0.0).to(tl.float32)
            delta_u = delta * u
            drive = delta_u[:, None, :] * B[None, :, :]
            grad_y = tl.load(grad_out_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
            if HAS_Z:
                y = tl.sum(states * C[None, :, :], axis=1)
                if HAS_D:
                    y += D[:, None] * u
                z = tl.load(z_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
                gate = _sigmoid(z)
                # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
                grad_z = grad_y * y * gate * (1.0 + z * (1.0 - gate))
                _store_rounded(grad_z_ptr + offsets, grad_z, mask_dt)
                grad_y = grad_y * z * gate
            if HAS_D:
                grad_D += tl.sum(grad_y * u, axis=1)
            # dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}: in reversed order, the forward recurrence
            source = C[None, :, :] * grad_y[:, None, :]
            if HAS_GRAD_LAST:
                source += tl.where(t[None, None, :] == length - 1, grad_last[:, :, None], 0.0)
            decay_next = tl.exp(delta_next[:, None, :] * A[:, :, None])
            source += tl.where(at_last_step, decay_next * grad_next[:, :, None], 0.0)
            _, grad_states = tl.associative_scan((decay_next, source), 2, _combine)
            grad_next = tl.sum(tl.where(at_first_step, grad_states, 0.0), axis=2)
            # exp(delta_t A) h_{t-1} = h_t - drive_t: no shifted copy of the states
            grad_decayed = grad_states * (states - drive)
            grad_drive = tl.sum(grad_states * B[None, :, :], axis=1)
            grad_u = grad_drive * delta
            if HAS_D:
                grad_u += D[:, None] * grad_y
            _store_rounded(grad_u_ptr + offsets, grad_u, mask_dt)
            grad_delta = grad_drive * u + tl.sum(grad_decayed * A[:, :, None], axis=1)
            grad_A += tl.sum(grad_decayed * delta[:, None, :], axis=2)
            if SOFTPLUS:
                grad_delta = grad_delta * _sigmoid(raw)
            grad_delta = tl.where(mask_dt, grad_delta, 0.0)
            if HAS_BIAS:
                grad_bias += tl.sum(grad_delta, axis=1)
            _store_rounded(grad_delta_ptr + offsets, grad_delta, mask_dt)
            partial = partial_rows[:, None] + t[None, :]
            tl.store(grad_B_ptr + partial, tl.sum(grad_states * delta_u[:, None, :], axis=0), mask=mask_nt)
            tl.store(grad_C_ptr + partial, tl.sum(states * grad_y[:, None, :], axis=0), mask=mask_nt)
        tl.store(grad_A_ptr + state_offsets, grad_A, mask=mask_dn)
        if HAS_D:
            tl.store(grad_D_ptr + rows, grad_D, mask=mask_d)
        if HAS_BIAS:
            tl.store(grad_bias_ptr + rows, grad_bias, mask=mask_d)


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


class _SelectiveScanTriton(torch.autograd.Function):
    """Forward keeps only the state entering each chunk; the backward kernel recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, block_d):
        ctx.set_materialize_grads(False)
        batch, dim, length = u.shape
        groups = B.shape[1] if B.dim() == 4 else 1
        dstate = A.shape[1]
        auto_block_d, block_n = block_sizes(dim, dstate, groups)
        block_d = block_d or auto_block_d
        u, delta, B, C, z = (_contiguous(t) for t in (u, delta, B, C, z))
        A32 = A.float().contiguous()
        D32 = None if D is None else D.float().contiguous()
        bias32 = None if delta_bias is None else delta_bias.float().contiguous()
        keep = any(ctx.needs_input_grad[:8])
        n_chunks = triton.cdiv(length, CHUNK)
        out = torch.empty_like(u)
        boundaries = u.new_empty((batch, dim, n_chunks if keep else 0, dstate), dtype=torch.float32)
        last_state = u.new_empty((batch, dim, dstate), dtype=torch.float32)
        # b * G on the first axis: the only one allowed more than 65535 programs
        grid = (batch * groups, triton.cdiv(dim // groups, block_d))
        _forward_kernel[grid](
            u, delta, A32, B, C, D32, z, bias32,
            out, boundaries, last_state,
            length, dim, dstate, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), KEEP=keep, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=CHUNK,
        )  # fmt: skip
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, boundaries)
        ctx.delta_softplus, ctx.block_d = bool(delta_softplus), block_d
        return (out, last_state) if return_last_state else out

    @staticmethod
    def backward(ctx, grad_out, grad_last_state=None):
        u, delta, A, B, C, D, z, delta_bias, boundaries = ctx.saved_tensors
        batch, dim, length = u.shape
        groups = B.shape[1] if B.dim() == 4 else 1
        dstate = A.shape[1]
        block_d, (_, block_n) = ctx.block_d, block_sizes(dim, dstate, groups)
        blocks = triton.cdiv(dim // groups, block_d)
        grad_out = torch.zeros_like(u) if grad_out is None else grad_out.contiguous()
        A32 = A.float().contiguous()
        D32 = None if D is None else D.float().contiguous()
        bias32 = None if delta_bias is None else delta_bias.float().contiguous()
        grad_last = None if grad_last_state is None else grad_last_state.float().contiguous()
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_z = None if z is None else torch.empty_like(z)
        fp32 = {"dtype": torch.float32}
        grad_B_partial = u.new_empty((blocks, batch * groups, dstate, length), **fp32)
        grad_C_partial = u.new_empty((blocks, batch * groups, dstate, length), **fp32)
        grad_A_partial = u.new_empty((batch, dim, dstate), **fp32)
        grad_D_partial = None if D is None else u.new_empty((batch, dim), **fp32)
        grad_bias_partial = None if delta_bias is None else u.new_empty((batch, dim), **fp32)
        _backward_kernel[(batch * groups, blocks)](
            u, delta, A32, B, C, D32, z, bias32,
            grad_out, grad_last, boundaries,
            grad_u, grad_delta, grad_z, grad_B_partial, grad_C_partial,
            grad_A_partial, grad_D_partial, grad_bias_partial,
            length, dim, dstate, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, HAS_GRAD_LAST=grad_last is not None,
            BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=CHUNK,
        )  # fmt: skip
        # sums in a fixed order: deterministic, unlike atomics
        grad_B = grad_B_partial.sum(0).view(B.shape).to(B.dtype)
        grad_C = grad_C_partial.sum(0).view(C.shape).to(C.dtype)
        grad_A = grad_A_partial.sum(0).to(A.dtype)
        grad_D = None if D is None else grad_D_partial.sum(0).to(D.dtype)
        grad_bias = None if delta_bias is None else grad_bias_partial.sum(0).to(delta_bias.dtype)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, None, None, None


def selective_scan_triton(
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
    block_d: int | None = None,
):
    """The selective scan as Triton kernels, forward and backward; CUDA tensors (CPU ones in the interpreter).

    Arguments, shapes and result as ``selective_scan_ref`` (``medgan.models.ssm``), grouped B and C included.
    Dtypes: u, delta, B, C and z may be fp32, fp16 or bf16 (each its own), A, D and delta_bias any float
    (DeepSpeed's bf16 mode passes them fp32); everything is computed in fp32, ``out`` is returned in u's
    dtype, the last state ``[b, d, n]`` in fp32, and each gradient in its input's dtype. fp64 inputs run
    the pure-PyTorch ``selective_scan_chunked`` (Triton's fp64 is slow on most GPUs and fp64 is for tests).
    ``block_d``: channels per program, a power of 2 (default ``block_sizes``); changes only speed.

    Promises: equal to ``selective_scan_ref`` within fp32 rounding; gradients deterministic for a given
    autotuned config (no atomics);
    kept for the backward, the inputs and ``b * d * n * ceil(L / 16)`` fp32 boundary states.
    Raises RuntimeError in one line when Triton is missing or the tensors are on the CPU outside the
    interpreter.
    """
    from medgan.models.ssm import _check_shapes, selective_scan_chunked

    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if u.dtype == torch.float64:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    _require_triton(u)
    if block_d is not None and (block_d < 1 or block_d & (block_d - 1)):
        raise ValueError(f"block_d must be a power of 2, got {block_d}")
    return _SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state), block_d
    )
