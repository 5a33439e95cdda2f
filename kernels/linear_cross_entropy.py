"""lm_head + causal-LM cross-entropy fused by chunks, never holding the full-vocabulary fp32 logits.

transformers computes ``logits = lm_head(hidden)`` for every token, upcasts them to fp32 and calls
``ForCausalLMLoss``; with 8k tokens and a 200k-256k vocabulary that is several GB of logits plus as much again
for their gradient. Here the tokens are walked in chunks (Liger-Kernel's fused_linear_cross_entropy idea): for
each chunk, cuBLAS computes the chunk's logits into one reused buffer, a Triton kernel computes every row's
logsumexp and loss and overwrites the logits with d(loss_sum)/d(logits) in place, and two more GEMMs turn that
into the chunk's share of grad_hidden (and grad_weight / grad_bias for a trainable lm_head). The forward pass
therefore computes the gradients eagerly; backward only scales them by grad_output.

Semantics are exactly ``ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index)`` applied
to ``logits = (hidden @ weight.T + bias) * logit_scale`` with the labels already shifted (``shift_labels``):
the fp32 cross-entropy summed over non-ignored rows, divided by ``num_items_in_batch`` when given (gradient
accumulation) and by the number of non-ignored labels otherwise. With no non-ignored label and no
``num_items_in_batch`` the loss is nan (0/0) and the gradients are zeros, as torch's mean cross-entropy gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import use_triton

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


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,  # (rows, vocab) chunk logits without logit_scale; overwritten with the gradient
    stride_row,
    labels_ptr,  # (rows,) int64
    loss_ptr,  # (rows,) fp32: lse - logit[label], 0 for ignored rows
    vocab,
    logit_scale,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    offsets = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        # The buffer still holds this row's logits and feeds the gradient GEMMs: it must become zeros.
        zeros = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            tl.store(row_ptr + cols, zeros.to(logits_ptr.dtype.element_ty), mask=cols < vocab)
        tl.store(loss_ptr + row, 0.0)
    else:
        # Pass 1: online max / sum of exponentials over the vocabulary, one block at a time, in fp32.
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32) * logit_scale
            block_max = tl.max(x, axis=0)
            new_max = tl.maximum(running_max, block_max)
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target = tl.load(row_ptr + label).to(tl.float32) * logit_scale
        tl.store(loss_ptr + row, lse - target)

        # Pass 2: d(lse - target)/d(unscaled logits) = (softmax - onehot) * logit_scale. The 1/num_items factor
        # is left to backward so fp16 gradients of size ~softmax/num_items do not underflow here.
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_ptr + cols, (grad * logit_scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_rows(vocab: int, element_size: int, device: torch.device) -> int:
    budget = _CUDA_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    rows = max(1, budget // (vocab * element_size))
    # Multiples of 64 rows keep the chunk GEMMs on tensor-core friendly shapes.
    return rows - rows % 64 if rows >= 64 else rows


def _fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    logit_scale: float,
    ignore_index: int,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns the summed loss (fp32 scalar) and the unnormalised gradients of that sum.

    hidden (tokens, hidden), weight (vocab, hidden), bias (vocab,) | None, labels (tokens,).
    grad_hidden is in hidden's dtype, grad_weight in weight's (accumulated chunk by chunk with addmm_, as Liger
    does, rather than in an fp32 copy of the whole lm_head), grad_bias in fp32.
    """
    tokens = hidden.shape[0]
    vocab = weight.shape[0]
    block_v = min(triton.next_power_of_2(vocab), _CUDA_BLOCK_V if hidden.is_cuda else _CPU_BLOCK_V)
    # 16 fp32 columns per thread: enough work per warp without spilling registers.
    num_warps = min(32, max(4, block_v // 512))

    logits = hidden.new_empty((min(chunk_size, tokens), vocab))
    row_losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_grad_bias else None

    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        hidden_chunk = hidden[start:end]
        chunk_logits = logits[: end - start]
        if bias is None:
            torch.mm(hidden_chunk, weight.t(), out=chunk_logits)
        else:
            torch.addmm(bias, hidden_chunk, weight.t(), out=chunk_logits)
        _cross_entropy_rows_kernel[(end - start,)](
            chunk_logits,
            chunk_logits.stride(0),
            labels[start:end],
            row_losses[start:end],
            vocab,
            float(logit_scale),
            ignore_index,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        # chunk_logits now holds d(loss_sum)/d(hidden @ weight.T + bias) for these rows.
        if grad_hidden is not None:
            torch.mm(chunk_logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(chunk_logits.t(), hidden_chunk)
        if grad_bias is not None:
            grad_bias += chunk_logits.sum(dim=0, dtype=torch.float32)

    return row_losses.sum(), grad_hidden, grad_weight, grad_bias


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
        loss_sum, grad_hidden, grad_weight, grad_bias = _fused_forward(
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
        return loss_sum / divisor

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias, grad_scale = ctx.saved_tensors
        # A 0-dim fp32 factor keeps each tensor's dtype while the product is computed in fp32.
        scale = grad_output.to(torch.float32) * grad_scale
        grads_hidden = None if grad_hidden is None else grad_hidden * scale
        grads_weight = None if grad_weight is None else grad_weight * scale
        grads_bias = None if grad_bias is None else (grad_bias * scale).to(ctx.bias_dtype)
        return grads_hidden, grads_weight, grads_bias, None, None, None, None, None


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
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}")
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
