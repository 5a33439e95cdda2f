"""The built-in tiny world: an instruction data set shipped in the package, a tokenizer trained on it, and
tiny random-weight checkpoints of every supported family. `fastmoe train` with no --model uses these, and
so do the tests (there is no model hub on CI machines)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

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
