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
    """Small configs with odd sizes (not multiples of kernel blocks) that still exercise every feature."""
    import transformers

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "afmoe":
        config = transformers.AfmoeConfig(
            hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, num_dense_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=8, num_experts_per_tok=3,
            num_shared_experts=1, route_scale=1.5, global_attn_every_n_layers=2, sliding_window=6,
            max_position_embeddings=512, tie_word_embeddings=False, **common)
    elif model_type == "lfm2_moe":
        config = transformers.Lfm2MoeConfig(
            hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, num_dense_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
            layer_types=["full_attention", "conv", "full_attention"], routed_scaling_factor=1.5,
            max_position_embeddings=512, **common)
    elif model_type == "jetmoe":
        config = transformers.JetMoeConfig(
            hidden_size=48, num_hidden_layers=2, num_key_value_heads=2, kv_channels=12, intermediate_size=40,
            num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=512, **common)
    elif model_type == "cohere":
        config = transformers.CohereConfig(
            hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            use_qk_norm=True, logit_scale=0.5, max_position_embeddings=512, **common)
    else:
        raise ValueError(f"no tiny config for model_type {model_type!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@torch.no_grad()
def randomize_routers(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """transformers zero-initialises some routers (every token then picks the same experts); draw them at random,
    and give expert biases small random values so biased selection is exercised too."""
    for name, param in model.named_parameters():
        is_router = ".router." in name or name.endswith(("mlp.gate.weight", "feed_forward.gate.weight"))
        if is_router and param.dim() == 2:
            param.normal_(0.0, 0.5, generator=generator)
    for name, buffer in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("expert_bias"):
            buffer.uniform_(-0.05, 0.05, generator=generator)
    for module in model.modules():
        # JetMoe's output biases start at zero; make them visible to the comparison.
        if type(module).__name__ in ("JetMoeMoE", "JetMoeMoA"):
            module.bias.normal_(0.0, 0.02, generator=generator)


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
