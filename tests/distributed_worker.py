"""Run by tests/test_distributed.py as
`torchrun --nproc-per-node 2 tests/distributed_worker.py OUT_JSON lfm2_moe=CHECKPOINT afmoe=CHECKPOINT` (gloo, CPU):
fastmoe models wrapped the way accelerate wraps them for training, against the same model trained in one process on
the whole batch.

Cases (CASES):
    fsdp2-lora   LoRA (experts included) + gradient checkpointing on LFM2-MoE, sharded by accelerate's own
                 `fsdp2_prepare_model`: one unit per decoder layer, then the tied embedding and head in one unit kept
                 gathered after its forward, then the root
    fsdp2-full   full fine-tuning of AFMoE, same sharding and checkpointing; its head is untied, in a unit of its own
                 with the final norm, and trained through fastmoe's fused loss, which reads the head's weight itself
    ddp-nf4      LoRA over NF4 experts (fastmoe.quantize) of LFM2-MoE in DDP, which broadcasts parameters and buffers
                 when built

accelerate's Accelerator runs FSDP on GPUs only (on the CPU it quietly picks DDP), so the FSDP2 cases call the function
it calls, with the few accelerator fields that function reads.

Each rank trains on its half of a global batch, scaling its loss as transformers' Trainer does (token sum over the
global token count, times the world size, so that the gradient averaging of DDP and FSDP gives the global batch's
gradient). Rank 0 also trains the unwrapped model on the whole batch and writes, per case, both runs' losses, the
largest relative gradient difference of the first step, what the expert kernels were handed, and whether the
adapter saved from the sharded model (through a full state dict, as the Trainer saves under FSDP2) equals the
reference's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastmoe.models.shared
from fastmoe import FastModel
from fastmoe.quantize import quantize_experts_
from testing_utils import batch_with_padding, randomize_lora, rel_err

STEPS = 3
CASES = {"fsdp2-lora": "lfm2_moe", "fsdp2-full": "afmoe", "ddp-nf4": "lfm2_moe"}


@contextlib.contextmanager
def recording_expert_inputs(seen: list):
    """Wrap the experts op the MoE forwards call, noting the type and shape of the expert weight and LoRA A handed
    to it: under FSDP2 they must be whole plain tensors, not DTensor shards."""
    original = fastmoe.models.shared.moe_experts

    def recording(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_lora=None, down_lora=None):
        lora_a = gate_up_lora.A if gate_up_lora is not None else None
        seen.append({"weight": type(gate_up_proj).__name__, "weight_shape": list(gate_up_proj.shape),
                     "lora_a": type(lora_a).__name__ if lora_a is not None else None})
        return original(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj,
                        gate_up_lora=gate_up_lora, down_lora=down_lora)

    fastmoe.models.shared.moe_experts = recording
    try:
        yield
    finally:
        fastmoe.models.shared.moe_experts = original


def build(checkpoint: str, case: str):
    full = case == "fsdp2-full"
    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64, full_finetuning=full)
    if case == "ddp-nf4":
        # What load_in_4bit does to the experts, without bitsandbytes' 4-bit Linear layers (its CPU backend is slow).
        quantize_experts_(model)
    if full:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    randomize_lora(model)
    return model


def shard_like_accelerate(model):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    # The Accelerator fields fsdp2_prepare_model reads (accelerate 1.16 added `device`, where ignored modules go).
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                  is_main_process=dist.get_rank() == 0, device=next(model.parameters()).device)
    return fsdp2_prepare_model(accelerator, model)


def train(model, batch: dict, num_items: int, world_size: int, learning_rate: float
          ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS AdamW steps on `batch`, this rank's share of a global batch with `num_items` label tokens, among
    `world_size` ranks training together (1: alone); returns the global batch's losses and the first step's
    gradients."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    losses, first_grads = [], {}
    for step in range(STEPS):
        loss = model(**batch, num_items_in_batch=num_items).loss * world_size
        loss.backward()
        global_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)
        if step == 0:
            for name, param in model.named_parameters():
                # AFMoE's expert_bias is a Parameter the loss never reaches (it only picks experts): no gradient.
                if param.grad is not None:
                    grad = param.grad
                    # A collective: every rank gathers every sharded gradient, in the same order.
                    first_grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, first_grads


def adapter_state(model) -> dict[str, torch.Tensor] | None:
    """The adapter tensors save_pretrained writes, via the full state dict accelerate gathers under FSDP2; None on
    ranks other than 0 (the gather is collective, the writing is rank 0's)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state_dict = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, state_dict=state_dict)
        return load_file(os.path.join(folder, "adapter_model.safetensors"))


def run_case(case: str, checkpoint: str) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build(checkpoint, case)
    whole = batch_with_padding(model.config.vocab_size, seed=3, batch=2 * world, seq=12)
    half = {key: value[2 * rank: 2 * rank + 2] for key, value in whole.items()}
    num_items = int((whole["labels"][:, 1:] != -100).sum())
    # Large enough for the later steps' losses to move visibly.
    learning_rate = 1e-3 if case == "fsdp2-full" else 1e-2
    seen: list = []
    if case.startswith("fsdp2"):
        model = shard_like_accelerate(model)
        experts = next(m for name, m in model.named_modules() if name.endswith(".experts"))
        # peft's ParamWrappers (LoRA) hold the experts module as their innermost base layer.
        stored = (experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts).gate_up_proj
        storage = {"type": type(stored).__name__, "local_shape": list(stored.to_local().shape),
                   "full_shape": list(stored.shape)}
    else:
        model = DistributedDataParallel(model)
        storage = None
    with recording_expert_inputs(seen):
        losses, grads = train(model, half, num_items, world, learning_rate)
    saved = adapter_state(model) if case == "fsdp2-lora" else None
    if isinstance(model, DistributedDataParallel):
        # DDP prefixes every name with "module."; the reference's names are the bare model's.
        grads = {name.removeprefix("module."): grad for name, grad in grads.items()}
    if rank != 0:
        return None

    torch.manual_seed(0)
    reference = build(checkpoint, case)
    reference_losses, reference_grads = train(reference, whole, num_items, 1, learning_rate)
    result = {
        "losses": losses, "reference_losses": reference_losses,
        "grad_names": sorted(grads), "reference_grad_names": sorted(reference_grads),
        "max_grad_rel_err": max(rel_err(grads[name], reference_grads[name]) for name in reference_grads),
        "expert_inputs": seen, "expert_storage": storage,
    }
    if saved is not None:
        with tempfile.TemporaryDirectory() as folder:
            from safetensors.torch import load_file

            reference.save_pretrained(folder)
            expected = load_file(os.path.join(folder, "adapter_model.safetensors"))
        result["saved_names"] = sorted(saved)
        result["expected_saved_names"] = sorted(expected)
        result["max_saved_rel_err"] = max(rel_err(saved[name], expected[name]) for name in expected)
    return result


def main() -> None:
    out_path = sys.argv[1]
    checkpoints = dict(argument.split("=", 1) for argument in sys.argv[2:])
    dist.init_process_group("gloo")
    results = {}
    for case, model_type in CASES.items():
        results[case] = run_case(case, checkpoints[model_type])
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
