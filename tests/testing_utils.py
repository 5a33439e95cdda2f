"""Helpers for the tests: relative errors, and whole-model equivalence of a FastModel with LoRA against plain
transformers + peft on the same weights."""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import fastmoe
from fastmoe import FastModel


class RecordOps(TorchDispatchMode):
    """The ops run while active (aten's and custom ops) for which `keep(func, args, kwargs)` holds, as
    (func, args, kwargs, output) in `calls`."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.keep(func, args, kwargs):
            self.calls.append((func, args, kwargs, out))
        return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out − ref| / max|ref| in float64: the largest error against the reference's largest value. The loss-head
    tests (tests/kernels/test_linear_cross_entropy.py) compare by it, and their tolerances, bf16 ones against trl's
    error included, were set in it."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# Float32's unit roundoff: rounding a real number to float32 moves it by at most this fraction of itself.
FP32_UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2  # 2**-24
# How many standard deviations of accumulated rounding error fp32_model_tolerance allows (see there).
ROUNDING_DEVIATIONS = 8


def fp32_model_tolerance(config, batch_size: int, seq_len: int) -> float:
    """Largest rel_err allowed between a whole model's fp32 logits, loss or LoRA gradients and its fp64 reference.

    Rounding the K products of a dot product, and their running sum, to fp32 leaves a relative error of about
    sqrt(K)·u (u = 2**-24): the individual errors are independent and add like a random walk, and the bound
    lambda·sqrt(K)·u fails with probability at most 2K·exp(-lambda²/2) (Higham & Mary, "A new approach to
    probabilistic rounding error analysis", SIAM J. Sci. Comput. 41, 2019). Successive reductions add their errors
    the same way, so what ends a chain of reductions of lengths K1, K2, ... carries about sqrt(n)·u, with
    n = K1 + K2 + ... The longest chain here ends in a first-layer LoRA gradient: every layer forward (two norms over
    hidden; attention: projection in over hidden, scores over head_dim, softmax and weighted sum over the sequence,
    projection out over hidden; MLP: in over hidden, out over intermediate), the final norm and lm_head, the loss
    over the vocabulary and back through lm_head, every layer backward (the same lengths), then the weight
    gradient's sum over tokens; the logits and the loss end shorter chains of the same reductions.

    ROUNDING_DEVIATIONS = 8 makes a failure from rounding alone less likely than 1e-10. The rest of the margin is for
    conditioning, which no size predicts: on these tiny models transformers' own fp32 run reaches 3.5·sqrt(n)·u
    (AFMoE, whose post-attention and post-MLP norms scale a sublayer output that came out of a cancelling sum back
    to full size, relative error and all), the other families 1·sqrt(n)·u or less. tests/models/test_tolerance.py
    checks that transformers' own fp32 run stays within this bound and that a kernel rounding one op to half
    precision does not. Nothing here depends on the CPU's instruction set: a CPU only changes which rounding errors
    occur, not how large they can be.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = max(getattr(config, name, None) or 0 for name in ("intermediate_size", "moe_intermediate_size"))
    head_dim = (getattr(config, "head_dim", None) or getattr(config, "kv_channels", None)
                or hidden // config.num_attention_heads)
    per_layer = 2 * hidden + (hidden + head_dim + 2 * seq_len + hidden) + (hidden + intermediate)
    chain = 2 * layers * per_layer + 2 * hidden + 2 * config.vocab_size + batch_size * seq_len
    return ROUNDING_DEVIATIONS * math.sqrt(chain) * FP32_UNIT_ROUNDOFF


def batch_with_padding(vocab_size: int, seed: int = 0, batch: int = 2, seq: int = 11):
    """Random token ids, right padding on the second row (masked in attention, -100 in labels)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, seq - 3:] = 0
    input_ids[1, seq - 3:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def randomize_lora(model, seed: int = 1) -> None:
    """peft zero-initialises B, which hides every A gradient; draw all adapter weights at random."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def forward_backward(model, batch):
    """Logits without labels, then loss and the gradient of every trainable parameter."""
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.detach()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits, loss.detach(), grads


def compare_with_transformers(checkpoint, lora_kwargs: dict, seed: int = 0, gradient_checkpointing: bool = False,
                              call_kwargs: dict | None = None, **load_kwargs):
    """Run the same LoRA model through plain transformers+peft and through FastModel (loaded with `load_kwargs`;
    `call_kwargs` go to every forward call, e.g. output_router_logits).

    Returns (reference, fast) tuples of (logits, loss, grads); the reference is transformers + peft in float64."""
    fastmoe.unpatch()
    # The reference runs in float64: the fp32 budget (1e-5) is then spent on fastmoe's own rounding rather than
    # on the difference between two fp32 summation orders compounding through the layers.
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64, experts_implementation="eager")
    reference = get_peft_model(reference, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize_lora(reference)
    batch = {**batch_with_padding(reference.config.vocab_size, seed=seed), **(call_kwargs or {})}
    ref_out = forward_backward(reference, batch)

    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64, **load_kwargs)
    patches = fastmoe.models.family(model.config.model_type).patches(load_kwargs.get("fast_ops"))
    assert fastmoe.patching.is_patched(patches), "FastModel did not patch its family"
    model = FastModel.get_peft_model(model, use_gradient_checkpointing=gradient_checkpointing, **lora_kwargs)
    randomize_lora(model)
    fast_out = forward_backward(model, batch)
    return ref_out, fast_out


def patched_model_and_unpatched_reference(checkpoint, patched: tuple[type, ...]):
    """FastModel.from_pretrained(checkpoint) in fp32, checked to have swapped the forwards of the `patched` classes,
    then fastmoe.unpatch(), checked to have put transformers' back: (the fastmoe model, transformers' model of the
    checkpoint in eval mode, a padded batch). The patches are off on return."""
    originals = {cls: cls.__dict__["forward"] for cls in patched}
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32)
    assert all(cls.__dict__["forward"] is not originals[cls] for cls in patched)
    fastmoe.unpatch()
    assert all(cls.__dict__["forward"] is originals[cls] for cls in patched)
    reference = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return model, reference, batch_with_padding(reference.config.vocab_size)


def lfm2_moe_records_router_logits() -> bool:
    """transformers 5.18 taught LFM2-MoE to return its router logits (output_router_logits); 5.17 returns none."""
    from transformers.models.lfm2_moe import modeling_lfm2_moe

    return "router_logits" in (getattr(modeling_lfm2_moe.Lfm2MoePreTrainedModel, "_can_record_outputs", None) or {})


# The MoE kernel tests (tests/kernels/moe): routing, expert LoRA factors and the kernel-against-reference check.


def random_routing(num_tokens, num_experts, top_k, used_experts=None, device="cpu", generator=None):
    """Distinct experts per token drawn from the first used_experts (the rest receive no token)."""
    used = used_experts or num_experts
    index = torch.stack([torch.randperm(used, generator=generator)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    return index.to(device), weights.to(device)


def random_expert_lora(num_experts, rank, out_features, in_features, dtype, device, permuted=False):
    """(ExpertLora, its leaf tensors): random A and B (never peft's zero B). permuted=True returns views like peft's
    reshaped Linear weights."""
    from fastmoe.kernels.moe import ExpertLora

    if permuted:
        a_base = torch.randn(num_experts, in_features, rank, dtype=dtype, device=device) / in_features**0.5
        b_base = torch.randn(rank, num_experts, out_features, dtype=dtype, device=device) / rank**0.5
        a_base.requires_grad_(), b_base.requires_grad_()
        return ExpertLora(a_base.transpose(1, 2), b_base.permute(1, 2, 0), 0.5), [a_base, b_base]
    a = (torch.randn(num_experts, rank, in_features, dtype=dtype, device=device) / in_features**0.5).requires_grad_()
    b = (torch.randn(num_experts, out_features, rank, dtype=dtype, device=device) / rank**0.5).requires_grad_()
    return ExpertLora(a, b, 0.5), [a, b]


def output_and_grads(fn, args, params, upstream_seed=1):
    """fn(*args) and the gradients of `params` under a random upstream gradient."""
    out = fn(*args)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(out)
    return out, torch.autograd.grad(out, params, upstream)


def check_against_reference(fn, args, params, tol):
    """fn's kernels against its PyTorch reference (reference_only) on the same inputs, forward and backward."""
    from fastmoe.kernels import reference_only

    out, grads = output_and_grads(fn, args, params)
    with reference_only():
        ref, ref_grads = output_and_grads(fn, args, params)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.shape == ref_grad.shape
        assert rel_err(grad, ref_grad) < tol


def count_expert_products(monkeypatch) -> list:
    """The weight shapes of the expert GEMMs' base products that torch's grouped GEMM computes from now on
    (grouped_gemm.expert_product's calls), appended as they happen, whichever thread autograd runs them on."""
    from fastmoe.kernels.moe import grouped_gemm

    calls = []
    product = grouped_gemm.expert_product

    def counted(*call_args, **call_kwargs):
        calls.append(call_args[1].shape)
        return product(*call_args, **call_kwargs)

    monkeypatch.setattr(grouped_gemm, "expert_product", counted)
    return calls


def check_torch_products_against_reference(fn, args, params, tol, monkeypatch, products: int = 4):
    """check_against_reference with the expert GEMMs' base products by torch's grouped GEMM (base_products("torch")),
    and the number of them that took that way."""
    from fastmoe.kernels.moe import grouped_gemm

    calls = count_expert_products(monkeypatch)
    with grouped_gemm.base_products("torch"):
        check_against_reference(fn, args, params, tol)
    assert len(calls) == products


def assert_packed_documents_train_as_if_alone(model, config, lengths: list[int], seed: int = 7,
                                              **packed_kwargs) -> None:
    """Random documents of these lengths packed in one row (position_ids restarting at each, no attention mask,
    labels -100 at each document's first token) give each document the logits, and the summed loss and LoRA
    gradients, that it gets alone, within fp32_model_tolerance. packed_kwargs go to the packed forwards."""
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(3, config.vocab_size, (1, n), generator=generator) for n in lengths]
    packed = torch.cat(documents, 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = packed.clone()
    labels[0, torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)] = -100  # no document predicts its first token
    targets = [n - 1 for n in lengths]

    def lora_gradients() -> dict[str, torch.Tensor]:
        return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    with torch.no_grad():
        packed_logits = model(input_ids=packed, position_ids=position_ids, **packed_kwargs).logits
    packed_loss = model(input_ids=packed, position_ids=position_ids, labels=labels, **packed_kwargs).loss * sum(targets)
    packed_loss.backward()
    packed_grads = lora_gradients()

    model.zero_grad()
    alone_logits, alone_loss = [], 0.0
    for document, count in zip(documents, targets):
        with torch.no_grad():
            alone_logits.append(model(input_ids=document).logits)
        if count:
            loss = model(input_ids=document, labels=document).loss * count
            loss.backward()
            alone_loss = alone_loss + loss.detach()
    alone_grads = lora_gradients()

    tolerance = fp32_model_tolerance(config, 1, sum(lengths))
    assert rel_err(packed_logits, torch.cat(alone_logits, 1)) < tolerance
    assert rel_err(packed_loss, alone_loss) < tolerance
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        assert rel_err(grad, alone_grads[name]) < tolerance, name


def attention_kernel_caller(model_type: str, kernel_name: str):
    """The module whose global `kernel_name` (a flash attention function) a family's attention forward calls, for
    tests that put a stand-in there: the family's own module, or fastmoe.models.shared for the families whose
    attention ends in shared.attend."""
    import importlib

    from fastmoe.models import shared

    family_module = importlib.import_module(f"fastmoe.models.{model_type}")
    return family_module if hasattr(family_module, kernel_name) else shared
