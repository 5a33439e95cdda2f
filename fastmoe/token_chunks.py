"""A decoder layer's feed-forward (MoE block or dense MLP) run over long sequences a chunk of tokens at a time.

Why: with gradient checkpointing, what a long sequence costs per token is mostly one layer's recompute and
backward, and the feed-forward is most of that. An MoE block holds, per token, top_k copies of its gate/up output
for the backward, the SwiGLU output, the down projection's per-expert rows and, in the backward, the gradients of
each of them: for Trinity-Mini's top-8 of 1,024-wide experts about 110 KB per token, over 7 GB at 65,536 tokens.
The feed-forward works on each token alone (dropless top-k routing, no capacity limit), so it can run on any split
of the tokens and give the same result.

What: `feed_forward_in_chunks(module, hidden)` runs `module` on `chunk_tokens` tokens at a time whenever a forward
holds more than `2 * chunk_tokens` tokens (shorter ones run whole, as before). Without autograd (checkpointing's
first forward, inference) that is a plain loop, free. With autograd it is a checkpoint over the chunks: the forward
keeps nothing but its input; the backward recomputes one chunk with autograd, differentiates it, and moves on, so
only one chunk's activations ever exist. The price is one more forward of the feed-forward in the backward (about
a tenth of the step at these lengths), paid only above the threshold. Gradients reach the module's trainable
parameters through the Function's own outputs, not through `.grad`, so an enclosing `torch.autograd.grad`
(graphed checkpointing's backward) sees them.
"""

from __future__ import annotations

import torch

from fastmoe.module_structure import structure_of

# Chunks of 8,192 tokens keep the grouped GEMMs large enough to run at full speed (every expert still sees
# hundreds of rows) while holding a fixed ~1 GB for Trinity-Mini's MoE block.
CHUNK_TOKENS = 8192


def _trainable(module: torch.nn.Module) -> tuple[torch.nn.Parameter, ...]:
    return tuple(p for _, p in structure_of(module).named_parameters if p.requires_grad)


class _FeedForwardChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, chunk_tokens, hidden, *params):
        ctx.module, ctx.chunk_tokens, ctx.params = module, chunk_tokens, params
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(hidden)
        with torch.no_grad():
            return _run_chunks(module, hidden, chunk_tokens)

    @staticmethod
    def backward(ctx, grad_output):
        (hidden,) = ctx.saved_tensors
        params = ctx.params
        rows = hidden.reshape(-1, hidden.shape[-1])
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_hidden = torch.empty_like(rows) if ctx.needs_input_grad[2] else None
        grad_params = [None] * len(params)
        device, autocast, autocast_dtype = ctx.autocast
        for start in range(0, rows.shape[0], ctx.chunk_tokens):
            piece = rows[start:start + ctx.chunk_tokens].detach().requires_grad_(grad_hidden is not None)
            with torch.enable_grad(), torch.autocast(device, autocast_dtype, enabled=autocast):
                out = _output(ctx.module(piece[None]))
            wanted = ((piece,) if grad_hidden is not None else ()) + params
            grads = torch.autograd.grad(out, wanted, grad_rows[start:start + piece.shape[0]][None],
                                        allow_unused=True)
            if grad_hidden is not None:
                grad_hidden[start:start + piece.shape[0]] = grads[0]
                grads = grads[1:]
            for i, grad in enumerate(grads):
                if grad is not None:
                    grad_params[i] = grad if grad_params[i] is None else grad_params[i] + grad
        grad_hidden = None if grad_hidden is None else grad_hidden.view_as(hidden)
        return (None, None, grad_hidden, *grad_params)


def _output(result):
    """A feed-forward's output: the result itself, or the first of a tuple (transformers' GptOssMLP returns its router
    scores beside it, which its decoder layer drops)."""
    return result[0] if isinstance(result, tuple) else result


def _run_chunks(module: torch.nn.Module, hidden: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    rows = hidden.reshape(-1, hidden.shape[-1])
    outputs = [_output(module(piece[None]))[0] for piece in rows.split(chunk_tokens)]
    return torch.cat(outputs).view(*hidden.shape[:-1], outputs[0].shape[-1])


def feed_forward_in_chunks(module: torch.nn.Module, hidden: torch.Tensor,
                           chunk_tokens: int | None = None) -> torch.Tensor:
    """`module(hidden)` for a per-token module (MoE block, MLP) taking (batch, seq, hidden), a chunk of tokens at a
    time when hidden holds more than two chunks (see the module docstring). A module returning a tuple gives its
    first element, the output."""
    chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    if hidden.numel() // hidden.shape[-1] <= 2 * chunk_tokens:
        return _output(module(hidden))
    if not torch.is_grad_enabled():
        return _run_chunks(module, hidden, chunk_tokens)
    params = _trainable(module)
    if not hidden.requires_grad and not params:
        with torch.no_grad():
            return _run_chunks(module, hidden, chunk_tokens)
    return _FeedForwardChunks.apply(module, chunk_tokens, hidden, *params)
