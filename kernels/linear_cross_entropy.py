"""lm_head fused with what a trainer needs from its logits, chunk by chunk, never holding the full-vocabulary
fp32 logits: the causal-LM cross-entropy (``linear_cross_entropy``) and per-token log-probabilities with their
entropy and top-1 (``linear_log_probs``, which serves trl's fused LM head: fastmoe/trl_fused_head.py).

transformers computes ``logits = lm_head(hidden)`` for every token, upcasts them to fp32 and calls
``ForCausalLMLoss``; with 8k tokens and a 200k-256k vocabulary that is several GB of logits plus as much again
for their gradient. Here the tokens are walked in chunks (Liger-Kernel's fused_linear_cross_entropy idea): for
each chunk, cuBLAS computes the chunk's logits into one reused buffer, a Triton kernel streams every row once to
get its logsumexp (and, for the log-prob op, the entropy, log Σ p², mean logit and argmax on the same pass) and
overwrites the logits with d(nll)/d(logits) in place, and two more GEMMs turn that into the chunk's share of
grad_hidden (and grad_weight / grad_bias for a trainable lm_head). The forward pass therefore computes the
gradients eagerly; backward only scales them by the incoming gradient.

Loss semantics are exactly ``ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index)``
applied to ``logits = (hidden @ weight.T + bias) * logit_scale`` with the labels already shifted
(``shift_labels``): the fp32 cross-entropy summed over non-ignored rows, divided by ``num_items_in_batch`` when
given (gradient accumulation) and by the number of non-ignored labels otherwise. With no non-ignored label and no
``num_items_in_batch`` the loss is nan (0/0) and the gradients are zeros, as torch's mean cross-entropy gives.

Log-prob semantics are trl's ``ChunkedLogProbFunction``: the distribution is softmax(z) with
``z = (hidden @ weight.T + bias) * logit_scale / temperature`` in fp32, and every per-token field is zero where the
label is ignored. d log p(label)/d hidden depends on that row alone, so with a frozen lm_head (LoRA) the forward
keeps each row's gradient (tokens, hidden) and backward scales it by the token's incoming gradient, whatever loss
(SFT, DFT, GRPO) weights it. The entropy's gradient is needed only by some RL losses (SFT logs the entropy and
nothing more), so backward recomputes the chunk logits for it only when one arrives. A trainable lm_head needs
those per-token weights inside its weight gradient, so then backward recomputes the logits, as trl does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import use_triton
from .grid import cdiv, next_power_of_2

# Bytes of one chunk's logits buffer. On an H100 (8k tokens, 200k-256k bf16 vocabularies) chunks of 256 rows
# made the whole step 15-20% slower than 1024+ rows, where the chunk GEMMs run near peak; 512 MiB gives 1024-1280
# rows there, still a small fraction of the full logits (3-4 GiB in bf16, twice that in fp32).
_CUDA_CHUNK_BYTES = 512 * 1024 * 1024
# Under the interpreter each program is a Python loop: small chunks keep CPU tests quick.
_CPU_CHUNK_BYTES = 1024 * 1024
# Columns per block of the row kernel. The kernel streams each row three times (two reads, one write) and runs at
# ~2.8 TB/s on an H100 with 16k columns and 32 warps, a few % ahead of 4k-8k columns. On CPU the small block makes
# odd vocabularies span several blocks with a ragged tail, so the tests exercise the online logsumexp across blocks.
_CUDA_BLOCK_V = 16384
_CPU_BLOCK_V = 256


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(batch, seq) -> (batch * seq,): transformers' pad-then-shift, the target of position i is labels[i + 1].

    The last position of every sequence gets ``ignore_index``, as ``ForCausalLMLoss`` pads it.
    """
    padded = F.pad(labels, (0, 1), value=ignore_index)
    return padded[..., 1:].reshape(-1)


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden (tokens, hidden), weight (vocab, hidden), labels (tokens,) shifted -> scalar fp32 loss.

    What a transformers model does: full logits in the input dtype (Cohere scales them there), upcast to fp32,
    then ``fixed_cross_entropy``.
    """
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    logits = logits.float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class TokenLogProbs(NamedTuple):
    """Per-token fields of ``linear_log_probs``, each (tokens,) and zero (False) where the label is ignored."""

    log_probs: torch.Tensor  # log p(label), fp32, differentiable
    entropy: torch.Tensor  # -Σ p log p, fp32, differentiable
    log_sum_sq_probs: torch.Tensor  # log Σ p², fp32, no gradient
    mean_logits: torch.Tensor  # mean of z over the vocabulary, fp32, no gradient
    is_top1: torch.Tensor  # bool: the label is the first argmax of z


def reference_linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> TokenLogProbs:
    """hidden (tokens, hidden), weight (vocab, hidden), labels (tokens,) shifted -> per-token fields on full logits.

    trl's definitions: logits in the input dtype, then ``z = logits.float() * logit_scale / temperature``.
    """
    z = F.linear(hidden, weight, bias).float() * logit_scale / temperature
    log_p = z.log_softmax(dim=-1)
    keep = labels != ignore_index
    log_probs = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    log_sum_sq_probs = torch.logsumexp(2 * log_p, dim=-1).detach()
    mean_logits = z.mean(dim=-1).detach()
    zero = torch.zeros((), device=z.device)
    return TokenLogProbs(
        *(torch.where(keep, x, zero) for x in (log_probs, entropy, log_sum_sq_probs, mean_logits)),
        is_top1=keep & (z.argmax(dim=-1) == labels),
    )


@triton.jit
def _logit_rows_kernel(
    logits_ptr,  # (rows, vocab) chunk logits before scaling; with WRITE_GRAD overwritten by d(nll)/d(logits)
    stride_row,
    labels_ptr,  # (rows,) int64
    nll_ptr,  # (rows,) fp32: lse - z[label], 0 for ignored rows
    lse_ptr,  # the (rows,) fp32 statistics below are written only WITH_STATS, and are 0 for ignored rows
    entropy_ptr,
    log_sum_sq_ptr,
    mean_ptr,
    argmax_ptr,  # (rows,) int32, -1 for ignored rows
    vocab,
    scale,  # z = logits * scale
    ignore_index,
    WITH_STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    offsets = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        if WRITE_GRAD:
            # The buffer still holds this row's logits and feeds the gradient GEMMs: it must become zeros.
            zeros = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                tl.store(row_ptr + cols, zeros.to(logits_ptr.dtype.element_ty), mask=cols < vocab)
        tl.store(nll_ptr + row, 0.0)
        if WITH_STATS:
            tl.store(lse_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
            tl.store(log_sum_sq_ptr + row, 0.0)
            tl.store(mean_ptr + row, 0.0)
            tl.store(argmax_ptr + row, -1)
    else:
        # Pass 1: online max / Σ e^(z - max) over the vocabulary, one block at a time, in fp32; WITH_STATS also
        # Σ e^(z - max) z (entropy), Σ e^(2(z - max)) (Σ p²), Σ z and the first argmax, rescaled as max grows.
        running_max = -float("inf")
        running_sum = 0.0
        sum_exp_z = 0.0
        sum_exp_sq = 0.0
        sum_z = 0.0
        argmax = 0
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            z = tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale
            block_max = tl.max(z, axis=0)
            new_max = tl.maximum(running_max, block_max)
            rescale = tl.exp(running_max - new_max)
            e = tl.exp(z - new_max)
            running_sum = running_sum * rescale + tl.sum(e, axis=0)
            if WITH_STATS:
                z_in = tl.where(mask, z, 0.0)
                sum_exp_z = sum_exp_z * rescale + tl.sum(e * z_in, axis=0)
                sum_exp_sq = sum_exp_sq * rescale * rescale + tl.sum(e * e, axis=0)
                sum_z += tl.sum(z_in, axis=0)
                # The block's first column at its max; strictly greater than the running max, so that a tie with
                # an earlier block keeps the earlier index: torch.argmax's first maximum.
                first = tl.min(tl.where(z == block_max, cols, vocab), axis=0)
                argmax = tl.where(block_max > running_max, first, argmax)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target = tl.load(row_ptr + label).to(tl.float32) * scale
        tl.store(nll_ptr + row, lse - target)
        if WITH_STATS:
            tl.store(lse_ptr + row, lse)
            tl.store(entropy_ptr + row, lse - sum_exp_z / running_sum)
            tl.store(log_sum_sq_ptr + row, tl.log(sum_exp_sq) - 2 * tl.log(running_sum))
            tl.store(mean_ptr + row, sum_z / vocab)
            tl.store(argmax_ptr + row, argmax)

        if WRITE_GRAD:
            # Pass 2: d(lse - z[label])/d(logits) = (softmax - onehot) * scale. The incoming gradient (1/num_items
            # for the loss) is left to backward so fp16 gradients of size ~softmax/num_items do not underflow here.
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                mask = cols < vocab
                z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * scale
                grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logit_grad_kernel(
    logits_ptr,  # (rows, vocab) chunk logits before scaling, overwritten by the gradient
    stride_row,
    labels_ptr,  # (rows,) int64
    lse_ptr,  # (rows,) fp32, from _logit_rows_kernel
    entropy_ptr,  # (rows,) fp32, from _logit_rows_kernel
    grad_nll_ptr,  # (rows,) fp32 incoming gradient of each row's nll
    grad_entropy_ptr,  # (rows,) fp32 incoming gradient of each row's entropy
    vocab,
    scale,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    # The row's statistics are known, so each program takes one block of one row: no pass over the whole row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < vocab
    ptrs = logits_ptr + row * stride_row + cols
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(ptrs, tl.zeros((BLOCK_V,), dtype=tl.float32).to(logits_ptr.dtype.element_ty), mask=mask)
    else:
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * scale
        log_p = z - tl.load(lse_ptr + row)
        p = tl.exp(log_p)
        # d nll/dz = p - onehot(label); d entropy/dz = -p (log p + entropy).
        grad = tl.load(grad_nll_ptr + row) * (p - tl.where(cols == label, 1.0, 0.0))
        grad -= tl.load(grad_entropy_ptr + row) * p * (log_p + tl.load(entropy_ptr + row))
        tl.store(ptrs, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_rows(vocab: int, element_size: int, device: torch.device) -> int:
    budget = _CUDA_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    rows = max(1, budget // (vocab * element_size))
    # Multiples of 64 rows keep the chunk GEMMs on tensor-core friendly shapes.
    return rows - rows % 64 if rows >= 64 else rows


def _block(vocab: int, device: torch.device) -> tuple[int, int]:
    """Columns per block and warps of the row kernels."""
    block_v = min(next_power_of_2(vocab), _CUDA_BLOCK_V if device.type == "cuda" else _CPU_BLOCK_V)
    # 16 fp32 columns per thread: enough work per warp without spilling registers.
    return block_v, min(32, max(4, block_v // 512))


def _chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(hidden_chunk, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden_chunk, weight.t(), out=out)


def _accumulate_grads(chunk_grad: torch.Tensor, hidden_chunk: torch.Tensor, weight: torch.Tensor,
                      grad_hidden_chunk: torch.Tensor | None, grad_weight: torch.Tensor | None,
                      grad_bias: torch.Tensor | None) -> None:
    """chunk_grad (rows, vocab) = d(objective)/d(chunk logits) -> this chunk's share of every wanted gradient.

    grad_weight is accumulated in weight's dtype chunk by chunk (addmm_, as Liger does) rather than in an fp32
    copy of the whole lm_head; grad_bias in fp32."""
    if grad_hidden_chunk is not None:
        torch.mm(chunk_grad, weight, out=grad_hidden_chunk)
    if grad_weight is not None:
        grad_weight.addmm_(chunk_grad.t(), hidden_chunk)
    if grad_bias is not None:
        grad_bias += chunk_grad.sum(dim=0, dtype=torch.float32)


def _fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: float,
    ignore_index: int,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    with_stats: bool,
):
    """Per-row nll (fp32), the per-row statistics when ``with_stats`` (lse, entropy, log Σ p², mean z, argmax),
    and the gradients of Σ nll that are asked for.

    hidden (tokens, hidden), weight (vocab, hidden), bias (vocab,) | None, labels (tokens,).
    grad_hidden is in hidden's dtype, grad_weight in weight's, grad_bias in fp32.
    """
    tokens = hidden.shape[0]
    vocab = weight.shape[0]
    block_v, num_warps = _block(vocab, hidden.device)
    write_grad = need_grad_hidden or need_grad_weight or need_grad_bias

    logits = hidden.new_empty((min(chunk_size, tokens), vocab))
    nll = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    stats = None
    if with_stats:
        stats = tuple(torch.empty_like(nll) for _ in range(4)) + (
            torch.empty(tokens, dtype=torch.int32, device=hidden.device),)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_grad_bias else None

    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        chunk_logits = logits[: end - start]
        _chunk_logits(hidden[start:end], weight, bias, chunk_logits)
        row_stats = (nll,) * 5 if stats is None else stats  # unused pointers when not with_stats
        _logit_rows_kernel[(end - start,)](
            chunk_logits,
            chunk_logits.stride(0),
            labels[start:end],
            nll[start:end],
            *(s[start:end] for s in row_stats),
            vocab,
            float(scale),
            ignore_index,
            WITH_STATS=with_stats,
            WRITE_GRAD=write_grad,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        if write_grad:
            _accumulate_grads(chunk_logits, hidden[start:end], weight,
                              None if grad_hidden is None else grad_hidden[start:end], grad_weight, grad_bias)

    return nll, stats, grad_hidden, grad_weight, grad_bias


def _recomputed_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_nll: torch.Tensor,
    grad_entropy: torch.Tensor,
    scale: float,
    ignore_index: int,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
):
    """Gradients of Σ grad_nll·nll + grad_entropy·entropy (grad_* (tokens,) fp32), each chunk's logits recomputed."""
    tokens = hidden.shape[0]
    vocab = weight.shape[0]
    block_v, num_warps = _block(vocab, hidden.device)
    logits = hidden.new_empty((min(chunk_size, tokens), vocab))
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_grad_bias else None
    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        chunk_logits = logits[: end - start]
        _chunk_logits(hidden[start:end], weight, bias, chunk_logits)
        rows = slice(start, end)
        _logit_grad_kernel[(end - start, cdiv(vocab, block_v))](
            chunk_logits, chunk_logits.stride(0), labels[rows], lse[rows], entropy[rows], grad_nll[rows],
            grad_entropy[rows], vocab, float(scale), ignore_index, BLOCK_V=block_v, num_warps=num_warps,
        )
        _accumulate_grads(chunk_logits, hidden[rows], weight, None if grad_hidden is None else grad_hidden[rows],
                          grad_weight, grad_bias)
    return grad_hidden, grad_weight, grad_bias


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        logit_scale: float,
        ignore_index: int,
        num_items_in_batch: int | torch.Tensor | None,
        chunk_size: int,
    ) -> torch.Tensor:
        nll, _, grad_hidden, grad_weight, grad_bias = _fused_forward(
            hidden,
            weight,
            bias,
            labels,
            logit_scale,
            ignore_index,
            chunk_size,
            need_grad_hidden=ctx.needs_input_grad[0],
            need_grad_weight=ctx.needs_input_grad[1],
            need_grad_bias=bias is not None and ctx.needs_input_grad[2],
            with_stats=False,
        )
        # Tensors all the way so the loss needs no host sync (num_items_in_batch may live on the GPU).
        if num_items_in_batch is None:
            divisor = (labels != ignore_index).sum().to(torch.float32)
            # torch's mean cross-entropy over zero targets is nan with zero gradients: keep the nan loss, but
            # scale the (all-zero) gradients by 0 rather than inf.
            grad_scale = torch.where(divisor > 0, 1.0 / divisor, torch.zeros_like(divisor))
        else:
            divisor = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32)
            grad_scale = 1.0 / divisor
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return nll.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias, grad_scale = ctx.saved_tensors
        # A 0-dim fp32 factor keeps each tensor's dtype while the product is computed in fp32.
        scale = grad_output.to(torch.float32) * grad_scale
        grads_hidden = None if grad_hidden is None else grad_hidden * scale
        grads_weight = None if grad_weight is None else grad_weight * scale
        grads_bias = None if grad_bias is None else (grad_bias * scale).to(ctx.bias_dtype)
        return grads_hidden, grads_weight, grads_bias, None, None, None, None, None


class LinearLogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        scale: float,
        ignore_index: int,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # An unused output (the entropy under SFT) then brings None to backward, not a tensor of zeros.
        ctx.set_materialize_grads(False)
        train_head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        # With a frozen head each row's gradient is ready after the forward (see the module docstring).
        eager = ctx.needs_input_grad[0] and not train_head
        nll, stats, nll_grad_rows, _, _ = _fused_forward(
            hidden, weight, bias, labels, scale, ignore_index, chunk_size,
            need_grad_hidden=eager, need_grad_weight=False, need_grad_bias=False, with_stats=True,
        )
        lse, entropy, log_sum_sq_probs, mean_logits, argmax = stats
        is_top1 = argmax == labels
        # hidden is kept for the entropy gradient (rarely wanted; the same size as nll_grad_rows).
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy, nll_grad_rows)
        ctx.scale, ctx.ignore_index, ctx.chunk_size = scale, ignore_index, chunk_size
        ctx.mark_non_differentiable(log_sum_sq_probs, mean_logits, is_top1)
        return -nll, entropy, log_sum_sq_probs, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_):
        hidden, weight, bias, labels, lse, entropy, nll_grad_rows = ctx.saved_tensors
        unused = (None,) * 4  # labels, scale, ignore_index, chunk_size
        if grad_log_probs is None and grad_entropy is None:
            return (None, None, None, *unused)
        # log p = -nll: the nll's incoming gradient is the negated log-prob one.
        grad_nll = torch.zeros_like(lse) if grad_log_probs is None else -grad_log_probs.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()

        def recompute(grad_nll, grad_entropy, need_hidden, need_weight, need_bias):
            return _recomputed_grads(
                hidden, weight, bias, labels, lse, entropy, grad_nll, grad_entropy, ctx.scale, ctx.ignore_index,
                ctx.chunk_size, need_hidden, need_weight, need_bias,
            )

        if nll_grad_rows is None:  # a trainable head: everything from recomputed logits
            need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
            grad_hidden, grad_weight, grad_bias = recompute(
                grad_nll, torch.zeros_like(lse) if grad_entropy is None else grad_entropy,
                need_hidden, need_weight, bias is not None and need_bias,
            )
            grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
            return (grad_hidden, grad_weight, grad_bias, *unused)

        # A frozen head: scale the kept rows in fp32; only an entropy gradient recomputes the logits.
        grad_hidden = nll_grad_rows * grad_nll.unsqueeze(-1)
        if grad_entropy is not None:
            entropy_grad_hidden, _, _ = recompute(torch.zeros_like(lse), grad_entropy, True, False, False)
            grad_hidden += entropy_grad_hidden
        return (grad_hidden.to(hidden.dtype), None, None, *unused)


def _check_dtypes(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Causal-LM loss of ``(hidden @ weight.T + bias) * logit_scale`` without materialising all the logits.

    hidden (tokens, hidden) — leading dimensions are flattened; weight (vocab, hidden); bias (vocab,) | None;
    labels (tokens,) int64, already shifted (see ``shift_labels``). Returns the fp32 scalar loss of
    transformers' ``ForCausalLMLoss``. ``chunk_size`` (rows per chunk) defaults to a fixed logits-buffer
    budget. Labels outside [0, vocab) other than ``ignore_index`` are not checked on the fused path.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    if not use_triton(hidden, weight, bias):
        return reference_linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            logit_scale=logit_scale,
            ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
        )
    _check_dtypes(hidden, weight, bias)
    if chunk_size is None:
        chunk_size = _chunk_rows(weight.shape[0], hidden.element_size(), hidden.device)
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(),
        weight,
        bias,
        labels.to(device=hidden.device, dtype=torch.int64).contiguous(),
        logit_scale,
        ignore_index,
        num_items_in_batch,
        chunk_size,
    )


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> TokenLogProbs:
    """Per-token log p(label), entropy, log Σ p², mean logit and top-1 of softmax(z), z = ``(hidden @ weight.T +
    bias) * logit_scale / temperature``, without materialising all the logits.

    hidden (tokens, hidden) — leading dimensions are flattened; weight (vocab, hidden); bias (vocab,) | None;
    labels (tokens,) int64, already shifted. Returns ``TokenLogProbs`` of (tokens,) tensors, zero where the label
    is ``ignore_index``; log_probs and entropy carry gradients. ``chunk_size`` as in ``linear_cross_entropy``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    if not use_triton(hidden, weight, bias):
        return reference_linear_log_probs(hidden, weight, labels, bias=bias, logit_scale=logit_scale,
                                          temperature=temperature, ignore_index=ignore_index)
    _check_dtypes(hidden, weight, bias)
    if chunk_size is None:
        chunk_size = _chunk_rows(weight.shape[0], hidden.element_size(), hidden.device)
    return TokenLogProbs(*LinearLogProbsFunction.apply(
        hidden.contiguous(),
        weight,
        bias,
        labels.to(device=hidden.device, dtype=torch.int64).contiguous(),
        float(logit_scale) / float(temperature),
        ignore_index,
        chunk_size,
    ))
