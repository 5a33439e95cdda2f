"""The feed-forward in token chunks (fastmoe.token_chunks): the same outputs and gradients as the whole sequence at
once, for a module alone (fp64) and inside checkpointed layers of six families (fp32, every LoRA gradient)."""

import pytest
import torch
from transformers import AutoConfig

import fastmoe
from fastmoe import FastModel, token_chunks
from testing_utils import fp32_model_tolerance, randomize_lora, rel_err


class PerTokenMLP(torch.nn.Module):
    """A frozen SwiGLU MLP with a trainable low-rank update on its input projection, like a LoRA'd expert."""

    def __init__(self, hidden: int = 6, inner: int = 10):
        super().__init__()
        self.up = torch.nn.Linear(hidden, 2 * inner, dtype=torch.float64).requires_grad_(False)
        self.down = torch.nn.Linear(inner, hidden, dtype=torch.float64).requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(hidden, 2, dtype=torch.float64))
        self.lora_b = torch.nn.Parameter(torch.randn(2, 2 * inner, dtype=torch.float64))

    def forward(self, x):
        gate, up = (self.up(x) + x @ self.lora_a @ self.lora_b).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("needs_input_grad", [True, False])
def test_chunks_give_the_whole_sequences_outputs_and_gradients(needs_input_grad):
    torch.manual_seed(0)
    module = PerTokenMLP()
    hidden = torch.randn(2, 13, 6, dtype=torch.float64, requires_grad=needs_input_grad)  # 26 tokens: 9 + 9 + 8
    grad_out = torch.randn(2, 13, 6, dtype=torch.float64)

    def run(chunk_tokens):
        module.zero_grad(set_to_none=True)
        if hidden.grad is not None:
            hidden.grad = None
        out = token_chunks.feed_forward_in_chunks(module, hidden, chunk_tokens)
        out.backward(grad_out)
        return out.detach(), hidden.grad, module.lora_a.grad, module.lora_b.grad

    chunked, whole = run(9), run(100)
    assert rel_err(chunked[0], whole[0]) < 1e-12
    for got, ref in zip(chunked[1:], whole[1:]):
        assert (got is None) == (ref is None)
        if ref is not None:
            assert rel_err(got, ref) < 1e-12
    with torch.no_grad():
        assert rel_err(token_chunks.feed_forward_in_chunks(module, hidden, 4), whole[0]) < 1e-12


class ScoredMLP(PerTokenMLP):
    """Returns (output, per-token scores), as transformers' GptOssMLP returns its router scores beside its output."""

    def forward(self, x):
        return super().forward(x), x.sum(-1)


def test_a_module_returning_a_tuple_gives_its_output_in_chunks_and_whole():
    torch.manual_seed(1)
    module, plain = ScoredMLP(), PerTokenMLP()
    plain.load_state_dict(module.state_dict())
    hidden = torch.randn(2, 13, 6, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 13, 6, dtype=torch.float64)
    for chunk_tokens in (4, 100):  # chunked with autograd, and whole
        out = token_chunks.feed_forward_in_chunks(module, hidden, chunk_tokens)
        ref = plain(hidden)
        assert rel_err(out, ref) < 1e-12
        grads = torch.autograd.grad(out, (hidden, module.lora_a), grad_out)
        ref_grads = torch.autograd.grad(ref, (hidden, plain.lora_a), grad_out)
        for got, want in zip(grads, ref_grads):
            assert rel_err(got, want) < 1e-12
    with torch.no_grad():  # chunked without autograd
        assert rel_err(token_chunks.feed_forward_in_chunks(module, hidden, 4), plain(hidden)) < 1e-12


def test_short_sequences_and_frozen_modules_run_whole(monkeypatch):
    module = PerTokenMLP()
    calls = []
    monkeypatch.setattr(token_chunks._FeedForwardChunks, "apply", lambda *a: calls.append(a) or 1 / 0)
    hidden = torch.randn(1, 8, 6, dtype=torch.float64, requires_grad=True)
    token_chunks.feed_forward_in_chunks(module, hidden, 4)  # two chunks' worth: whole
    module.requires_grad_(False)
    token_chunks.feed_forward_in_chunks(module, hidden.detach(), 3)  # nothing to differentiate: a plain loop
    assert not calls


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe", "qwen3_moe", "mixtral", "jetmoe", "cohere"])
def test_checkpointed_layers_train_the_same_in_chunks(tiny_checkpoint, monkeypatch, kernel_references, model_type):
    """What is checked is the chunking (the ops' references, kernel_references: chunks of 5 tokens make the
    interpreted kernels' launches many and slow)."""
    checkpoint = tiny_checkpoint(model_type)
    config = AutoConfig.from_pretrained(checkpoint)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    randomize_lora(model)
    model.train()
    input_ids = torch.randint(3, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    chunked_calls = []
    apply = token_chunks._FeedForwardChunks.apply
    monkeypatch.setattr(token_chunks._FeedForwardChunks, "apply", lambda *a: chunked_calls.append(1) or apply(*a))

    def loss_and_grads(chunk_tokens):
        monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", chunk_tokens)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    chunked_loss, chunked_grads = loss_and_grads(5)  # 34 tokens: chunks of 5, the last of 4
    assert chunked_calls  # the recomputed layers ran their feed-forward in chunks
    chunked_calls.clear()
    whole_loss, whole_grads = loss_and_grads(10_000)
    assert not chunked_calls
    tolerance = fp32_model_tolerance(config, 2, 17)
    assert rel_err(chunked_loss, whole_loss) < tolerance
    assert chunked_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        assert rel_err(chunked_grads[name], grad) < tolerance, name
    fastmoe.unpatch()
