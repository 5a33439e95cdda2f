"""The user's training step: fastmoe against transformers + peft through trl's SFTTrainer, as users run it.

One case is one (preset, layers, batch x seq, implementation, LoRA targets, logging_steps, quantization). For each:

1. The model. A random-weight checkpoint at the preset's real shapes (benchmarks/common.py PRESETS; routers random
   with O(1) logits) written with `save_pretrained`, with a small built-in tokenizer, then loaded as a user loads it:
   * fastmoe: `FastModel.from_pretrained(path, max_seq_length=seq)`, `FastModel.get_peft_model(model, r=16,
     lora_alpha=16, <targets>)` (gradient checkpointing on, its default);
   * transformers: `AutoModelForCausalLM.from_pretrained(path, dtype=bfloat16, experts_implementation="grouped_mm")`
     (the switch exists for AFMoE and LFM2-MoE only), gradient checkpointing enabled as FastModel.get_peft_model
     enables it (non-reentrant; not for JetMoe, which has none in transformers), `peft.get_peft_model` with the same
     LoraConfig (experts via `target_parameters`), the LoRA A matrices drawn from the same seed.
   Both load onto the GPU (`device_map={"": 0}`), where a user's default loads on the CPU and the Trainer then moves
   the model: the trained model is the same. With --quantization 4bit: fastmoe's `load_in_4bit=True` against
   transformers' own 4-bit (`BitsAndBytesConfig`, NF4, double quantization: Linear layers only).
   Targets (--targets): `default` is the family's own (what get_peft_model adapts given none), `attention-experts`
   attention and routed experts only (common.ATTENTION_AND_EXPERT_TARGETS: issue #16's measurement), `attention` the
   attention projections alone.

   --load direct skips the checkpoint: the same random model is built on the meta device and materialised on the GPU
   (common.build_random_model), after fastmoe's patches are applied as from_pretrained applies them (fastmoe) or with
   `experts_implementation="grouped_mm"` set on the config (transformers); then max_seq_length and the tokenizer are
   set as from_pretrained sets them and the same get_peft_model call follows. What differs from the user's path is the
   loading only (no safetensors read, no checkpoint-format conversion, weights never on the CPU); the training step
   is the same. --load auto (the default) writes a checkpoint when the 16-bit weights take at most
   --max-checkpoint-gb and the disk has room, else builds directly (Trinity-Mini's 32 layers: 52 GB). Checkpoints go
   to --checkpoint-dir, are reused by later processes, and one is kept at a time (lent GPU machines have little disk).
   --load checkpoint-without-experts writes every weight but the routed experts' stacks (fastmoe.quantize's
   expert_stack_names, what load_in_4bit turns into NF4), which from_pretrained then initialises as transformers
   initialises missing weights (normal, the config's initializer_range, as --load direct draws them) and, with
   load_in_4bit, quantizes right after loading: the user's loader and model, with a checkpoint a few GB in size for
   models whose 16-bit one does not fit the disk (Qwen3-30B-A3B's 48 layers: 61 GB). While it loads, the model's
   16-bit experts exist at once on the GPU (the quantized load of a full checkpoint holds one stack at a time); the
   trained model, and the memory and speed measured from the first step on, are those of a full checkpoint's load.
   Where even that does not fit (Mixtral-8x7B's 32 layers: 90 GB of 16-bit experts), --load direct with
   --quantization 4bit builds fastmoe's model as load_in_4bit leaves it one decoder layer at a time
   (common.build_fastmoe_4bit: the same modules, parameters and NF4 buffers; tests/test_benchmarks.py checks it);
   transformers' 4-bit has no such build (its bitsandbytes load keeps 3D experts 16-bit anyway).

2. The data: pre-tokenized random token ids, every row `seq` long, so every step has the same shape (no padding).
   With --data packed / padded and --documents N (issue #17's packed batches), each row's `seq` tokens are N
   documents of unequal lengths (the same lengths in every row): "packed" feeds each row as it is through trl's
   padding-free collator (position_ids restarting at each document, no attention mask), "padded" feeds the same
   documents one per row, padded to the longest; both take one row's documents per step, in order. tokens/s counts
   the documents' tokens, so the two compare directly; the FLOPs count attention within each document only.
   --varied-lengths draws each row's lengths anew, so that every step has a layout of its own, as real data has
   (whether fastmoe's layer graphs, captured at one step, replay at the next step's layout).
   --data examples is an SFT data set as users have it: every example its own document, of a length drawn
   log-uniformly between seq / 16 and seq (example_lengths), `batch` examples a step, in order, padded by trl's
   collator to the longest of the batch (fastmoe drops the padding, transformers computes it): every step another
   number of tokens, so whatever shapes fastmoe's layer graphs follow, the others run eager layers. tokens/s is then
   the timed steps' tokens over their time, and the FLOPs those of the mean step.

3. The trainer: `trl.SFTTrainer(model, processing_class=tokenizer, train_dataset, args=SFTConfig(...))` with trl's
   defaults (its fused LM head with the entropy and token-accuracy metrics, AdamW fused, lr schedule, grad clipping,
   the MoE router aux loss where the config asks for it), except: bf16 on the GPU (fp32 on the CPU), max_length=seq
   (trl's 1024 would cut the rows), the given logging_steps, no saving, no reports, no progress bar; the trainer's
   checkpointing flag stays at trl's default (on) except for JetMoe, whose transformers model has no checkpointing
   and makes the Trainer raise with it on.

   The allocator: a user's script imports fastmoe before it first uses CUDA, and the import sets the caching
   allocator to expandable segments unless the user chose a setting (fastmoe.allocator); a process of fastmoe cases
   only does the same before its first CUDA call. transformers' cases, and a process that mixes both, keep
   PyTorch's default. The record's alloc_conf says which a case ran with.

4. The measurements, by a TrainerCallback that marks every step's start on the GPU's stream with a CUDA event (a
   step is thus everything between two optimizer steps: data, forward, backward, clipping, AdamW, logging). The
   events are read after training: no sync per step, so the host runs ahead of the GPU as far as the Trainer and
   the model let it, as in a user's run (records from 2026-12-07 on, `timing: cuda-events`; before, the clock was
   read after a sync at every step's start, which drained the GPU at every step for both implementations);
   * tokens/s: batch x seq over the median of --steps timed steps after --warmup untimed ones (the mean too: with
     logging_steps=10 a logging step may not be the median). fastmoe captures a shape's layer graphs at its second
     step: when that falls in the timed steps the record says how many graphs were captured there
     (graphs_captured_while_timed), a warning says to raise --warmup, and RESULTS.md leaves the record out;
   * peak memory: torch.cuda.max_memory_allocated over the training run (peak_gb), and the footprint: the larger of
     the warm-up steps' peak and the timed steps' peak plus the free part of the CUDA graphs' private pools
     (footprint_gb). A replayed graph allocates nothing, so the memory its kernels work in, reserved in its pool,
     is never counted as allocated; the footprint counts it. The table's memory column is the footprint;
   * what stays allocated between steps (step_start_gb: weights, adapters, optimizer state, graph buffers) and the
     trainable parameter count;
   * GPU busy and kernels per step: torch.profiler (CUDA activity only) over --profile-steps steps after the timed
     ones: the union of kernel, memcpy and memset intervals over the span from the first such interval's start to
     the last one's end (the profiler starts after a sync, so the first step starts from a drained GPU, which no
     user's step does; with 2 or more steps the span holds the gaps between steps), and the number of kernels
     launched per step;
   * TFLOP/s and MFU: common.step_flops (4 x active parameters x tokens + attention over the (query, key) pairs the
     masks keep; not trl's compute_flops_per_token, which counts 3x the forward as for full fine-tuning and knows
     neither AFMoE's shared experts, dense layers and sliding windows nor JetMoe's attention experts) over the median
     step time, against the bf16 matmul peak measured in the same process (common.matmul_peak_tflops);
   * the first and last logged loss, entropy and token accuracy (both implementations should agree);
   * with --memory-profile 1 (and --trace-dir), what is live at the peak of one more step, by allocating site
     (memory_peak.py; fastmoe's graphed layers allocate nothing when replayed, so add --fastmoe-without-graphs).
   One JSON line per case goes to benchmarks/results.jsonl (question "sft"); the first table of RESULTS.md.

One case per process (the way gpu_session.sh runs it, each under its own time limit):

    python benchmarks/bench_sft.py --preset trinity-mini --shapes 1x4096 --implementations fastmoe
    python benchmarks/bench_sft.py --preset lfm2-8b-a1b --shapes 1x4096 --implementations transformers --load direct

Several cases in one process, run one after the other, memory freed between them, cases that would overrun
--budget-s (judged by the longest case so far) skipped:

    python benchmarks/bench_sft.py --preset lfm2-8b-a1b --shapes 1x4096,4x2048 --logging-steps 1,10 --budget-s 540
    python benchmarks/bench_sft.py --preset trinity-mini --layers 8 --shapes 1x8192 --data packed,padded --documents 16
    python benchmarks/bench_sft.py --preset trinity-mini --shapes 1x16384,1x32768,1x65536 --memory-limit-gb 24
    python benchmarks/bench_sft.py --preset mixtral-8x7b --layers 8 --implementations fastmoe \
        --fastmoe-base-products triton,torch    # where the expert GEMMs' base products are computed (ablation)
    python benchmarks/bench_sft.py --preset lfm2-8b-a1b --implementations fastmoe --logging-steps 1,10 \
        --fastmoe-without-ops trainer_step,trl_sft_metrics    # the host-side ops' share of the step (ablation)

CPU smoke run (tiny model, fp32, Triton kernels in the interpreter):

    TRITON_INTERPRET=1 python benchmarks/bench_sft.py --preset afmoe-tiny --shapes 1x32 --steps 2 --warmup 0 --no-record
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import common

IMPLEMENTATIONS = ("fastmoe", "transformers")
CHECKPOINT_MARK = ".fastmoe-bench-checkpoint"  # only folders carrying it are ever deleted


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: everything that decides what is trained and how."""

    preset: str
    layers: int
    batch: int
    seq: int
    implementation: str  # "fastmoe" or "transformers" (+ peft)
    targets: str = "default"  # common.LORA_TARGET_SETS
    logging_steps: int = 1
    quantization: str | None = None  # None or "4bit"
    # "checkpoint" (save_pretrained, then from_pretrained), "checkpoint-without-experts" (the same, its routed experts
    # initialised by from_pretrained) or "direct"
    load: str = "checkpoint"
    # fastmoe's get_peft_model(cuda_graphs=...): None is its default, the family's choice (graphed checkpointing for
    # MoE families, eager layers for dense Cohere: Family.graphed_layers); True graphed, False eager.
    cuda_graphs: bool | None = None
    # fastmoe's get_peft_model(use_gradient_checkpointing="fastmoe"): layer inputs kept in host memory (eager layers)
    offload: bool = False
    # "rows": every row one document of `seq` tokens. With `documents` > 1, each row's tokens are that many documents
    # of unequal lengths (document_lengths), fed "packed" (one row, position_ids restarting: trl's padding_free) or
    # "padded" (one document per row, padded to the longest). "examples": `batch` examples of varied lengths a step,
    # padded (example_lengths).
    data: str = "rows"
    documents: int = 1
    # With documents: the same lengths in every row (every step the same layout), or lengths drawn anew for each row
    # (every step a new layout, as real data has).
    varied: bool = False
    # fastmoe's 16-bit expert GEMMs: base products where fastmoe's rule puts them ("auto", the default), always
    # inside its Triton kernels ("triton") or always by torch's grouped GEMM ("torch"):
    # fastmoe.kernels.moe.grouped_gemm.base_products
    base_products: str = "auto"
    # fastmoe ops switched off (fastmoe.patch(model_type, op=False)), e.g. ("trainer_step", "trl_sft_metrics"): the
    # host-side ops' share of a step, measured against the default in the same run
    ops_off: tuple[str, ...] = ()
    # fastmoe's graphed checkpointing: how many hidden-state shapes run as graphs (None: its default,
    # fastmoe.graphed_checkpointing.MAX_GRAPH_SHAPES; beyond KEPT_ATTENTION_SHAPES they keep no attention outputs)
    graph_shapes: int | None = None
    # fastmoe's padding-free rows: how many of a run's first rows round coarser while the graphs' places fill (None:
    # its default, fastmoe.padding_free.COARSE_ROUNDING_ROWS; 0: a quarter octave from the first row)
    coarse_rounding_rows: int | None = None

    @property
    def config_kwargs(self) -> dict:
        return common.with_layers(common.PRESETS[self.preset], self.layers)

    def label(self) -> str:
        quant = f" {self.quantization}" if self.quantization else ""
        graphs = {None: "", True: " (cuda_graphs=True)", False: " (cuda_graphs=False)"}[self.cuda_graphs]
        eager = (" (offloaded checkpointing)" if self.offload else "") + graphs
        eager += "" if self.base_products == "auto" else f" (base products by {self.base_products})"
        eager += f" (without {', '.join(self.ops_off)})" if self.ops_off else ""
        eager += f" ({self.graph_shapes} graph shapes)" if self.graph_shapes else ""
        eager += (f" ({self.coarse_rounding_rows} rows rounded coarser)"
                  if self.coarse_rounding_rows is not None else "")
        varied = " varied" if self.varied else ""
        data = "" if self.data == "rows" else f" {self.documents}{varied} documents {self.data}"
        data = " examples of varied lengths" if self.data == "examples" else data
        return (f"{self.preset} {self.layers}L {self.batch}x{self.seq}{data} {self.implementation}{quant}{eager} "
                f"[targets={self.targets} logging_steps={self.logging_steps} load={self.load}]")


# --------------------------------------------------------------------------------------------------------------------
# Loading, as a user loads


def lora_kwargs(case: Case) -> dict:
    model_type = case.config_kwargs["model_type"]
    if case.targets == "default" and case.implementation == "fastmoe":
        # The user's call: no targets, so FastModel.get_peft_model takes the family's defaults that the model has
        # (Qwen3-30B-A3B has no dense MLPs); peft, handed the same list for the baseline, skips those too.
        return dict(r=common.LORA_RANK, lora_alpha=common.LORA_RANK)
    return dict(r=common.LORA_RANK, lora_alpha=common.LORA_RANK, **common.lora_targets(model_type, case.targets))


def builtin_tokenizer(max_length: int):
    """A small BPE tokenizer (the token ids fed in are random; the trainer needs its pad and eos tokens)."""
    from fastmoe.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def ensure_checkpoint(case: Case, root: Path, device: str, dtype: torch.dtype, keep_others: bool) -> Path:
    """The case's random-weight checkpoint under `root`, written with save_pretrained unless a finished one is there."""
    import fastmoe

    without_experts = case.load == "checkpoint-without-experts"
    path = root / f"{case.preset}-{case.layers}layers{'-without-experts' if without_experts else ''}"
    if (path / CHECKPOINT_MARK).exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    if not keep_others:
        for other in root.iterdir():
            if (other / CHECKPOINT_MARK).exists() or other.name.endswith(".partial"):
                shutil.rmtree(other)
    needed = common.weight_bytes(case.config_kwargs, dtype, experts=not without_experts)
    if shutil.disk_usage(root).free < 1.1 * needed:
        raise RuntimeError(f"{root} has {shutil.disk_usage(root).free / 1e9:.0f} GB free, the checkpoint needs "
                           f"{needed / 1e9:.0f} GB: pass --load direct, --load checkpoint-without-experts or another "
                           "--checkpoint-dir")
    fastmoe.unpatch()
    model = common.build_random_model(common.make_config(case.config_kwargs), device, dtype)
    partial = path.with_name(path.name + ".partial")
    if without_experts:
        experts = common.expert_stack_keys(model)
        model.save_pretrained(partial, state_dict={name: tensor for name, tensor in model.state_dict().items()
                                                   if name not in experts})
    else:
        model.save_pretrained(partial)
    builtin_tokenizer(case.seq).save_pretrained(partial)
    (partial / CHECKPOINT_MARK).touch()
    partial.rename(path)
    del model
    common.free_memory(device)
    return path


def load_checkpoint(case: Case, path: Path, device: str, dtype: torch.dtype):
    """(model, tokenizer) as the user's code loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fastmoe import FastModel

    placement = {"device_map": {"": torch.cuda.current_device()}} if device == "cuda" else {}
    if case.implementation == "fastmoe":
        return FastModel.from_pretrained(str(path), max_seq_length=case.seq, dtype=dtype,
                                         load_in_4bit=case.quantization == "4bit",
                                         fast_ops={op: False for op in case.ops_off}, **placement)
    kwargs = dict(dtype=dtype, **placement)
    if case.config_kwargs["model_type"] in common.GROUPED_MM_FAMILIES:
        kwargs["experts_implementation"] = "grouped_mm"
    if case.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs), AutoTokenizer.from_pretrained(str(path))


def build_direct(case: Case, device: str, dtype: torch.dtype):
    """(model, tokenizer) built on the device as from_pretrained would leave them (see the module docstring)."""
    if case.quantization == "4bit":  # fastmoe's only (main refuses transformers')
        model = common.build_fastmoe_4bit(case.config_kwargs, device, dtype)
        model.max_seq_length = case.seq
        return model, builtin_tokenizer(case.seq)
    config = common.make_config(case.config_kwargs)
    if case.implementation == "fastmoe":
        common.family(config.model_type).pre_patch(**{op: False for op in case.ops_off})
        from fastmoe.models.shared import EXPERTS_IMPLEMENTATION

        config._experts_implementation = EXPERTS_IMPLEMENTATION  # as FastModel.from_pretrained loads it
    elif config.model_type in common.GROUPED_MM_FAMILIES:
        config._experts_implementation = "grouped_mm"
    model = common.build_random_model(config, device, dtype)
    if case.implementation == "fastmoe":
        model.max_seq_length = case.seq
    return model, builtin_tokenizer(case.seq)


def with_lora(case: Case, model):
    """The LoRA adapter the user's code puts on: FastModel.get_peft_model, or peft with what it does besides."""
    import peft

    from fastmoe import FastModel

    if case.implementation == "fastmoe":
        return FastModel.get_peft_model(model, random_state=common.LORA_SEED, cuda_graphs=case.cuda_graphs,
                                        use_gradient_checkpointing="fastmoe" if case.offload else True,
                                        **lora_kwargs(case))
    if model.supports_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(common.LORA_SEED)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(case)))


def load(case: Case, args, device: str, dtype: torch.dtype):
    """(peft model, tokenizer) for the case."""
    import fastmoe

    fastmoe.unpatch()  # a previous fastmoe case's patches act on the classes; transformers' cases need them gone
    if case.load in ("checkpoint", "checkpoint-without-experts"):
        path = ensure_checkpoint(case, Path(args.checkpoint_dir), device, dtype, args.keep_checkpoints)
        model, tokenizer = load_checkpoint(case, path, device, dtype)
    else:
        model, tokenizer = build_direct(case, device, dtype)
    return with_lora(case, model), tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Training and measuring


def document_lengths(seq: int, documents: int, seed: int = 2) -> list[int]:
    """`documents` lengths summing to `seq`, each between a quarter and 1.75x the mean: by default the same for every
    row, so every step has the same shapes (and the padded batch the same longest document); another seed, others."""
    generator = torch.Generator().manual_seed(seed)
    weights = 0.25 + 1.5 * torch.rand(documents, generator=generator, dtype=torch.float64)
    lengths = [max(2, int(w)) for w in (weights / weights.sum() * seq).tolist()]
    lengths[int(torch.tensor(lengths).argmax())] += seq - sum(lengths)
    return lengths


def row_document_lengths(rows: int, seq: int, documents: int, varied: bool) -> list[list[int]]:
    """Each row's document lengths: document_lengths', the same in every row, or drawn anew per row (`varied`)."""
    return [document_lengths(seq, documents, seed=2 + row if varied else 2) for row in range(rows)]


def example_lengths(count: int, seq: int, seed: int = 3) -> list[int]:
    """`count` example lengths drawn log-uniformly between seq // 16 (at least 2) and seq: most examples short, a
    long tail, as instruction and chat data sets have; the same draw for every implementation."""
    generator = torch.Generator().manual_seed(seed)
    low = max(2, seq // 16)
    draws = torch.rand(count, generator=generator, dtype=torch.float64)
    return [min(seq, int(low * (seq / low) ** u)) for u in draws.tolist()]


def random_dataset(vocab_size: int, rows: int, seq: int, seed: int = 1, data: str = "rows", documents: int = 1,
                   varied: bool = False):
    """`rows` rows of `seq` random token ids, pre-tokenized. "packed": each row carries its documents' lengths
    (`seq_lengths`, which trl's padding-free collator turns into restarting position_ids); "padded": each row's
    documents become consecutive examples, one per row of the batch; "examples": `rows` examples of
    example_lengths."""
    import datasets

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, seq), generator=generator)
    if data == "rows":
        return datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    if data == "examples":
        return datasets.Dataset.from_dict({"input_ids": [row[:length].tolist() for row, length
                                                         in zip(ids, example_lengths(rows, seq))]})
    lengths = row_document_lengths(rows, seq, documents, varied)
    if data == "packed":
        return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "seq_lengths": lengths})
    pieces = [piece.tolist() for row, row_lengths in zip(ids, lengths) for piece in row.split(row_lengths)]
    return datasets.Dataset.from_dict({"input_ids": pieces})


def sft_config(case: Case, output_dir: str, max_steps: int, dtype: torch.dtype, supports_checkpointing: bool):
    from trl import SFTConfig

    # trl turns checkpointing on by default, and the Trainer then enables it on the model again (fastmoe keeps its
    # own mode through that: fastmoe.checkpointing). A model without checkpointing in transformers (JetMoe) makes the
    # Trainer raise, so a user turns the flag off there, as here. transformers renamed the flag
    # gradient_checkpointing -> activation_checkpointing; trl defaults the old to True.
    names = {field.name for field in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    # Documents: each step takes one row's documents, in order (the same shapes every step); packed rows go through
    # trl's padding-free collator, whose max_length must be None (the rows are seq long already).
    # Examples: each step the next `batch` examples, padded by trl's collator.
    documents = {} if case.data == "rows" else dict(train_sampling_strategy="sequential")
    if case.data == "packed":
        documents.update(padding_free=True)
    return SFTConfig(output_dir=output_dir, max_steps=max_steps,
                     per_device_train_batch_size=case.batch * (case.documents if case.data == "padded" else 1),
                     max_length=None if case.data == "packed" else case.seq, **documents,
                     logging_steps=case.logging_steps, save_strategy="no", report_to="none",
                     bf16=dtype == torch.bfloat16, fp16=False, use_cpu=not torch.cuda.is_available(),
                     disable_tqdm=True, seed=common.LORA_SEED,
                     **({} if supports_checkpointing else {checkpointing: False}))


def make_step_clock(device: str, timed_steps: int, profile_from: int, profile_steps: int, trace_steps: int = 0,
                    memory_steps: int = 0):
    """A TrainerCallback: every step's start (and the end of training) marked on the GPU's stream by a CUDA event,
    read after training (on the CPU, the clock), peak memory from the start of training (and over the timed steps,
    those before profile_from), the memory allocated at each step's start, torch.profiler's CUDA activities over
    steps [profile_from, profile_from + profile_steps), with trace_steps, a CPU + CUDA trace with Python stacks over
    the trace_steps steps after those (host_gaps.py reads it; the Python tracer slows the host, so these steps are
    neither timed nor counted in the GPU-busy share), and with memory_steps, the CUDA allocator's trace with Python
    stacks over the steps after those (memory_peak.py reads it)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    trace_from = profile_from + profile_steps
    memory_from = trace_from + trace_steps

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list = []  # CUDA events recorded at each step's start (on the CPU, clock readings)
            self.allocated: list[int] = []
            self.layer_graphs: list[int] = []  # fastmoe's captured layer graphs at each step's start
            self.eager_layers: list[int] = []  # layer calls that took graphed checkpointing's fallback, likewise
            self.eager_calls = 0
            self.graphed: list = []  # the model's graphed checkpointing, found once at the start of training
            self.profiler = None
            self.profiled = False  # whether the profiler ran over its steps
            self.activities: list[tuple[str, int, int]] = []
            self.kernels: list[tuple[str, int]] = []
            self.tracer = None
            self.trace = None  # the finished tracing profiler
            self.peak_before_timed = 0  # max_memory_allocated over the warm-up steps
            self.timed_peak = 0  # over the timed steps
            self.recording_memory = False
            self.memory_base = 0  # allocated when the allocator's trace started
            self.memory_snapshot = None

        def _start_memory(self) -> None:
            self.memory_base = torch.cuda.memory_allocated()
            # Checkpointing's early stop ends a recomputation by raising inside it, which breaks autograd
            # Functions while the allocator records stacks (torch 2.11: pytorch/pytorch#179536). Recomputing the
            # rest of the layer holds nothing more at the peak than the backward that follows it.
            self.no_early_stop = torch.utils.checkpoint.set_checkpoint_early_stop(False)
            self.no_early_stop.__enter__()
            torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
            self.recording_memory = True

        def _stop_memory(self) -> None:
            self.memory_snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.no_early_stop.__exit__(None, None, None)
            self.recording_memory = False

        def _mark(self) -> None:
            if device != "cuda":
                self.begins.append(time.perf_counter())
                return
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.begins.append(event)

        def _stop_profiler(self) -> None:
            common.synchronize(device)  # the profiled steps' kernels all run before the profiler stops
            self.profiler.stop()
            self.profiled = True
            self.activities = common.profiler_activities(self.profiler)
            self.kernels = common.profiler_kernels(self.profiler)
            self.profiler = None

        def _stop_tracer(self) -> None:
            self.tracer.stop()
            self.trace, self.tracer = self.tracer, None

        def on_train_begin(self, args, state, control, **kwargs):
            # Trainer has enabled gradient checkpointing by now; walking the model's modules every step would add
            # host time to the steps it times.
            self.graphed = graphed_checkpoints(kwargs.get("model"))
            for graphed in self.graphed:
                graphed.fallback = self._counting(graphed.fallback)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def _counting(self, fallback):
            """fallback, counting its calls: layers that ran eagerly (torch's checkpoint) instead of graphs."""
            def counted(*args, **kwargs):
                self.eager_calls += 1
                return fallback(*args, **kwargs)
            return counted

        def _count_graphs(self) -> None:
            self.layer_graphs.append(sum(len(graphed.graphs) for graphed in self.graphed))
            self.eager_layers.append(self.eager_calls)

        def on_step_begin(self, args, state, control, **kwargs):
            self._mark()
            self._count_graphs()
            self.allocated.append(torch.cuda.memory_allocated() if device == "cuda" else 0)
            if device == "cuda" and state.global_step == profile_from - timed_steps:
                self.peak_before_timed = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            if device == "cuda" and state.global_step == profile_from:
                self.timed_peak = torch.cuda.max_memory_allocated()
            if self.profiler is not None and state.global_step == trace_from:
                self._stop_profiler()
            if self.tracer is not None and state.global_step == trace_from + trace_steps:
                self._stop_tracer()
            if self.recording_memory and state.global_step == memory_from + memory_steps:
                self._stop_memory()
            if profile_steps and state.global_step == profile_from:
                kind = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
                common.synchronize(device)  # the profiler records this step's kernels on, not the previous step's
                self.profiler = profile(activities=[kind])
                self.profiler.start()
            if trace_steps and state.global_step == trace_from:
                self.tracer = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
                self.tracer.start()
            if memory_steps and device == "cuda" and state.global_step == memory_from:
                self._start_memory()

        def on_train_end(self, args, state, control, **kwargs):
            self._mark()
            self._count_graphs()
            if self.profiler is not None:
                self._stop_profiler()
            if self.tracer is not None:
                self._stop_tracer()
            if self.recording_memory:
                self._stop_memory()

        def step_seconds(self) -> list[float]:
            if device != "cuda":
                return [b - a for a, b in zip(self.begins, self.begins[1:])]
            common.synchronize(device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.begins, self.begins[1:])]

    return StepClock()


def graphed_checkpoints(model) -> list:
    """fastmoe's graphed checkpointing objects of `model` (none for transformers' models or without graphs), whose
    `graphs` are the layer graphs captured so far. A capture inside the timed steps times the capture, not the step."""
    if model is None:
        return []
    return [module.__dict__["_fastmoe_graphed_checkpoint"] for module in model.modules()
            if "_fastmoe_graphed_checkpoint" in module.__dict__]


def replayed_steps(layer_graphs: list[int], eager_layers: list[int], first: int, seconds: list[float],
                   tokens: list[int]) -> dict:
    """Of the timed steps (step `first` on, `seconds` and `tokens` each), those whose every layer replayed a graph
    (no capture, no layer on the fallback): how many, and their tokens over their time, what a long run on such data
    approaches once its lengths have their graphs. layer_graphs and eager_layers are the counts at each step's start
    (and the end)."""
    replayed = [i for i in range(len(seconds))
                if layer_graphs[first + i + 1] == layer_graphs[first + i]
                and eager_layers[first + i + 1] == eager_layers[first + i]]
    time_s = sum(seconds[i] for i in replayed)
    return dict(replayed_steps=len(replayed),
                tokens_per_s_replayed=round(sum(tokens[i] for i in replayed) / time_s, 1) if replayed else None)


def logged(trainer, key: str, which: int) -> float | None:
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return round(values[which], 4) if values else None


def run_case(case: Case, args, shared: dict, peak_tflops: float | None, device: str, dtype: torch.dtype) -> dict:
    """Train the case and return its record (status ok, oom or error)."""
    import fastmoe

    config_kwargs = case.config_kwargs
    flops = common.step_flops(config_kwargs, case.batch, case.seq)
    if case.data in ("packed", "padded"):  # attention within each document only (padding neither); varied: the mean
        config = common.make_config(config_kwargs)
        timed_rows = row_document_lengths((args.warmup + args.steps) * case.batch, case.seq, case.documents,
                                          case.varied)[args.warmup * case.batch:]
        within = statistics.fmean(sum(common.attention_flops(config, 1, n) for n in lengths) for lengths in timed_rows)
        flops += case.batch * (within - common.attention_flops(config, 1, case.seq))
    timed_tokens = None  # each timed step's tokens where they differ from step to step
    if case.data == "examples":  # the mean timed step's FLOPs: linear in its tokens, attention within each example
        config = common.make_config(config_kwargs)
        lengths = example_lengths((args.warmup + args.steps) * case.batch, case.seq)[args.warmup * case.batch:]
        timed_tokens = [sum(lengths[i:i + case.batch]) for i in range(0, len(lengths), case.batch)]
        linear = flops - common.attention_flops(config, case.batch, case.seq)
        flops = (linear * statistics.fmean(timed_tokens) / (case.batch * case.seq)
                 + sum(common.attention_flops(config, 1, n) for n in lengths) / args.steps)
    record = dict(shared, question="sft", family=config_kwargs["model_type"], **dataclasses.asdict(case),
                  shape=f"{case.batch}x{case.seq}", lora_rank=common.LORA_RANK, steps=args.steps, warmup=args.warmup,
                  profile_steps=args.profile_steps, flops_per_step=flops,
                  peak_tflops=common.rounded(peak_tflops, 1), memory_limit_gb=args.memory_limit_gb,
                  # the caching allocator's settings (expandable_segments decides how much fragmentation costs)
                  alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    extra = args.profile_steps + args.trace_steps + args.memory_profile
    max_steps = args.warmup + args.steps + extra + (1 if extra else 0)
    trainer = model = clock = None
    from fastmoe import graphed_checkpointing, padding_free

    default_shapes, default_coarse_rows = graphed_checkpointing.MAX_GRAPH_SHAPES, padding_free.COARSE_ROUNDING_ROWS
    try:
        # Whatever graphed checkpoint the case's model gets (at get_peft_model or when the trainer enables it)
        graphed_checkpointing.MAX_GRAPH_SHAPES = case.graph_shapes or default_shapes
        if case.coarse_rounding_rows is not None:
            padding_free.COARSE_ROUNDING_ROWS = case.coarse_rounding_rows
        start = time.perf_counter()
        model, tokenizer = load(case, args, device, dtype)
        record["load_s"] = round(time.perf_counter() - start, 1)
        dataset = random_dataset(config_kwargs["vocab_size"], max_steps * case.batch, case.seq, data=case.data,
                                 documents=case.documents, varied=case.varied)
        clock = make_step_clock(device, args.steps, args.warmup + args.steps, args.profile_steps, args.trace_steps,
                                args.memory_profile)
        from trl import SFTTrainer

        from fastmoe.kernels.moe.grouped_gemm import base_products

        with tempfile.TemporaryDirectory() as output_dir:
            config = sft_config(case, output_dir, max_steps, dtype, model.supports_gradient_checkpointing)
            trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=config,
                                 callbacks=[clock])
            with base_products(case.base_products):
                trainer.train()
        pool_reserved, pool_allocated = graph_pool_bytes(device)
        timed = clock.step_seconds()[args.warmup:args.warmup + args.steps]
        graphs = clock.layer_graphs
        captured_while_timed = graphs[args.warmup + args.steps] - graphs[args.warmup]
        if captured_while_timed:
            record["graphs_captured_while_timed"] = captured_while_timed
            print(f"warning: fastmoe captured {captured_while_timed} layer graphs during the timed steps, whose times "
                  "then include the captures: raise --warmup (graphs are captured at a shape's second step)",
                  flush=True)
        step_s = statistics.median(timed)
        tokens = case.batch * case.seq
        # Steps of different tokens: the timed steps' tokens over their time (a median step means nothing there).
        per_step_s = step_s if timed_tokens is None else statistics.fmean(timed)
        tflops = flops / per_step_s / 1e12
        tokens_per_s = tokens / step_s if timed_tokens is None else sum(timed_tokens) / sum(timed)
        record.update(status="ok", timing="cuda-events" if device == "cuda" else "clock",
                      tokens_per_s=round(tokens_per_s, 1),
                      tokens_per_s_mean=round(sum(timed_tokens or [tokens] * len(timed)) / sum(timed), 1),
                      step_ms=round(1e3 * step_s, 2),
                      step_ms_all=[round(1e3 * s, 2) for s in timed], tflops=round(tflops, 2),
                      mfu_pct=common.rounded(100 * tflops / peak_tflops if peak_tflops else None, 2),
                      peak_gb=common.rounded(max(clock.peak_before_timed, clock.timed_peak,
                                                 torch.cuda.max_memory_allocated()) / 2**30, 2)
                      if device == "cuda" else None,
                      timed_peak_gb=common.rounded(clock.timed_peak / 2**30, 2) if device == "cuda" else None,
                      # CUDA graphs' private pools: what their replays use is reserved there, never "allocated"
                      graph_pool_gb=common.rounded(pool_reserved / 2**30, 2) if device == "cuda" else None,
                      footprint_gb=common.rounded(max(clock.peak_before_timed, clock.timed_peak
                                                      + pool_reserved - pool_allocated) / 2**30, 2)
                      if device == "cuda" else None,
                      peak_reserved_gb=common.rounded(torch.cuda.max_memory_reserved() / 2**30, 2)
                      if device == "cuda" else None,
                      # weights, adapters, optimizer state and anything kept across steps (graph buffers)
                      step_start_gb=common.rounded(clock.allocated[args.warmup + args.steps - 1] / 2**30, 2)
                      if device == "cuda" else None,
                      trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      loss_first=logged(trainer, "loss", 0), loss_last=logged(trainer, "loss", -1),
                      entropy_last=logged(trainer, "entropy", -1),
                      token_accuracy_last=logged(trainer, "mean_token_accuracy", -1))
        if timed_tokens is not None:
            # trl's own count over every step trained, against which example_lengths' can be checked
            record.update(tokens_per_step=timed_tokens, trl_num_tokens=logged(trainer, "num_tokens", -1))
            if clock.graphed:
                record.update(replayed_steps(clock.layer_graphs, clock.eager_layers, args.warmup, timed,
                                             timed_tokens))
        if device == "cuda" and clock.profiled:
            busy_ns, kernels, span_ns = common.gpu_activity(clock.activities)
            record.update(gpu_busy_pct=round(100 * busy_ns / span_ns, 1) if span_ns else None,
                          gpu_busy_ms_per_step=round(busy_ns / 1e6 / args.profile_steps, 2),
                          profiled_step_ms=round(span_ns / 1e6 / args.profile_steps, 2),
                          kernels_per_step=round(kernels / args.profile_steps),
                          top_kernels=common.top_kernels(clock.kernels, args.profile_steps, args.top_kernels))
        if clock.trace is not None and args.trace_dir:
            record["host_gaps"] = trace_summary(clock.trace, case, args.trace_dir)
        if clock.memory_snapshot is not None:
            record["memory_peak"] = memory_summary(clock.memory_snapshot, clock.memory_base, case, args.trace_dir)
    except torch.OutOfMemoryError:
        record.update(status="oom", device_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    except Exception as error:  # one broken case must not cost the others their measurement
        traceback.print_exc()
        record.update(status="error", error=f"{type(error).__name__}: {error}"[:300])
    finally:
        graphed_checkpointing.MAX_GRAPH_SHAPES = default_shapes
        padding_free.COARSE_ROUNDING_ROWS = default_coarse_rows
    # Here, not in the except blocks, whose traceback still holds the failed model; the clock too, which holds the
    # model's graphed checkpointing (and through its layer graphs, the layers): kept, it kept the whole model
    # allocated until a later collection (a second 32-layer Trinity-Mini case then ran out of memory at load).
    del trainer, model, clock
    fastmoe.unpatch()
    common.free_memory(device)
    if device == "cuda":
        # What the case left behind counts in the next case's memory.
        record.update(allocated_after_gb=round(torch.cuda.memory_allocated() / 2**30, 2),
                      reserved_after_gb=round(torch.cuda.memory_reserved() / 2**30, 2))
        if record["reserved_after_gb"] > 1:
            print(f"warning: {record['allocated_after_gb']} GB allocated and {record['reserved_after_gb']} GB "
                  "reserved after the case, its model dropped", flush=True)
    return record


def graph_pool_bytes(device: str) -> tuple[int, int]:
    """(reserved, allocated) bytes of the caching allocator's private pools: those of CUDA graphs, whose replays
    allocate nothing, so that max_memory_allocated never counts the memory their kernels work in."""
    if device != "cuda":
        return 0, 0
    reserved = allocated = 0
    for segment in torch.cuda.memory_snapshot():
        if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0):
            reserved += segment["total_size"]
            allocated += segment["allocated_size"]
    return reserved, allocated


def trace_summary(tracer, case: Case, trace_dir: str) -> dict:
    """host_gaps.py's summary of the traced steps, printed, written beside the trace, and its head kept in the
    record."""
    import json

    import host_gaps

    folder = Path(trace_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = file_stem(case)
    trace_path = folder / f"{stem}.trace.json"
    tracer.export_chrome_trace(str(trace_path))
    summary = host_gaps.summarize(host_gaps.load_trace(trace_path))
    (folder / f"{stem}.gaps.json").write_text(json.dumps(summary, indent=1))
    print(f"host gaps of {case.label()}:\n{host_gaps.report(summary)}", flush=True)
    head = {key: value for key, value in summary.items() if not isinstance(value, dict)}
    head["exclusive_ms"] = dict(list(summary.get("exclusive_ms", {}).items())[:10])
    return head


def memory_summary(snapshot: dict, base_bytes: int, case: Case, trace_dir: str) -> dict:
    """memory_peak.py's summary of the recorded step, printed, written to trace_dir, and its head kept in the
    record."""
    import json

    import memory_peak

    summary = memory_peak.summarize(snapshot, base_bytes, tokens=case.batch * case.seq)
    folder = Path(trace_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{file_stem(case)}.memory.json").write_text(json.dumps(summary, indent=1))
    print(f"memory at the peak of {case.label()}:\n{memory_peak.report(summary)}", flush=True)
    head = {key: value for key, value in summary.items() if not isinstance(value, (dict, list))}
    head["sites_mb"] = dict(list(summary["sites_mb"].items())[:8])
    return head


def file_stem(case: Case) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case.label()).strip("_")


def summary_line(case: Case, record: dict) -> str:
    if record["status"] != "ok":
        return f"sft {case.label()}: {record['status']} {record.get('error', '')}".rstrip()

    def figure(key: str, spec: str, unit: str = "") -> str:
        return "-" if record.get(key) is None else f"{format(record[key], spec)}{unit}"

    return (f"sft {case.label()}: {record['tokens_per_s']:,.0f} tokens/s (median of {len(record['step_ms_all'])}, "
            f"mean {record['tokens_per_s_mean']:,.0f}), {figure('peak_gb', '.1f', ' GB')}, GPU busy "
            f"{figure('gpu_busy_pct', '.0f', '%')}, {figure('kernels_per_step', ',')} kernels/step, "
            f"{record['tflops']:.1f} TFLOP/s (MFU {figure('mfu_pct', '.1f', '%')}), loss "
            f"{record['loss_first']} -> {record['loss_last']}, loaded in {record['load_s']} s"
            + (f"; {record['replayed_steps']} steps all graph replays ({figure('tokens_per_s_replayed', ',.0f')} "
               "tokens/s over them)" if "replayed_steps" in record else ""))


# --------------------------------------------------------------------------------------------------------------------
# Command line


def csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def choose_load(requested: str, config_kwargs: dict, quantization: str | None, args, dtype) -> str:
    if requested != "auto":
        return requested
    needed = common.weight_bytes(config_kwargs, dtype)
    root = Path(args.checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    fits = needed <= args.max_checkpoint_gb * 1e9 and shutil.disk_usage(root).free >= 1.1 * needed
    # 4-bit loading quantizes while from_pretrained reads the checkpoint: there is no direct build of it.
    return "checkpoint" if fits or quantization else "direct"


def build_cases(args, parser, dtype) -> list[Case]:
    cases = []
    for preset in csv(args.preset):
        if preset not in common.PRESETS:
            parser.error(f"unknown preset {preset!r}: choose from {', '.join(sorted(common.PRESETS))}")
        config_kwargs = common.with_layers(common.PRESETS[preset], args.layers)
        layers = config_kwargs["num_hidden_layers"]
        try:
            shapes = common.parse_shapes(args.shapes)
        except ValueError as error:
            parser.error(str(error))
        grid = itertools.product(csv(args.quantization), csv(args.targets), csv(args.logging_steps), csv(args.data),
                                 shapes, csv(args.implementations))
        for quantization, targets, logging_steps, data, (batch, seq), implementation in grid:
            if data not in ("rows", "packed", "padded", "examples"):
                parser.error(f"unknown data {data!r}: choose from rows, packed, padded, examples")
            if (data in ("rows", "examples")) != (args.documents == 1):
                parser.error("--data packed/padded splits each row into --documents (2 or more) documents; rows and "
                             "examples take --documents 1")
            if data in ("rows", "examples") and args.varied_lengths:
                parser.error("--varied-lengths varies the lengths of --data packed/padded documents; rows have one "
                             "and examples vary already")
            if data != "rows" and seq < 2 * args.documents:
                parser.error(f"{args.documents} documents of at least 2 tokens do not fit {seq} tokens")
            if implementation not in IMPLEMENTATIONS:
                parser.error(f"unknown implementation {implementation!r}: choose from {', '.join(IMPLEMENTATIONS)}")
            if targets not in common.LORA_TARGET_SETS:
                parser.error(f"unknown targets {targets!r}: choose from {', '.join(common.LORA_TARGET_SETS)}")
            if quantization not in ("none", "4bit"):
                parser.error(f"unknown quantization {quantization!r}: choose from none, 4bit")
            for products in args.fastmoe_base_products:
                if products not in ("triton", "torch"):
                    parser.error(f"unknown --fastmoe-base-products {products!r}: choose from triton, torch")
            if not logging_steps.isdigit() or int(logging_steps) < 1:
                parser.error(f"--logging-steps takes positive integers, got {logging_steps!r}")
            quantization = None if quantization == "none" else quantization
            load_how = choose_load(args.load, config_kwargs, quantization, args, dtype)
            if quantization and load_how == "direct" and implementation != "fastmoe":
                parser.error("transformers' 4-bit loading quantizes while from_pretrained reads the checkpoint: use "
                             "--load checkpoint or auto with --quantization 4bit")
            # (cuda_graphs, offload, base_products, ops_off, shapes, coarse_rounding_rows)
            variants = [(None, False, "auto", (), None, None)]
            if implementation == "fastmoe":
                known_ops = common.op_names(config_kwargs["model_type"])
                unknown = [op for op in args.fastmoe_without_ops if op not in known_ops]
                if unknown:
                    parser.error(f"--fastmoe-without-ops: {', '.join(unknown)} not among "
                                 f"{config_kwargs['model_type']}'s ops: {', '.join(known_ops)}")
                asked = ([(False, False, "auto", (), None, None)] * args.fastmoe_without_graphs
                         + [(True, False, "auto", (), None, None)] * args.fastmoe_with_graphs
                         + [(None, True, "auto", (), None, None)] * args.fastmoe_offloaded
                         + [(False, True, "auto", (), None, None)] * args.fastmoe_offloaded_eager
                         + [(None, False, products, (), None, None) for products in args.fastmoe_base_products]
                         + [(None, False, "auto", tuple(args.fastmoe_without_ops), None, None)]
                         * bool(args.fastmoe_without_ops)
                         + [(None, False, "auto", (), shapes, None) for shapes in args.fastmoe_graph_shapes]
                         + [(None, False, "auto", (), None, rows) for rows in args.fastmoe_coarse_rounding_rows])
                if args.fastmoe_variants_only and not asked:
                    parser.error("--fastmoe-variants-only times the variants other --fastmoe-* options ask for: "
                                 "name one (e.g. --fastmoe-offloaded)")
                variants = asked if args.fastmoe_variants_only else variants + asked
            cases += [Case(preset, layers, batch, seq, implementation, targets, int(logging_steps), quantization,
                           load_how, cuda_graphs, offload, data, args.documents, args.varied_lengths, products, ops_off,
                           shapes, coarse_rows)
                      for cuda_graphs, offload, products, ops_off, shapes, coarse_rows in variants]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="trinity-mini", help="comma-separated presets: " + ", ".join(
        sorted(common.PRESETS)))
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: the preset's)")
    parser.add_argument("--shapes", default="1x4096", help="batch x sequence length, comma-separated, e.g. "
                        "1x4096,4x2048,1x16384")
    parser.add_argument("--implementations", default="transformers,fastmoe", help="comma-separated: "
                        + ", ".join(IMPLEMENTATIONS))
    parser.add_argument("--targets", default="default", help="comma-separated LoRA target sets: "
                        + ", ".join(common.LORA_TARGET_SETS))
    parser.add_argument("--logging-steps", default="1", help="comma-separated, e.g. 1,10")
    parser.add_argument("--quantization", default="none", help="comma-separated: none, 4bit")
    parser.add_argument("--data", default="rows", help="comma-separated: rows (each row one document), packed (each "
                        "row --documents documents, position_ids restarting: trl's padding_free), padded (the same "
                        "documents one per row, padded to the longest), examples (batch examples of varied lengths "
                        "a step, padded: an SFT data set); tokens/s counts the documents' tokens")
    parser.add_argument("--documents", type=int, default=1, help="documents per row with --data packed/padded")
    parser.add_argument("--varied-lengths", action="store_true", help="with --data packed/padded, draw each row's "
                        "document lengths anew (every step a new layout, as real data has) instead of the same in "
                        "every row")
    parser.add_argument("--memory-limit-gb", type=float, default=None, help="emulate a GPU of this many GiB "
                        "(torch.cuda.set_per_process_memory_fraction): with --shapes 1x16384,1x32768,... the longest "
                        "sequence that trains within it is the last case not recorded as oom")
    parser.add_argument("--fastmoe-without-graphs", action="store_true", help="also time fastmoe with "
                        "get_peft_model(cuda_graphs=False): its layers eager, the launches issued from Python")
    parser.add_argument("--fastmoe-with-graphs", action="store_true", help="also time fastmoe with "
                        "get_peft_model(cuda_graphs=True), for families whose default is eager layers (Cohere)")
    parser.add_argument("--fastmoe-base-products", default="", type=lambda text: [p for p in text.split(",") if p],
                        help="also time fastmoe with the expert GEMMs' base products computed this way, "
                        "comma-separated: triton (inside fastmoe's kernels), torch (torch's grouped GEMM, NF4 stacks "
                        "dequantized first, the kernels as its epilogue); the default run takes fastmoe's rule "
                        "(grouped_gemm.products_by_torch)")
    parser.add_argument("--fastmoe-without-ops", default="", type=lambda text: [o for o in text.split(",") if o],
                        help="also time fastmoe with these ops switched off, comma-separated (fastmoe.models.op_names; "
                        "e.g. trainer_step,trl_sft_metrics: the Trainer's and trl's per-step host work as they "
                        "ship)")
    parser.add_argument("--fastmoe-graph-shapes", default="", type=lambda text: [int(n) for n in text.split(",") if n],
                        help="also time fastmoe with its graphed checkpointing following this many hidden-state "
                        "shapes (comma-separated counts, e.g. 12; those beyond its kept-attention ones recompute "
                        "attention): with --data examples, how many of a data set's lengths are worth graphs")
    parser.add_argument("--fastmoe-coarse-rounding-rows", default="",
                        type=lambda text: [int(n) for n in text.split(",") if n],
                        help="also time fastmoe with this many of a run's first rows rounded coarser while the graphs' "
                        "places fill (comma-separated counts; 0: a quarter octave from the first; the default: "
                        "fastmoe.padding_free.COARSE_ROUNDING_ROWS): with --data examples, what it saves a short run")
    parser.add_argument("--fastmoe-offloaded", action="store_true", help="also time fastmoe with "
                        "get_peft_model(use_gradient_checkpointing=\"fastmoe\"): layer inputs in host memory")
    parser.add_argument("--fastmoe-offloaded-eager", action="store_true", help="also time fastmoe with "
                        "get_peft_model(use_gradient_checkpointing=\"fastmoe\", cuda_graphs=False)")
    parser.add_argument("--fastmoe-variants-only", action="store_true", help="time only the fastmoe variants the "
                        "--fastmoe-* options above ask for, not also fastmoe's defaults (a long-sequence probe's "
                        "step takes minutes)")
    parser.add_argument("--load", choices=["auto", "checkpoint", "checkpoint-without-experts", "direct"],
                        default="auto", help="how the model is made (see the module's docstring)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler after the timed ones")
    parser.add_argument("--trace-steps", type=int, default=0, help="steps after the profiled ones traced with CPU "
                        "activity and Python stacks; with --trace-dir, host_gaps.py's summary of where the GPU waits "
                        "on the host goes into the record")
    parser.add_argument("--top-kernels", type=int, default=12, help="kernels (by name, longest first) that the "
                        "profiled steps' record lists with their time and launches per step")
    parser.add_argument("--memory-profile", type=int, choices=[0, 1], default=0, help="1: record the CUDA "
                        "allocator's trace over one more step; memory_peak.py's summary of what is live at its peak "
                        "(by allocating site) goes into the record and --trace-dir (use --fastmoe-without-graphs: a "
                        "graph's replay allocates nothing)")
    parser.add_argument("--trace-dir", default=None, help="folder for the traces and their summaries")
    parser.add_argument("--checkpoint-dir", default=str(Path(tempfile.gettempdir()) / "fastmoe-bench-checkpoints"))
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep other presets' checkpoints (default: "
                        "one at a time, to spare the disk)")
    parser.add_argument("--max-checkpoint-gb", type=float, default=20.0,
                        help="--load auto writes checkpoints up to this size, and builds bigger models directly")
    parser.add_argument("--budget-s", type=float, default=None, help="skip the cases that would end after this many "
                        "seconds from the start, judged by the longest case so far")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0 or args.trace_steps < 0:
        parser.error("--steps must be at least 1, --warmup, --profile-steps and --trace-steps at least 0")
    if (args.trace_steps or args.memory_profile) and not args.trace_dir:
        parser.error("--trace-steps and --memory-profile write their summaries to --trace-dir: name one")
    if any(shapes < 1 for shapes in args.fastmoe_graph_shapes):
        parser.error("--fastmoe-graph-shapes takes positive counts")
    if any(rows < 0 for rows in args.fastmoe_coarse_rounding_rows):
        parser.error("--fastmoe-coarse-rounding-rows takes counts of 0 or more")

    device = common.default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = build_cases(args, parser, dtype)
    if {case.implementation for case in cases} == {"fastmoe"}:
        # What `import fastmoe` does at the top of a user's script, before anything here first uses CUDA.
        from fastmoe.allocator import prefer_expandable_segments

        prefer_expandable_segments()
    if args.memory_profile and device != "cuda":
        parser.error("--memory-profile reads the CUDA allocator's trace: it needs a CUDA device")
    if args.memory_limit_gb is not None:
        if device != "cuda":
            parser.error("--memory-limit-gb emulates a smaller GPU: it needs a CUDA device")
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        if not 0 < args.memory_limit_gb <= total_gb:
            parser.error(f"--memory-limit-gb must be in (0, {total_gb:.0f}], this GPU's memory in GiB")
        torch.cuda.set_per_process_memory_fraction(args.memory_limit_gb / total_gb)
    peak_tflops = common.matmul_peak_tflops(device)
    shared = common.environment(device)
    start, longest, failed = time.perf_counter(), 0.0, False
    for index, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and index and elapsed + longest > args.budget_s:
            print(f"budget: {elapsed:.0f} of {args.budget_s:.0f} s spent, the longest case took {longest:.0f} s; "
                  f"skipping {len(cases) - index}: " + "; ".join(c.label() for c in cases[index:]), flush=True)
            break
        case_start = time.perf_counter()
        record = run_case(case, args, shared, peak_tflops, device, dtype)
        longest = max(longest, time.perf_counter() - case_start)
        failed |= record["status"] == "error"
        print(summary_line(case, record), flush=True)
        for name, ms, launches in record.get("top_kernels", []):
            print(f"    {ms:8.2f} ms/step {launches:7.1f}x  {name}")
        if not args.no_record:
            common.append_record(record, args.jsonl)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
