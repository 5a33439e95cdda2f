"""What the benchmark scripts share; they import this module and never each other.

* Records: every measurement is one JSON line appended to benchmarks/results.jsonl, with the environment it was taken
  in (`environment`: date, run id, GPU, library versions, command line) and a `question` naming the table of
  benchmarks/RESULTS.md it answers (`python benchmarks/report.py` writes that page from the records).
* Timing: triton.testing.do_bench medians (L2 flushed between calls), CUDA-graph replays, eager launches, peak memory
  above what was allocated before a call, and the bf16 matmul peak measured on the device in use (the MFU yardstick).
* Models: real shapes (`PRESETS`), built on the meta device and given random weights on the device they train on
  (`build_random_model`; routers random with O(1) logits, since transformers zero-initialises some), the family's
  LoRA targets, and the training-step variants (`TrainStepVariant`) as data.
* FLOPs: `step_flops` counts what a LoRA step must compute; torch.profiler kernel intervals give `gpu_activity`.

GPU-only helpers import triton lazily, so that the CPU smoke runs of the scripts work without a GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_JSONL = HERE / "results.jsonl"
NO_RECORD_HELP = "print only; append nothing to the JSON lines"

# --------------------------------------------------------------------------------------------------------------------
# Environment and records

_VERSIONED = ("torch", "transformers", "peft", "trl", "triton", "accelerate", "datasets", "bitsandbytes")


def versions() -> dict[str, str]:
    """Python and the installed versions of the libraries a measurement depends on (those that are installed)."""
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    found["torch"] = torch.__version__  # the local build tag (+cu130) that the wheel's metadata may leave out
    return found


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def now_utc() -> str:
    """'YYYY-MM-DD HH:MM UTC': sorts as text, which report.py relies on for 'newest'."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def environment(device: str, argv: list[str] | None = None, command: str | None = None) -> dict:
    """The fields every record of this process shares. `run` is FASTMOE_BENCH_RUN when set (gpu_session.sh gives
    all its processes one id, so that a session's records can be picked out), else this process's start time."""
    argv = sys.argv if argv is None else argv
    if command is None:
        command = shlex.join(["python", f"benchmarks/{Path(argv[0]).name}", *argv[1:]])
    return {
        "date": now_utc(),
        "run": os.environ.get("FASTMOE_BENCH_RUN")
        or f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}",
        "gpu": device_name(device),
        "versions": versions(),
        "command": command,
    }


def append_record(record: dict, path: str | Path = RESULTS_JSONL) -> None:
    """One measurement as one JSON line. NaN is not JSON: missing figures are None."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")


def load_records(path: str | Path = RESULTS_JSONL) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def rounded(value: float | None, digits: int = 3) -> float | None:
    """For records: None stays None (a figure not measured here, e.g. time on the CPU)."""
    return None if value is None or value != value else round(value, digits)


# --------------------------------------------------------------------------------------------------------------------
# Timing and memory


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Give cached blocks back after a model is dropped, so the next measurement starts from an empty allocator."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_ms(fn: Callable[[], object], warmup: int = 10, rep: int = 50,
             grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds of fn() launched from Python (do_bench flushes L2 between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def bench_graph_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of GPU time, fn() replayed from a CUDA graph: Python and autograd launch overhead (tens of
    microseconds per op, comparable to small kernels) is left out."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def fwd_bwd(fn: Callable[..., object], inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], object]:
    """Forward then backward through fn(*inputs); autograd.grad, so no .grad accumulation is timed."""

    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads)

    return step


def peak_mib_above(fn: Callable[[], object]) -> float:
    """Peak allocated MiB during one fn() call, above what was allocated before it (CUDA)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(dtype: torch.dtype = torch.bfloat16) -> float:
    """GB/s of a 512 MiB device-to-device copy (bytes read + written)."""
    src = torch.empty(256 * 2**20, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_peak_tflops(device: str) -> float | None:
    """The bf16 matmul throughput this GPU reaches (8192^3, cuBLAS), measured now: the MFU denominator. Lent machines
    of one model differ by a few percent, so each run measures its own. None on the CPU."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def ms_and_peak_mib(fn: Callable[..., torch.Tensor], inputs: tuple, grad_out: torch.Tensor,
                    backward: bool) -> tuple[float, float]:
    """(median ms, peak MiB above the starting allocation) of fn(*inputs), with backward(grad_out) when asked."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        out = fn(*inputs)
        if backward:
            out.backward(grad_out)

    step()
    for t in leaves:
        t.grad = None
    peak = peak_mib_above(step)
    return bench_ms(step, grad_to_none=leaves), peak


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def gpu_activity(events: Iterable[tuple[str, int, int]]) -> tuple[int, int, int]:
    """(nanoseconds the GPU was busy, kernels launched, nanoseconds from the first busy interval's start to the last
    one's end) from profiler activities (activity type, start ns, end ns).

    Busy time is the union of kernel, memcpy and memset intervals, so work overlapping on two streams (fastmoe's
    offloaded checkpointing copies on a side stream) counts once."""
    intervals, kernels = [], 0
    for kind, start, end in events:
        if kind == "kernel":
            kernels += 1
        if kind in ("kernel", "gpu_memcpy", "gpu_memset"):
            intervals.append((start, end))
    busy, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    span = reach - min(start for start, _ in intervals) if intervals else 0
    return busy, kernels, span


def _activity_type(event) -> str:
    if hasattr(event, "activity_type"):
        return event.activity_type()  # kineto's category: kernel, gpu_memcpy, gpu_memset, cuda_runtime, cpu_op, ...
    # A torch without it: device-side events carry the device, and CUPTI names copies and sets Memcpy / Memset.
    if event.device_type() == torch.autograd.DeviceType.CPU:
        return "cpu"
    name = event.name()
    return "gpu_memcpy" if name.startswith("Memcpy") else "gpu_memset" if name.startswith("Memset") else "kernel"


def profiler_activities(profiler) -> list[tuple[str, int, int]]:
    """(activity type, start ns, end ns) of every event a finished torch.profiler.profile recorded."""
    return [(_activity_type(event), event.start_ns(), event.end_ns())
            for event in profiler.profiler.kineto_results.events()]


def profiler_kernels(profiler) -> list[tuple[str, int]]:
    """(name, duration ns) of every GPU kernel a finished torch.profiler.profile recorded."""
    return [(event.name(), event.end_ns() - event.start_ns())
            for event in profiler.profiler.kineto_results.events() if _activity_type(event) == "kernel"]


def top_kernels(kernels: Iterable[tuple[str, int]], steps: int, rows: int = 12) -> list[tuple[str, float, float]]:
    """The kernels that took the most GPU time, by name: (name cut to 90 characters, ms per step, launches per step),
    longest first: where a step's GPU time goes."""
    totals: dict[str, list[int]] = {}
    for name, ns in kernels:
        total = totals.setdefault(name, [0, 0])
        total[0] += ns
        total[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:rows]
    return [(name[:90], round(ns / 1e6 / steps, 3), round(count / steps, 1)) for name, (ns, count) in ranked]


# --------------------------------------------------------------------------------------------------------------------
# Model shapes

# MoE blocks at real shapes (bench_moe_block.py, bench_nf4_experts.py): name, hidden, intermediate, experts, top_k.
MOE_SHAPES = [
    ("Trinity-Mini", 2048, 1024, 128, 8),
    ("LFM2-8B-A1B", 2048, 1792, 32, 4),
    ("JetMoe-8B", 2048, 5632, 8, 2),
    ("Qwen3-30B-A3B", 2048, 768, 128, 8),
    ("Mixtral-8x7B", 4096, 14336, 8, 2),
]


def moe_routing(num_tokens: int, num_experts: int, top_k: int, kind: str, device: str):
    """(index, weights), each (tokens, top_k): random router logits ("balanced") or with an exponentially decaying
    preference ("skewed": the first ~E/8 experts receive most of the tokens)."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, device=device, generator=gen)
    if kind == "skewed":
        logits = logits + 4.0 * torch.exp(-torch.arange(num_experts, device=device) / max(1, num_experts / 8))
    top_logits, index = logits.topk(top_k, dim=-1)
    return index, torch.softmax(top_logits, dim=-1)


def random_expert_stacks(device: str, hidden: int, inter: int, num_experts: int, nf4: bool = False,
                         rank: int = 16) -> tuple:
    """(gate_up (E, 2I, H), down (E, H, I), gate_up's ExpertLora, down's ExpertLora): random bf16 expert stacks scaled
    to unit-variance outputs, or NF4 as load_in_4bit stores them (double-quantized absmax), and float32 LoRA factors
    of rank `rank` (scale 0.01, scaling 1), as the decode and kernel benchmarks take them."""
    from fastmoe.kernels.moe import ExpertLora, quantize_nf4

    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16) * hidden ** -0.5
    down = torch.randn(num_experts, hidden, inter, device=device, dtype=torch.bfloat16) * inter ** -0.5
    if nf4:
        gate_up, down = quantize_nf4(gate_up, double_quant=True), quantize_nf4(down, double_quant=True)
    gu_lora = ExpertLora(A=torch.randn(num_experts, rank, hidden, device=device) * 0.01,
                         B=torch.randn(num_experts, 2 * inter, rank, device=device) * 0.01, scaling=1.0)
    dn_lora = ExpertLora(A=torch.randn(num_experts, rank, inter, device=device) * 0.01,
                         B=torch.randn(num_experts, hidden, rank, device=device) * 0.01, scaling=1.0)
    return gate_up, down, gu_lora, dn_lora


# LFM2-8B-A1B interleaves 18 gated short-convolution layers with 6 attention layers.
_LFM2_ATTENTION_LAYERS = {2, 6, 10, 14, 18, 21}

PRESETS: dict[str, dict] = {
    # Trinity-Mini: 26B total, 128 experts top-8, 1 shared expert, 2 dense layers, vocab 200,192.
    "trinity-mini": dict(model_type="afmoe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=1024,
                         num_hidden_layers=32, num_dense_layers=2, num_attention_heads=32, num_key_value_heads=4,
                         head_dim=128, num_experts=128, num_experts_per_tok=8, num_shared_experts=1,
                         vocab_size=200192, global_attn_every_n_layers=4, sliding_window=2048,
                         max_position_embeddings=8192, tie_word_embeddings=False),
    # LFM2-8B-A1B (config.json): 8.3B total, 1.5B active; 32 experts top-4, 2 dense layers, tied embeddings.
    "lfm2-8b-a1b": dict(model_type="lfm2_moe", hidden_size=2048, intermediate_size=7168, moe_intermediate_size=1792,
                        num_hidden_layers=24, num_dense_layers=2, num_attention_heads=32, num_key_value_heads=8,
                        num_experts=32, num_experts_per_tok=4, vocab_size=65536, max_position_embeddings=128000,
                        layer_types=["full_attention" if i in _LFM2_ATTENTION_LAYERS else "conv" for i in range(24)],
                        tie_word_embeddings=True),
    # JetMoe-8B (config.json): 8B total, 2.2B active; 8 attention experts and 8 MLP experts per layer, top-2;
    # 16 kv heads of 128, so 32 query heads per token.
    "jetmoe-8b": dict(model_type="jetmoe", hidden_size=2048, num_hidden_layers=24, num_key_value_heads=16,
                      kv_channels=128, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Command R (c4ai-command-r-v01): 40 layers of hidden 8192, 64 heads (no GQA), MLP 22528, vocab 256,000, tied
    # embeddings, logit_scale 0.0625. 8 of the 40 layers: 8.7B parameters.
    "command-r-layers": dict(model_type="cohere", hidden_size=8192, intermediate_size=22528, num_hidden_layers=8,
                             num_attention_heads=64, num_key_value_heads=64, vocab_size=256000, logit_scale=0.0625,
                             use_qk_norm=False, max_position_embeddings=8192, tie_word_embeddings=True),
    # Aya Expanse 8B (CohereForAI/aya-expanse-8b config.json): Cohere's architecture at 32 layers of hidden 4096,
    # 32 query / 8 kv heads, MLP 14336, vocab 256,000, tied embeddings, logit_scale 0.125: 8.0B, whole.
    "aya-expanse-8b": dict(model_type="cohere", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=256000, logit_scale=0.125,
                           use_qk_norm=False, max_position_embeddings=8192, tie_word_embeddings=True),
    # Qwen3-30B-A3B (config.json): 48 layers of hidden 2048, 128 experts of 768 top-8 (renormalised), no shared or
    # dense MLP layers, 32 query / 4 kv heads of 128 with QK norm, vocab 151,936: 30.5B total, 3.3B active
    # (with the input embedding, which active_params leaves out as a lookup).
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
                          rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Mixtral-8x7B (config.json): 32 layers of hidden 4096, 8 experts of 14336 top-2, 32 query / 8 kv heads, vocab
    # 32,000, no sliding window: 46.7B total, 12.9B active (with the input embedding).
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
                         rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Qwen1.5-MoE-A2.7B (config.json): 24 layers of hidden 2048, 60 experts of 1408 top-4 (not renormalised) beside a
    # shared expert of 5632 behind a sigmoid gate, 16 heads with biased q/k/v, vocab 151,936: 14.3B total, 2.7B
    # active (with the input embedding).
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                              max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
                              tie_word_embeddings=False),
    # gpt-oss-20b (config.json): 24 layers of hidden 2880, 32 experts of 2880 top-4 with biases and the clamped
    # SwiGLU, 64 query / 8 kv heads of 64 with sinks and biased projections, sliding-window (128) and full layers
    # alternating, YaRN RoPE (the config's defaults), vocab 201,088. The benchmarks build it at random in 16 bits (as
    # the MXFP4 checkpoint loads dequantized); in 4 bits, from such a 16-bit checkpoint.
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, vocab_size=201088, sliding_window=128, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, swiglu_limit=7.0, attention_bias=True, tie_word_embeddings=False),
    "gpt-oss-tiny": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                         num_experts_per_tok=2, vocab_size=500, sliding_window=16, max_position_embeddings=512,
                         rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0,
                                              beta_slow=1.0, truncate=False, original_max_position_embeddings=64),
                         tie_word_embeddings=False),
    "qwen2-moe-tiny": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           shared_expert_intermediate_size=48, num_hidden_layers=3, mlp_only_layers=[0],
                           num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                           vocab_size=500, max_position_embeddings=512, tie_word_embeddings=False),
    "mixtral-tiny": dict(model_type="mixtral", hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         vocab_size=500, max_position_embeddings=512, sliding_window=16, tie_word_embeddings=False),
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=3, mlp_only_layers=[0], num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, vocab_size=500,
                           max_position_embeddings=512, tie_word_embeddings=False),
    "afmoe-tiny": dict(model_type="afmoe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                       num_hidden_layers=3, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, vocab_size=500,
                       global_attn_every_n_layers=2, sliding_window=16, max_position_embeddings=512,
                       tie_word_embeddings=False),
    "lfm2-tiny": dict(model_type="lfm2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=3, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=8, num_experts_per_tok=2, vocab_size=500, max_position_embeddings=512,
                      layer_types=["conv", "full_attention", "conv"], tie_word_embeddings=True),
    "jetmoe-tiny": dict(model_type="jetmoe", hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                        kv_channels=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                        vocab_size=500, max_position_embeddings=512, tie_word_embeddings=True),
    "cohere-tiny": dict(model_type="cohere", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=500, logit_scale=0.0625,
                        use_qk_norm=False, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                        eos_token_id=2),
}
PRESETS["tiny"] = PRESETS["afmoe-tiny"]

# Families whose transformers experts module has the `experts_implementation` switch (eager / grouped_mm). JetMoe
# loops over its experts in its own modules, Cohere is dense.
GROUPED_MM_FAMILIES = {"afmoe", "lfm2_moe", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"}
LORA_RANK = 16
LORA_SEED = 3407  # FastModel.get_peft_model's default random_state

# LoRA on attention and the routed experts only (no dense or shared MLPs, no short convolutions): the targets of
# issue #16's measurement. JetMoe's attention heads are experts too (kv_proj, then each head's input/output
# experts), so its defaults are exactly this; Cohere is dense, so it keeps attention only.
ATTENTION_AND_EXPERT_TARGETS = {
    "afmoe": (("q_proj", "k_proj", "v_proj", "o_proj"), ("experts.gate_up_proj", "experts.down_proj")),
    "lfm2_moe": (("q_proj", "k_proj", "v_proj", "self_attn.out_proj"), ("experts.gate_up_proj", "experts.down_proj")),
    "jetmoe": (("kv_proj",), ("input_linear.weight", "output_linear.weight")),
    "cohere": (("q_proj", "k_proj", "v_proj", "o_proj"), ()),
    "qwen3_moe": (("q_proj", "k_proj", "v_proj", "o_proj"), ("experts.gate_up_proj", "experts.down_proj")),
    "mixtral": (("q_proj", "k_proj", "v_proj", "o_proj"), ("experts.gate_up_proj", "experts.down_proj")),
    "qwen2_moe": (("q_proj", "k_proj", "v_proj", "o_proj"), ("experts.gate_up_proj", "experts.down_proj")),
    "gpt_oss": (("q_proj", "k_proj", "v_proj", "o_proj"), ("experts.gate_up_proj", "experts.down_proj")),
}
LORA_TARGET_SETS = ("default", "attention-experts", "attention", "default-without-experts")


def make_config(config_kwargs: dict):
    """A preset (model_type plus config fields) as its transformers config."""
    import transformers

    kwargs = dict(config_kwargs)
    return transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def with_layers(config_kwargs: dict, layers: int | None) -> dict:
    """The preset with `layers` layers (None: as it is); a layer_types pattern is cut short or repeated to match."""
    if not layers:
        return dict(config_kwargs)
    kwargs = dict(config_kwargs, num_hidden_layers=layers)
    if "layer_types" in kwargs:
        pattern = kwargs["layer_types"]
        kwargs["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    return kwargs


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x4096,4x2048" -> [(1, 4096), (4, 2048)] as (batch, sequence length)."""
    shapes = []
    for item in text.split(","):
        batch, _, seq = item.strip().lower().partition("x")
        if not (batch.isdigit() and seq.isdigit()):
            raise ValueError(f"shape {item.strip()!r} is not BATCHxSEQ (e.g. 1x4096)")
        shapes.append((int(batch), int(seq)))
    return shapes


def family(model_type: str):
    """fastmoe's class for a model type (its patches, its default LoRA targets): the one place the benchmarks reach
    into the package's family registry."""
    from fastmoe.api import family_model

    return family_model(model_type)


def op_names(model_type: str) -> tuple[str, ...]:
    """The fastmoe ops a model type's family patches, shared ones included (what fast_ops switches)."""
    from fastmoe.models import op_names as family_op_names

    return family_op_names(model_type)


def lora_targets(model_type: str, which: str = "default") -> dict:
    """target_modules and target_parameters of a LoRA target set: "default" is the family's own (what
    FastModel.get_peft_model adapts when given no targets), "attention-experts" attention and routed experts,
    "attention" the attention projections alone (Unsloth's Qwen3-MoE QLoRA memory figure is for those),
    "default-without-experts" the family's own modules without its expert parameters (what the experts' LoRA costs)."""
    if which == "attention-experts":
        modules, parameters = ATTENTION_AND_EXPERT_TARGETS[model_type]
    elif which == "attention":
        modules, parameters = ATTENTION_AND_EXPERT_TARGETS[model_type][0], ()
    elif which in ("default", "default-without-experts"):
        fast = family(model_type)
        modules = fast.default_target_modules
        parameters = fast.default_target_parameters if which == "default" else ()
    else:
        raise ValueError(f"LoRA target set {which!r} is not one of {', '.join(LORA_TARGET_SETS)}")
    return dict(target_modules=list(modules), target_parameters=list(parameters) or None)


# --------------------------------------------------------------------------------------------------------------------
# Random weights on the device


def _is_router_weight(name: str) -> bool:
    # AFMoE mlp.router.gate, LFM2-MoE feed_forward.gate, JetMoe (mlp and attention) router.layer.
    return name.endswith(("router.gate.weight", "router.layer.weight", "feed_forward.gate.weight"))


def _skew(num_experts: int, device) -> torch.Tensor:
    """A selection preference decaying over the expert index: the first ~E/8 experts take most tokens."""
    return torch.exp(-torch.arange(num_experts, device=device, dtype=torch.float32) / max(1.0, num_experts / 8))


@torch.no_grad()
def initialise(model: torch.nn.Module, skewed: bool = False, seed: int = 0, config=None) -> None:
    """Random weights drawn on the model's device (to_empty leaves memory uninitialised); routers random (transformers
    zero-initialises some), scaled so that router logits are O(1) as in a trained model. `skewed` biases routing
    towards the first experts (the worst case for load balance). `config`: the model's, for a part of a model (a
    decoder layer) that has none of its own."""
    config = config or model.config
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    hidden = config.hidden_size
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("inv_freq", "original_inv_freq")):
            continue
        if name.endswith("expert_bias"):
            # AFMoE and LFM2-MoE add it to the sigmoid scores for choosing experts only: a bias of order one
            # outweighs the scores' spread.
            tensor.copy_(_skew(tensor.numel(), tensor.device) if skewed else torch.zeros_like(tensor))
        elif "norm" in name:
            tensor.fill_(1.0)
        elif name.endswith("bias"):
            tensor.zero_()
        elif _is_router_weight(name):
            tensor.normal_(0.0, hidden**-0.5, generator=generator)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
    if skewed and config.model_type == "jetmoe":
        # JetMoe's routers have no expert bias: give their linear layer a logit bias (both transformers' gating
        # and fastmoe's call that layer as a module, so both see it).
        for module in model.modules():
            if type(module).__name__ == "JetMoeTopKGating":
                layer = module.layer
                layer.bias = torch.nn.Parameter(4.0 * _skew(layer.out_features, layer.weight.device).to(
                    layer.weight.dtype), requires_grad=False)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            fresh = type(module)(config=module.config)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)


def build_random_model(config, device: str, dtype: torch.dtype, skewed: bool = False, seed: int = 0):
    """The causal LM of `config` with random frozen weights, built on the meta device and materialised directly on
    `device` (a 26B model is never initialised on the CPU). Patch first if fastmoe's forwards are wanted: patches
    act on the classes, so they apply to this model as to a loaded one."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    initialise(model, skewed, seed)
    model.requires_grad_(False)
    return model


def linear_layers_to_4bit_(layer: torch.nn.Module, compute_dtype: torch.dtype, keep: tuple[str, ...]) -> None:
    """Replace the layer's nn.Linear modules by bitsandbytes NF4 Linear4bit quantized where they are, with
    load_in_4bit's settings (double quantization, compute in the model's dtype); those whose names end with one of
    `keep` (the family's routers, which load_in_4bit leaves 16-bit) stay."""
    import bitsandbytes as bnb

    for name, linear in list(layer.named_modules()):
        if type(linear) is not torch.nn.Linear or name.endswith(keep):
            continue
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=quantized).to(linear.weight.device)
        if linear.bias is not None:
            quantized.bias = linear.bias
        layer.set_submodule(name, quantized)


def build_fastmoe_4bit(config_kwargs: dict, device: str, dtype: torch.dtype, skewed: bool = False):
    """The model as fastmoe's load_in_4bit leaves it, without its 16-bit self ever existing: built on the meta device,
    then materialised one decoder layer at a time (random weights, Linear layers but the routers to bitsandbytes NF4,
    expert stacks to fastmoe's NF4, both with double-quantized absmax), so memory holds the 4-bit layers so far plus
    one 16-bit layer (Mixtral-8x7B's 32 layers: 90 GB of 16-bit experts, never at once). Embeddings, lm_head, norms
    and routers stay 16-bit. Every family whose decoder layers are `model.model.layers`. On the CPU bitsandbytes uses
    its CPU backend (bitsandbytes >= 0.46)."""
    import transformers

    from fastmoe import models
    from fastmoe.models.shared import EXPERTS_IMPLEMENTATION
    from fastmoe.quantize import quantize_experts_

    config = make_config(config_kwargs)
    described = models.family(config.model_type)
    if described is None or not described.routed_experts:
        raise ValueError(f"fastmoe has no NF4 experts for {config.model_type}: build it 16-bit")
    family(config.model_type).pre_patch()
    config._experts_implementation = EXPERTS_IMPLEMENTATION  # NF4 experts run in fastmoe's kernel only
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        layer.to_empty(device=device)
        initialise(layer, skewed, seed=index + 1, config=config)
        linear_layers_to_4bit_(layer, dtype, keep=described.routers)
        quantize_experts_(layer, double_quant=True, family=described)  # as load_in_4bit (double quantization)
    # Everything outside the decoder layers (embeddings, final norm, rotary tables, lm_head), named by its path so
    # that initialise recognises norms, then tied as from_pretrained ties it.
    in_layers = {id(module) for module in layers.modules()}
    outside = torch.nn.ModuleDict({
        name.replace(".", "_"): module for name, module in model.named_modules()
        if id(module) not in in_layers and any(t.is_meta for t in [*module.parameters(recurse=False),
                                                                   *module.buffers(recurse=False)])})
    for module in outside.values():
        module.to_empty(device=device, recurse=False)
    model.tie_weights()
    initialise(outside, skewed, seed=0, config=config)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its 4-bit LoRA
    return model


# --------------------------------------------------------------------------------------------------------------------
# Training-step variants (bench_train_step.py, quality_run.py, profile_train_step.py)


@dataclasses.dataclass(frozen=True)
class TrainStepVariant:
    """How a plain-loop training step builds and trains its model. Every field is recorded with the measurement."""

    implementation: str = "fastmoe"  # "fastmoe" (patched forwards) or "transformers" (+ peft)
    experts: str = "eager"  # transformers' experts_implementation ("eager" or "grouped_mm"; fastmoe swaps both)
    checkpointing: str = "standard"  # "standard" (transformers'), "off", or "offload" (fastmoe's, inputs on the host)
    quantization: str | None = None  # None, or "4bit": NF4 Linear layers (bitsandbytes) and experts (fastmoe)
    attention: str = "sdpa"  # transformers' attn_implementation: "sdpa" or "flex_attention"
    sliding_window: str = "flash"  # fastmoe's AFMoE sliding layers: "flash" (with the window) or "dense-mask" (SDPA)
    optimizer: str = "adamw_torch_fused"  # Trainer's default, or "adamw_8bit" (bitsandbytes, the usual QLoRA choice)


TRAIN_STEP_VARIANTS: dict[str, TrainStepVariant] = {
    "hf-eager": TrainStepVariant("transformers", experts="eager"),
    "hf-grouped_mm": TrainStepVariant("transformers", experts="grouped_mm"),
    "fastmoe": TrainStepVariant(),
    "fastmoe-no-ckpt": TrainStepVariant(checkpointing="off"),
    "fastmoe-offload": TrainStepVariant(checkpointing="offload"),
    "fastmoe-flex": TrainStepVariant(attention="flex_attention"),
    "fastmoe-dense-mask": TrainStepVariant(sliding_window="dense-mask"),
    "fastmoe-4bit": TrainStepVariant(quantization="4bit"),
    "fastmoe-4bit-adamw8bit": TrainStepVariant(quantization="4bit", optimizer="adamw_8bit"),
}


def resolve_variant_name(name: str, model_type: str) -> str | None:
    """`hf` is the fastest transformers path the family has; None for a variant the family does not have."""
    if name == "hf":
        return "hf-grouped_mm" if model_type in GROUPED_MM_FAMILIES else "hf-eager"
    if name not in TRAIN_STEP_VARIANTS:
        raise ValueError(f"unknown variant {name!r}: choose from hf, {', '.join(TRAIN_STEP_VARIANTS)}")
    if TRAIN_STEP_VARIANTS[name].experts == "grouped_mm" and model_type not in GROUPED_MM_FAMILIES:
        return None
    return name


def variant_label(variant: TrainStepVariant) -> str:
    """The table's name for a variant, or the nearest one plus the fields that differ from it."""
    nearest, fewest = "fastmoe", None
    for name, named in TRAIN_STEP_VARIANTS.items():
        differ = [f for f in dataclasses.fields(variant) if getattr(variant, f.name) != getattr(named, f.name)]
        if fewest is None or len(differ) < len(fewest):
            nearest, fewest = name, differ
    if not fewest:
        return nearest
    return nearest + " (" + ", ".join(f"{f.name}={getattr(variant, f.name)}" for f in fewest) + ")"


def build_lora_model(variant: TrainStepVariant, config_kwargs: dict, device: str, dtype: torch.dtype,
                     skewed: bool = False, targets: str = "default"):
    """The preset's model on `device`, random weights, wrapped in a LoRA r=16 adapter on `targets`, trainable."""
    from peft import LoraConfig, get_peft_model

    import fastmoe
    from fastmoe import FastModel
    from fastmoe.models import afmoe
    from fastmoe.models.shared import EXPERTS_IMPLEMENTATION
    from fastmoe.sliding_window_attention import can_use_flash_sliding_window

    fastmoe.unpatch()
    model_type = config_kwargs["model_type"]
    lora = dict(r=LORA_RANK, lora_alpha=LORA_RANK, **lora_targets(model_type, targets))
    # AFMoE's sliding layers through SDPA over transformers' dense mask, as before fastmoe gave them the flash kernel
    # with the window; set for every variant, so that a previous variant's choice never carries over.
    afmoe.can_use_flash_sliding_window = (
        (lambda query, key: False) if variant.sliding_window == "dense-mask" else can_use_flash_sliding_window)
    if variant.quantization == "4bit":
        model = build_fastmoe_4bit(config_kwargs, device, dtype, skewed)
    else:
        if variant.implementation == "fastmoe":
            family(model_type).pre_patch()
        config = make_config(config_kwargs)
        # fastmoe's experts kernel is an experts implementation of its own ("fastmoe", as FastModel.from_pretrained
        # loads it); a fastmoe variant configured with another would run transformers' experts in fastmoe's MoE forward.
        config._experts_implementation = (variant.experts if variant.implementation == "transformers"
                                          else EXPERTS_IMPLEMENTATION)
        config._attn_implementation = variant.attention
        model = build_random_model(config, device, dtype, skewed)
    if variant.implementation == "fastmoe":
        model.max_seq_length = 1 << 20  # FastModel.from_pretrained sets it; nothing here depends on it
        checkpointing = {"standard": True, "off": False, "offload": "fastmoe"}[variant.checkpointing]
        return FastModel.get_peft_model(model, use_gradient_checkpointing=checkpointing, random_state=LORA_SEED,
                                        **lora)
    if variant.checkpointing != "off" and model.supports_gradient_checkpointing:  # as FastModel.get_peft_model does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(LORA_SEED)  # the LoRA A matrices as FastModel.get_peft_model draws them
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))


def make_optimizer(model: torch.nn.Module, variant: TrainStepVariant, device: str) -> torch.optim.Optimizer:
    """AdamW on the adapters: fused on the GPU, transformers Trainer's default (optim="adamw_torch_fused"), or
    bitsandbytes' AdamW with 8-bit states, what optim="adamw_8bit" gives."""
    params = [p for p in model.parameters() if p.requires_grad]
    if variant.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW(params, lr=1e-4, optim_bits=8)
    return torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")


# --------------------------------------------------------------------------------------------------------------------
# FLOPs


def active_params(model: torch.nn.Module) -> int:
    """Weights one token is multiplied by: dense weights, experts at top_k / num_experts, the lm_head once (tied
    or not); the input embedding is a lookup. Works on a meta-device model."""
    top_k = getattr(model.config, "num_experts_per_tok", None)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = head.numel()
    for module in model.modules():
        is_experts = "Experts" in type(module).__name__  # AfmoeExperts, Lfm2MoeExperts, JetMoeParallelExperts
        for param in module.parameters(recurse=False):
            if param is embedding or param is head or param.dim() < 2:
                continue
            total += param.numel() * top_k // param.shape[0] if is_experts else param.numel()
    return total


def attention_flops(config, batch: int, seq: int) -> float:
    """Forward + backward FLOPs of QK^T and PV over the (query, key) pairs the masks keep, all layers: 4 x head_dim
    per pair and head forward, twice that backward."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "kv_channels", None) or config.hidden_size // heads
    window = min(getattr(config, "sliding_window", None) or seq, seq)
    pairs_per_type = {"full_attention": seq * (seq + 1) / 2,
                      "sliding_attention": window * (window + 1) / 2 + (seq - window) * window}
    pairs = sum(pairs_per_type.get(kind, 0) for kind in layer_types)  # conv layers have none
    return 12 * heads * head_dim * pairs * batch


def step_flops(config_kwargs: dict, batch: int, seq: int) -> float:
    """Model FLOPs of one LoRA training step: 4 x active parameters x tokens (forward 2N, input gradient 2N; frozen
    weights get no weight gradient, so the usual 6N would overstate LoRA) + attention_flops. Gradient checkpointing's
    recomputation and the adapters' own FLOPs are not counted: model FLOPs utilisation, not hardware utilisation."""
    import transformers

    config = make_config(config_kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return 4 * active_params(model) * batch * seq + attention_flops(config, batch, seq)


def weight_bytes(config_kwargs: dict, dtype: torch.dtype = torch.bfloat16, experts: bool = True) -> int:
    """Bytes of the model's weights in `dtype` (meta device: nothing allocated); without the routed experts' stacks
    (expert_stacks) unless `experts`."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(make_config(config_kwargs))
    unique = {id(p): p for p in model.parameters()}
    if not experts:
        for key in expert_stack_keys(model):
            unique.pop(id(model.get_parameter(key)))
    return sum(p.numel() for p in unique.values()) * torch.empty((), dtype=dtype).element_size()


def expert_stack_keys(model: torch.nn.Module) -> set[str]:
    """The parameter (state-dict) names of a transformers model's routed expert stacks: the 3D parameters that
    load_in_4bit holds in NF4 (fastmoe.quantize)."""
    from fastmoe.quantize import expert_stack_names, family_of

    family = family_of(model)
    return {f"{name}.{stack}" for name, module in model.named_modules()
            for stack in expert_stack_names(module, family)}
