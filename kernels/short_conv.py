"""LFM2's gated short convolution: y = C * causal_conv1d(B * x), depthwise over the sequence.

The op reads the in_proj output as it is, (batch, seq, 3 * hidden) with channel blocks [B | C | x] (the order
in which transformers' `BCx.chunk(3, dim=-2)` splits it), and writes y as (batch, seq, hidden), the layout
out_proj takes. transformers transposes to (batch, channels, seq) for F.conv1d and back; reading channels
along the contiguous dimension avoids both copies and keeps loads coalesced.

With kernel size L, conv[t] = bias + sum_k w[k] * (B * x)[t + k - (L - 1)], rows before 0 reading as zero.
Packed rows (several documents one after another, as padding-free training feeds them) restart the convolution
at every document: given `doc_offsets[b, t]`, the distance of token t from its document's first token, tap k
reads only rows that distance allows (L - 1 - k <= doc_offsets[t]), so no document sees another's tokens.
Without offsets, every row is one document (doc_offsets[t] = t).
Forward computes B * x on the fly for each of the L taps (the neighbouring rows are cache hits) and saves only
the in_proj output. Backward recomputes conv, writes dB, dC, dx into one (batch, seq, 3 * hidden) gradient
(so autograd needs no concatenation for in_proj), and sums dweight/dbias per program into fp32 partial
buffers reduced afterwards, so no two programs write one address.

Decoding (``short_conv_decode``: one new token per row against a conv state, the last L values of B * x per
channel) is one launch: the state shifts by one and takes the new B * x, and y = C * (state . w + bias), where
PyTorch's path (transformers' causal_conv1d_update without its CUDA kernel) is a product, a concatenation, a copy, a
product, a sum, an add, a product and a transposing copy, eight launches of a few microseconds each per layer and
decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .custom_op import KernelOp, no_gradient
from .dispatch import use_triton
from .grid import cdiv, next_power_of_2


def reference_short_conv(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         doc_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """bcx (batch, seq, 3 * hidden), weight (hidden, 1, L) or (hidden, L), bias (hidden,) or None, doc_offsets
    (batch, seq) integers or None -> (batch, seq, hidden) in bcx's dtype. Without offsets, computed as
    transformers' torch path (`causal_conv1d_fn`) does; with them, tap by tap, each masked where it would reach
    into an earlier document."""
    hidden = bcx.shape[-1] // 3
    seq_len = bcx.shape[1]
    kernel_size = weight.shape[-1]
    b, c, x = bcx.transpose(-1, -2).chunk(3, dim=-2)
    bx = b * x
    if doc_offsets is None:
        conv = F.conv1d(bx.to(weight.dtype), weight.reshape(hidden, 1, kernel_size), bias,
                        padding=kernel_size - 1, groups=hidden)[:, :, :seq_len].to(bx.dtype)
        return (c * conv).transpose(-1, -2).contiguous()
    w = weight.reshape(hidden, kernel_size)
    bx = bx.to(w.dtype)
    conv = torch.zeros_like(bx) if bias is None else bias[None, :, None].expand_as(bx).clone()
    for k in range(kernel_size):
        back = kernel_size - 1 - k  # tap k reads `back` rows before t
        shifted = F.pad(bx, (back, 0))[:, :, :seq_len]
        allowed = (doc_offsets >= back).to(bx.dtype)[:, None, :]
        conv = conv + w[None, :, k, None] * shifted * allowed
    return (c * conv.to(c.dtype)).transpose(-1, -2).contiguous()


def document_offsets(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, seq) int32: each token's distance from the first token of its document, where a document starts
    wherever position_ids do not continue the previous token's by one (transformers' packed-sequence rule). A row
    of consecutive positions is one document (offsets 0, 1, 2, ...). Computed on the device, no host sync."""
    positions = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    seq_len = positions.shape[1]
    index = torch.arange(seq_len, device=positions.device).expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    last_start = torch.cummax(torch.where(starts, index, 0), dim=1).values
    return (index - last_start).to(torch.int32).contiguous()


def _tile(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): 128 channels give 512-byte rows in fp32 (fully coalesced), 16 time steps
    keep the L shifted re-reads of each tile in L1."""
    block_d = min(128, next_power_of_2(hidden))
    block_t = 16
    num_warps = 4 if block_d * block_t >= 2048 else 2
    return block_t, block_d, num_warps


@triton.jit
def _short_conv_fwd_kernel(
    BCX, W, BIAS, OFFSETS, Y,
    stride_b, stride_s, stride_wd, stride_wk, stride_yb, stride_ys,
    S, D,
    L: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OFFSETS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    batch = tl.program_id(2).to(tl.int64)
    mask_d = d < D
    base = BCX + batch * stride_b
    # How far back each row may read: to its document's first token (to row 0 without offsets).
    reach = t
    if HAS_OFFSETS:
        reach = tl.load(OFFSETS + batch * S + t, mask=t < S, other=0)
    conv = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        conv += tl.load(BIAS + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(L):
        src = t + (k - (L - 1))
        mask = ((src >= 0) & (src < S) & (reach >= (L - 1 - k)))[:, None] & mask_d[None, :]
        ptr = base + src.to(tl.int64)[:, None] * stride_s + d[None, :]
        b = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(ptr + 2 * D, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + d * stride_wd + k * stride_wk, mask=mask_d, other=0.0).to(tl.float32)
        conv += w[None, :] * (b * x)
    mask = (t < S)[:, None] & mask_d[None, :]
    rows = t.to(tl.int64)[:, None]
    c = tl.load(base + rows * stride_s + D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + batch * stride_yb + rows * stride_ys + d[None, :], (c * conv).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _short_conv_bwd_kernel(
    BCX, W, BIAS, OFFSETS, DY, DBCX, DW_PARTIAL, DBIAS_PARTIAL,
    stride_b, stride_s, stride_wd, stride_wk, stride_dyb, stride_dys, stride_gb, stride_gs,
    S, D, chunks, chunk_len,
    L: tl.constexpr, BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid = tl.program_id(1)
    batch = (pid // chunks).to(tl.int64)
    first = (pid % chunks) * chunk_len
    mask_d = d < D
    taps = tl.arange(0, BLOCK_L)
    base = BCX + batch * stride_b
    dy_base = DY + batch * stride_dyb
    grad_base = DBCX + batch * stride_gb
    dw = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + d, mask=mask_d, other=0.0).to(tl.float32)
    for start in range(first, first + chunk_len, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        mask = (t < S)[:, None] & mask_d[None, :]
        rows = t.to(tl.int64)[:, None]
        ptr = base + rows * stride_s + d[None, :]
        b = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(ptr + D, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(ptr + 2 * D, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + rows * stride_dys + d[None, :], mask=mask, other=0.0).to(tl.float32)
        dconv = dy * c
        reach = t
        if HAS_OFFSETS:
            reach = tl.load(OFFSETS + batch * S + t, mask=t < S, other=0)
        conv = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32) + bias[None, :]
        dbx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(L):
            w = tl.load(W + d * stride_wd + k * stride_wk, mask=mask_d, other=0.0).to(tl.float32)
            # Tap k reads B * x from L - 1 - k rows back...
            src = t + (k - (L - 1))
            mask_src = ((src >= 0) & (src < S) & (reach >= (L - 1 - k)))[:, None] & mask_d[None, :]
            ptr_src = base + src.to(tl.int64)[:, None] * stride_s + d[None, :]
            bx = tl.load(ptr_src, mask=mask_src, other=0.0).to(tl.float32) * \
                tl.load(ptr_src + 2 * D, mask=mask_src, other=0.0).to(tl.float32)
            conv += w[None, :] * bx
            dw += tl.where(taps[:, None] == k, tl.sum(dconv * bx, axis=0)[None, :], 0.0)
            # ...so the gradient of B * x at t gathers dconv from L - 1 - k rows ahead.
            dst = t + ((L - 1) - k)
            in_doc = dst < S
            if HAS_OFFSETS:  # row dst reads t only if t lies in dst's document
                in_doc = in_doc & (tl.load(OFFSETS + batch * S + dst, mask=dst < S, other=0) >= (L - 1 - k))
            mask_dst = in_doc[:, None] & mask_d[None, :]
            dst_rows = dst.to(tl.int64)[:, None]
            dy_dst = tl.load(dy_base + dst_rows * stride_dys + d[None, :], mask=mask_dst, other=0.0).to(tl.float32)
            c_dst = tl.load(base + dst_rows * stride_s + D + d[None, :], mask=mask_dst, other=0.0).to(tl.float32)
            dbx += w[None, :] * (dy_dst * c_dst)
        dbias += tl.sum(dconv, axis=0)
        grad_ptr = grad_base + rows * stride_gs + d[None, :]
        tl.store(grad_ptr, (dbx * x).to(DBCX.dtype.element_ty), mask=mask)
        tl.store(grad_ptr + D, (dy * conv).to(DBCX.dtype.element_ty), mask=mask)
        tl.store(grad_ptr + 2 * D, (dbx * b).to(DBCX.dtype.element_ty), mask=mask)
    mask_w = (taps < L)[:, None] & mask_d[None, :]
    tl.store(DW_PARTIAL + pid * L * D + taps[:, None] * D + d[None, :], dw, mask=mask_w)
    if HAS_BIAS:
        tl.store(DBIAS_PARTIAL + pid * D + d, dbias, mask=mask_d)


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _time_chunks(device: torch.device, batch: int, seq_len: int, block_t: int, channel_blocks: int) -> tuple[int, int]:
    """(chunks per sequence, rows per chunk) for the backward: a few programs per SM, so the per-program
    dweight partials (programs, L, hidden) stay small while the GPU is still full."""
    tiles = cdiv(seq_len, block_t)
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2
    chunks = max(1, min(tiles, target // max(1, batch * channel_blocks)))
    chunk_len = cdiv(tiles, chunks) * block_t
    return cdiv(seq_len, chunk_len), chunk_len


def _short_conv_forward(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        doc_offsets: torch.Tensor | None) -> torch.Tensor:
    bcx = _channels_contiguous(bcx)
    batch, seq_len, channels = bcx.shape
    hidden = channels // 3
    w = weight.reshape(hidden, weight.shape[-1])
    kernel_size = w.shape[1]
    y = torch.empty((batch, seq_len, hidden), dtype=bcx.dtype, device=bcx.device)
    block_t, block_d, num_warps = _tile(hidden)
    grid = (cdiv(seq_len, block_t), cdiv(hidden, block_d), batch)
    _short_conv_fwd_kernel[grid](
        bcx, w, bias if bias is not None else w, doc_offsets if doc_offsets is not None else w, y,
        bcx.stride(0), bcx.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        seq_len, hidden,
        L=kernel_size, HAS_BIAS=bias is not None, HAS_OFFSETS=doc_offsets is not None, BLOCK_T=block_t,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return y


def _short_conv_forward_fake(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             doc_offsets: torch.Tensor | None) -> torch.Tensor:
    batch, seq_len, channels = bcx.shape
    return bcx.new_empty((batch, seq_len, channels // 3))


def _short_conv_backward(
    dy: torch.Tensor, bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    doc_offsets: torch.Tensor | None, weight_grad: bool, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (batch, seq, hidden) -> d(bcx) laid out like bcx, dweight like weight and dbias (hidden,) (each empty
    unless asked for)."""
    bcx, dy = _channels_contiguous(bcx), _channels_contiguous(dy)
    batch, seq_len, _ = bcx.shape
    w = weight.reshape(-1, weight.shape[-1])
    hidden, kernel_size = w.shape
    block_t, block_d, num_warps = _tile(hidden)
    channel_blocks = cdiv(hidden, block_d)
    chunks, chunk_len = _time_chunks(bcx.device, batch, seq_len, block_t, channel_blocks)
    programs = batch * chunks
    dbcx = torch.empty_like(bcx)
    dw_partial = torch.empty((programs, kernel_size, hidden), dtype=torch.float32, device=bcx.device)
    dbias_partial = torch.empty((programs, hidden) if bias is not None else (1,), dtype=torch.float32,
                                device=bcx.device)
    _short_conv_bwd_kernel[(channel_blocks, programs)](
        bcx, w, bias if bias is not None else w, doc_offsets if doc_offsets is not None else w, dy, dbcx,
        dw_partial, dbias_partial,
        bcx.stride(0), bcx.stride(1), w.stride(0), w.stride(1), dy.stride(0), dy.stride(1),
        dbcx.stride(0), dbcx.stride(1),
        seq_len, hidden, chunks, chunk_len,
        L=kernel_size, BLOCK_L=next_power_of_2(kernel_size), HAS_BIAS=bias is not None,
        HAS_OFFSETS=doc_offsets is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    dweight = dw_partial.sum(0).t().contiguous().to(w.dtype).view(weight.shape) if weight_grad else no_gradient(weight)
    dbias = dbias_partial.sum(0).to(bias.dtype) if bias is not None and bias_grad else no_gradient(weight)
    return dbcx, dweight, dbias


def _short_conv_backward_fake(
    dy: torch.Tensor, bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    doc_offsets: torch.Tensor | None, weight_grad: bool, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dweight = weight.new_empty(weight.shape) if weight_grad else no_gradient(weight)
    dbias = bias.new_empty(bias.shape) if bias is not None and bias_grad else no_gradient(weight)
    return torch.empty_like(_channels_contiguous(bcx)), dweight, dbias


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gradients(ctx, backward, dy):
    bcx, weight, bias, doc_offsets = ctx.saved_tensors
    _, weight_grad, bias_grad, _ = ctx.needs_input_grad
    bias_grad = bias_grad and bias is not None
    dbcx, dweight, dbias = backward(dy, bcx, weight, bias, doc_offsets, weight_grad, bias_grad)
    return dbcx, dweight if weight_grad else None, dbias if bias_grad else None, None


_short_conv = KernelOp("short_conv", _short_conv_forward, _short_conv_forward_fake, _setup_context, _gradients,
                       _short_conv_backward, _short_conv_backward_fake)


def short_conv(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               doc_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """C * causal_conv1d(B * x) for LFM2's short-conv layers.

    bcx: (batch, seq, 3 * hidden), the in_proj output with channel blocks [B | C | x]; weight: the depthwise
    conv weight, (hidden, 1, L) as nn.Conv1d stores it, or (hidden, L); bias: (hidden,) or None; doc_offsets:
    None (each row one document) or (batch, seq) int32 from `document_offsets` (packed documents, each convolved
    from its own start). Returns (batch, seq, hidden) in bcx's dtype. Causal from position 0: no conv state.
    """
    if bcx.dim() != 3 or bcx.shape[-1] % 3 != 0:
        raise ValueError(f"short_conv needs bcx of shape (batch, seq, 3 * hidden), got {tuple(bcx.shape)}")
    hidden = bcx.shape[-1] // 3
    if weight.numel() != hidden * weight.shape[-1] or weight.shape[0] != hidden:
        raise ValueError(f"conv weight {tuple(weight.shape)} does not fit hidden size {hidden}")
    if doc_offsets is not None and doc_offsets.shape != bcx.shape[:2]:
        raise ValueError(f"doc_offsets {tuple(doc_offsets.shape)} must be (batch, seq) = {tuple(bcx.shape[:2])}")
    if use_triton(bcx, weight, bias):
        if doc_offsets is not None:
            doc_offsets = doc_offsets.to(torch.int32).contiguous()
        return _short_conv(bcx, weight, bias, doc_offsets)
    return reference_short_conv(bcx, weight, bias, doc_offsets)


def reference_short_conv_decode(bcx: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row, as transformers' torch path (causal_conv1d_update) computes it: bcx (batch, 1,
    3 * hidden); state (batch, hidden, L), the last L values of B * x, shifted left in place to take the new one;
    weight (hidden, 1, L) or (hidden, L); bias (hidden,) or None -> (batch, 1, hidden)."""
    b, c, x = bcx.transpose(-1, -2).chunk(3, dim=-2)  # (batch, hidden, 1) each
    state.copy_(torch.cat((state[:, :, 1:], b * x), dim=-1))
    conv = (state * weight.reshape(weight.shape[0], -1)).sum(dim=-1, keepdim=True)
    if bias is not None:
        conv = conv + bias[:, None]
    return (c * conv).transpose(-1, -2).contiguous()


@triton.jit
def _short_conv_decode_kernel(BCX, stride_bcx, STATE, stride_sb, stride_sd, stride_sl, W, BIAS, Y, hidden,
                              L: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    # Program (row, channel block). Each value is rounded to the dtype where PyTorch's path rounds it: B * x, every
    # state * w product, their sum (accumulated in float32), the bias add, C * conv.
    row, block = tl.program_id(0), tl.program_id(1)
    dtype = Y.dtype.element_ty
    d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < hidden
    bcx = BCX + row * stride_bcx
    b = tl.load(bcx + d, mask=d_mask, other=0.0).to(tl.float32)
    c = tl.load(bcx + hidden + d, mask=d_mask, other=0.0).to(tl.float32)
    x = tl.load(bcx + 2 * hidden + d, mask=d_mask, other=0.0).to(tl.float32)
    bx = (b * x).to(dtype)
    taps = tl.arange(0, BLOCK_L)
    state = STATE + row * stride_sb + d[:, None] * stride_sd + taps[None, :] * stride_sl
    # Tap l takes tap l + 1's value, the last tap the new one: all loads of a program come before its stores.
    shifted = tl.load(state + stride_sl, mask=d_mask[:, None] & (taps < L - 1)[None, :], other=0.0)
    new_state = tl.where((taps == L - 1)[None, :], bx[:, None], shifted)
    tl.store(state, new_state, mask=d_mask[:, None] & (taps < L)[None, :])
    w = tl.load(W + d[:, None] * L + taps[None, :], mask=d_mask[:, None] & (taps < L)[None, :], other=0.0)
    products = (new_state.to(tl.float32) * w.to(tl.float32)).to(dtype).to(tl.float32)
    conv = tl.sum(products, axis=1).to(dtype).to(tl.float32)
    if HAS_BIAS:
        conv = (conv + tl.load(BIAS + d, mask=d_mask, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(Y + row * hidden + d, (c * conv).to(dtype), mask=d_mask)


def short_conv_decode(bcx: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``reference_short_conv_decode`` in one launch (the state updated in place); no autograd. bcx (batch, 1,
    3 * hidden) with unit stride on its channels, state (batch, hidden, L) any strides, weight (hidden, 1, L) or
    (hidden, L), bias (hidden,) or None, all in one dtype (otherwise PyTorch's path, whose type promotions it
    follows)."""
    batch, hidden, taps = state.shape
    if bcx.shape != (batch, 1, 3 * hidden) or weight.numel() != hidden * taps:
        raise ValueError(f"short_conv_decode takes bcx (batch, 1, 3 * hidden) = {(batch, 1, 3 * hidden)} and a "
                         f"weight of {hidden} x {taps} for state {tuple(state.shape)}; got bcx {tuple(bcx.shape)}, "
                         f"weight {tuple(weight.shape)}")
    tensors = (bcx, state, weight, bias)
    if (not use_triton(*tensors) or len({t.dtype for t in tensors if t is not None}) != 1
            or bcx.stride(-1) != 1 or not weight.is_contiguous()):
        return reference_short_conv_decode(bcx, state, weight, bias)
    y = torch.empty(batch, 1, hidden, dtype=bcx.dtype, device=bcx.device)
    block_d = min(256, next_power_of_2(hidden))
    _short_conv_decode_kernel[(batch, cdiv(hidden, block_d))](
        bcx, bcx.stride(0), state, *state.stride(), weight, bias, y, hidden, L=taps, HAS_BIAS=bias is not None,
        BLOCK_D=block_d, BLOCK_L=next_power_of_2(taps), num_warps=4,
    )
    return y
