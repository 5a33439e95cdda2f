"""The built-in tiny world: an instruction data set shipped in the package, a tokenizer trained on it, tiny
random-weight checkpoints of every supported family (from each family's `tiny_config`), and the built-in model
`fastmoe train` uses with no --model, built once into a cache folder. The tests use these too (there is no model hub
on CI machines)."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>"]
# A chat template in the usual shape, so trl's chat-format data and assistant-only loss work on the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}{% generation %}"
    "{{ message['content'] + '<|eos|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# The built-in model: AFMoE's tiny config is a little narrow to fit the built-in data visibly within a minute of CPU
# time; this keeps the architecture (every AFMoE feature exercised) and widens it. The larger init matters most: LoRA
# leaves the embeddings and the LM head frozen, and at transformers' 0.02 the head's logits span about +-1, so no
# adapter could make any token much likelier than the rest.
BUILTIN_OVERRIDES: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=2048, initializer_range=0.1,
)


def builtin_records() -> list[dict[str, str]]:
    """The shipped instruction data: [{"instruction": ..., "response": ...}, ...]."""
    text = resources.files("fastmoe.data").joinpath("instructions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def record_to_text(record: dict[str, str]) -> str:
    return f"<|user|>{record['instruction']}\n<|assistant|>{record['response']}<|eos|>"


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on `texts` (the built-in data by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = [record_to_text(r) for r in builtin_records()]
    core = Tokenizer(models.BPE(unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>", unk_token="<|unk|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """The family's tiny config (`Family.tiny_config`: odd sizes, not multiples of kernel blocks, that still exercise
    every feature), with `overrides` set on it."""
    from transformers import AutoConfig

    from fastmoe import models

    family = models.family(model_type)
    if family is None:
        raise ValueError(f"no tiny config for model_type {model_type!r}")
    config = AutoConfig.for_model(model_type, **family.tiny_config, vocab_size=vocab_size, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@torch.no_grad()
def randomize_routers(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """transformers zero-initialises some routers (every token then picks the same experts); draw them at random,
    and give expert biases small random values so biased selection is exercised too. The family's `random_init`
    parameters (zero-initialised too) are drawn small, so that comparisons see them."""
    from fastmoe import models

    family = models.family(getattr(getattr(model, "config", None), "model_type", None))
    routers = family.routers if family is not None else ()
    random_init = family.random_init if family is not None else ()
    for name, param in model.named_parameters():
        if _matches(name.rpartition(".")[0], routers) and param.dim() == 2:
            param.normal_(0.0, 0.5, generator=generator)
    for name, buffer in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("expert_bias"):
            buffer.uniform_(-0.05, 0.05, generator=generator)
    for name, param in model.named_parameters():
        if _matches(name, random_init):
            param.normal_(0.0, 0.02, generator=generator)


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether the dotted `name` is one of `suffixes` or ends with one, from a dot on."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def build_tiny_checkpoint(model_type: str, out_dir: str | Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Write a random tiny checkpoint of `model_type` with its tokenizer to out_dir and return the path."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer), **overrides))
    randomize_routers(model, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cache_dir() -> Path:
    """Where the built-in model lives: $FASTMOE_CACHE, else ~/.cache/fastmoe (or $XDG_CACHE_HOME/fastmoe)."""
    if os.environ.get("FASTMOE_CACHE"):
        return Path(os.environ["FASTMOE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmoe"


def builtin_model_path() -> Path:
    """The built-in AFMoE checkpoint (random weights, tokenizer trained on the built-in data), built on first use.

    It is kept in a cache rather than a temporary folder because the saved adapter names it as its base model:
    `PeftModel.from_pretrained` and `FastModel.from_pretrained(output_dir)` find it there later.
    """
    # Named after its recipe, so changing BUILTIN_OVERRIDES never reuses a stale cached checkpoint.
    recipe = hashlib.sha256(json.dumps(BUILTIN_OVERRIDES, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"builtin-afmoe-{recipe}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: two runs starting at once must never see a half-written checkpoint.
    staging = target.parent / f".{target.name}.{os.getpid()}"
    build_tiny_checkpoint("afmoe", staging, seed=0, tokenizer=build_tokenizer(), **BUILTIN_OVERRIDES)
    try:
        staging.rename(target)
    except OSError:
        # Another run finished first; its checkpoint is the same.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target
