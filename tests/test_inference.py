"""for_inference / for_training: greedy generation through fastmoe's patched forwards and its decode path
(fastmoe.generation: static cache, sliding layers as ring buffers, masks and positions built on the device) gives
exactly the tokens plain transformers + peft gives with the same adapter, for every family, left-padded; for_training
switches back."""

import pytest
import torch
import transformers.generation.utils
from fastmoe.kernels.dispatch import reference_only
from peft import LoraConfig, get_peft_model
from testing_utils import randomize_lora, rel_err
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache

from fastmoe import FastModel, generation, models

FAMILIES = ("afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss")
PROMPTS = ["<|user|>What is a mixture of experts?\n<|assistant|>", "<|user|>Hi\n<|assistant|>"]
NEW_TOKENS = 12


def lora_kwargs(model_type: str) -> dict:
    """The family's default targets, experts included. JetMoe takes scaling 1: without QK norm, larger random
    adapters saturate its attention."""
    family = models.family(model_type)
    return {"r": 4, "lora_alpha": 4 if model_type == "jetmoe" else 8,
            "target_modules": list(family.lora_target_modules),
            "target_parameters": list(family.lora_target_parameters) or None}


def prompts(tokenizer) -> dict:
    """A batch of two prompts of different lengths, left-padded as for generation."""
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][1] == 0).any(), "the second prompt should be padded"
    return batch


@torch.no_grad()
def greedy(model, batch: dict) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


def adapted(checkpoint, model_type: str, **load_kwargs):
    """A FastModel with the family's default adapter, drawn at random (peft starts B at zero)."""
    model, _ = FastModel.from_pretrained(str(checkpoint), max_seq_length=128, **load_kwargs)
    model = FastModel.get_peft_model(model, use_gradient_checkpointing=False, **lora_kwargs(model_type))
    randomize_lora(model)
    return model


@torch.no_grad()
def scored(model, batch: dict, new_tokens: int, **kwargs):
    """Greedy generate with its sequences and per-step scores."""
    return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


def assert_same_decoding(got, expected, tolerance: float) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    assert rel_err(torch.stack(got.scores), torch.stack(expected.scores)) < tolerance


def assert_same_greedy_decoding_up_to_a_tie(got, expected, tolerance: float) -> None:
    """Two bf16 implementations (different kernels): the same tokens with scores within `tolerance` (relative error),
    step by step, until a step where some row's two choices were tied within that noise in the expected scores (the
    gap between them at most `tolerance` times the row's root-mean-square score, the per-score error the relative
    tolerance allows); after it the continuations may differ."""
    def finite(scores: torch.Tensor) -> torch.Tensor:  # tokens a logits processor ruled out (-inf) count as 0
        return scores.float().nan_to_num(neginf=0.0)

    new_tokens = len(expected.scores)
    got_tokens, expected_tokens = got.sequences[:, -new_tokens:], expected.sequences[:, -new_tokens:]
    for step in range(new_tokens):
        assert torch.equal(torch.isinf(got.scores[step]), torch.isinf(expected.scores[step])), f"step {step}"
        different = (got_tokens[:, step] != expected_tokens[:, step]).nonzero().flatten().tolist()
        for row in different:
            scores = finite(expected.scores[step][row])
            gap = scores[expected_tokens[row, step]] - scores[got_tokens[row, step]]
            assert gap <= tolerance * scores.square().mean().sqrt(), f"step {step}, row {row}: not a tie ({gap:.4f})"
        if different:
            return
        assert rel_err(finite(got.scores[step]), finite(expected.scores[step])) < tolerance, f"step {step}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generation_matches_transformers_with_the_same_adapter(tiny_checkpoint, model_type):
    checkpoint = tiny_checkpoint(model_type)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = get_peft_model(reference, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(model_type)))
    randomize_lora(reference)
    reference.eval()
    batch = prompts(AutoTokenizer.from_pretrained(checkpoint))
    expected = greedy(reference, batch)

    model = FastModel.for_inference(adapted(checkpoint, model_type, dtype=torch.float32))
    # 13 forwards under Triton's interpreter take 50-120 s a family (they pass there too): they run the ops' PyTorch
    # references here, which tests/models and tests/kernels compare the Triton kernels with.
    decode = model.get_base_model().forward
    with reference_only():
        generated = greedy(model, batch)

    assert generated.shape == (2, NEW_TOKENS)
    assert torch.equal(generated, expected)
    assert decode.decode_steps == NEW_TOKENS - 1  # every token after the prompt's came through fastmoe's decode step


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe"])
def test_decode_cache_grows_past_its_capacity_and_wraps_its_rings_with_the_same_tokens(tiny_checkpoint, model_type,
                                                                                     monkeypatch):
    """Capacity in steps of 16 positions, a left-padded prompt batch of 20, 20 new tokens: the full-attention
    buffers start at 32 and grow to 48 (contents copied), AFMoE's sliding layers (window 6) wrap their rings several
    times, LFM2's convolution states move along, and a second generate call reuses the first one's buffers. Beam
    search reorders the cache's rows."""
    monkeypatch.setattr(generation, "CAPACITY_STEP", 16)
    checkpoint = tiny_checkpoint(model_type)
    batch = prompts(AutoTokenizer.from_pretrained(checkpoint))
    assert batch["input_ids"].shape[1] == 20
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    FastModel.for_inference(model)

    def run(m, **kwargs):
        with torch.no_grad():
            return m.generate(**batch, max_new_tokens=20, **kwargs)

    expected, expected_beams = run(reference, do_sample=False), run(reference, num_beams=3, do_sample=False)
    with reference_only():
        first, second = run(model, do_sample=False), run(model, do_sample=False)
        beams = run(model, num_beams=3, do_sample=False)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert torch.equal(beams, expected_beams)
    assert sorted(model.forward.buffers) == [(2, 32), (2, 48), (6, 32), (6, 48)]


@pytest.mark.parametrize("model_type", ["afmoe", "jetmoe"])
def test_4bit_decoding_gives_the_tokens_of_transformers_cache(tiny_checkpoint, model_type):
    """load_in_4bit (bitsandbytes Linear layers, NF4 experts) with a random adapter, left-padded: the decode path's
    tokens and scores are those of the same model decoding with transformers' DynamicCache."""
    checkpoint = tiny_checkpoint(model_type)
    batch = prompts(AutoTokenizer.from_pretrained(checkpoint))
    model = adapted(checkpoint, model_type, dtype=torch.float32, load_in_4bit=True)
    FastModel.for_inference(model)
    with reference_only():
        got = scored(model, batch, NEW_TOKENS)
        assert model.get_base_model().forward.decode_steps == NEW_TOKENS - 1
        FastModel.for_training(model)
        model.eval()
        expected = scored(model, batch, NEW_TOKENS, use_cache=True)
    assert_same_decoding(got, expected, 1e-5)


def test_prefills_fastmoe_does_not_take_over_keep_transformers_cache(tiny_checkpoint, kernel_references):
    """Hidden states requested: the cache stays transformers' DynamicCache, and the tokens are transformers'."""
    checkpoint = tiny_checkpoint("cohere")
    batch = prompts(AutoTokenizer.from_pretrained(checkpoint))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    FastModel.for_inference(model)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, output_hidden_states=True,
                             return_dict_in_generate=True)
        expected = reference.generate(**batch, max_new_tokens=4, do_sample=False)
    assert type(out.past_key_values) is DynamicCache
    assert model.forward.decode_steps == 0
    assert torch.equal(out.sequences, expected)


def test_for_training_keeps_the_decode_path_for_the_next_for_inference(tiny_checkpoint):
    """An RL loop (generate, train, generate): the second generate reuses the first one's buffers (and on CUDA its
    graphs and casts) with the adapter as the optimizer left it, and gives transformers' tokens; parameters replaced
    since (an adapter loaded) start the buffers over; keep_decode_graphs=False frees everything; a copy of the model
    decodes from scratch."""
    import copy

    checkpoint = tiny_checkpoint("cohere")
    batch = prompts(AutoTokenizer.from_pretrained(checkpoint))
    model = adapted(checkpoint, "cohere", dtype=torch.float32)
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    with reference_only():  # the ops' PyTorch references: this test is about the decode path's state
        decode = FastModel.for_inference(model).get_base_model().forward
        scored(model, batch, NEW_TOKENS)
        buffers = dict(decode.buffers)
        assert buffers

        FastModel.for_training(model)
        with torch.no_grad():
            for p in lora:
                p.add_(torch.randn_like(p), alpha=0.5 * p.std().item())  # an optimizer step, in place
        assert FastModel.for_inference(model).get_base_model().forward is decode
        after = scored(model, batch, NEW_TOKENS)
        assert decode.buffers == buffers  # the same DecodeBuffers objects: nothing made again
        FastModel.for_training(model)
        model.eval()
        assert_same_decoding(after, scored(model, batch, NEW_TOKENS, use_cache=True), 1e-5)

        with torch.no_grad():
            lora[0].data = lora[0].data.clone()  # the parameter moved
        FastModel.for_inference(model)
        scored(model, batch, NEW_TOKENS)
        assert decode.buffers.keys() == buffers.keys() and decode.buffers != buffers
        copied = copy.deepcopy(model)
        assert copied.get_base_model().forward is not decode and not copied.get_base_model().forward.buffers

        FastModel.for_training(model, keep_decode_graphs=False)
        assert FastModel.for_inference(model).get_base_model().forward is not decode


def test_for_training_switches_back(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4)
    trainable = [p for p in model.parameters() if p.requires_grad]

    assert FastModel.for_inference(model) is model
    assert not model.training and model.get_base_model().config.use_cache is True
    assert isinstance(model.get_base_model().forward, generation.DecodeForward)
    assert FastModel.for_training(model) is model
    assert "forward" not in vars(model.get_base_model())
    assert model.training and all(module.training for module in model.modules())
    assert model.get_base_model().config.use_cache is False
    assert trainable and all(p.requires_grad for p in trainable)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_fp32_greedy_generation_on_gpu_matches_transformers_for_32_tokens(tiny_checkpoint, model_type):
    """The GPU kernels of the decode step (attention over the buffers, few-rows LoRA linears, experts with LoRA in
    the tile, graphs) against plain transformers, in fp32, where both are exact enough for the same 32 tokens. (In
    bf16 these tiny random models move their logits by ~10% from bf16 rounding alone, so that greedy paths part at
    near ties; the bf16 tests compare fastmoe's paths with each other.)"""
    checkpoint = tiny_checkpoint(model_type)
    batch = {k: v.cuda() for k, v in prompts(AutoTokenizer.from_pretrained(checkpoint)).items()}

    def generate_32(model):
        model.eval()
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=32, min_new_tokens=32, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda()
    expected = generate_32(reference)
    del reference
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=128)
    generated = generate_32(FastModel.for_inference(model.cuda()))
    assert model.forward.decode_steps == 31 and any(b.graph is not None for b in model.forward.buffers.values())
    assert torch.equal(generated.sequences, expected.sequences)
    finite = [s.nan_to_num(neginf=0.0) for s in (torch.stack(generated.scores), torch.stack(expected.scores))]
    assert rel_err(*finite) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["bf16", "4bit"])
@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe", "qwen3_moe", "jetmoe", "cohere", "mixtral"])
def test_decode_steps_replayed_from_cuda_graphs_equal_the_eager_decode_steps(tiny_checkpoint, model_type,
                                                                            load_in_4bit):
    """bf16 with a random adapter, left-padded: the graphed decode step gives the eager one's tokens and scores, and
    the graphs were captured (no fallback)."""
    checkpoint = tiny_checkpoint(model_type)
    batch = {k: v.cuda() for k, v in prompts(AutoTokenizer.from_pretrained(checkpoint)).items()}
    model = adapted(checkpoint, model_type, dtype=torch.bfloat16, load_in_4bit=load_in_4bit, device_map={"": 0})
    eager = scored(FastModel.for_inference(model, use_cuda_graphs=False), batch, 24)
    graphed = scored(FastModel.for_inference(model, use_cuda_graphs=True), batch, 24)
    decode = model.get_base_model().forward
    assert decode.use_cuda_graphs and any(b.graph is not None for b in decode.buffers.values())
    assert_same_decoding(graphed, eager, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_decoding_after_an_adapter_update_uses_the_new_adapter(tiny_checkpoint):
    """RL between generations: an optimizer step changes the float32 LoRA factors in place; the next generate call
    (its captured graphs and its reused bf16 casts of the factors) decodes with the new adapter: as a fresh decode
    path does (new casts, new graphs), and as transformers' own cache does up to bf16's ties."""
    checkpoint = tiny_checkpoint("afmoe")
    batch = {k: v.cuda() for k, v in prompts(AutoTokenizer.from_pretrained(checkpoint)).items()}
    model = adapted(checkpoint, "afmoe", dtype=torch.bfloat16, device_map={"": 0})
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    assert lora and all(p.dtype == torch.float32 for p in lora)

    before = scored(FastModel.for_inference(model), batch, 24)
    with torch.no_grad():
        for p in lora:
            p.add_(torch.randn_like(p), alpha=0.5 * p.std().item())
    after = scored(model, batch, 24)
    decode = model.get_base_model().forward
    assert decode.use_cuda_graphs and len(decode.buffers) == 1
    FastModel.for_training(model)
    fresh = scored(FastModel.for_inference(model), batch, 24)  # casts made and graphs captured from the new factors
    FastModel.for_training(model)
    model.eval()
    expected = scored(model, batch, 24, use_cache=True)  # transformers' DynamicCache, no graphs, no reused casts

    assert not torch.equal(after.sequences, before.sequences)
    assert_same_decoding(after, fresh, 1e-3)
    assert_same_greedy_decoding_up_to_a_tie(after, expected, 0.15)


def test_the_stop_check_waits_a_step_only_for_the_decode_cache_on_cuda(tiny_checkpoint):
    """transformers' DeferredStopCheck (mps only in transformers) is enabled on CUDA for fastmoe's decode cache, when
    generate does not return the cache; every other case keeps transformers' answer."""
    stop_check = transformers.generation.utils.DeferredStopCheck
    FastModel.for_inference(adapted(tiny_checkpoint("afmoe"), "afmoe", dtype=torch.float32))
    decode_cache = generation.DecodeCache.__new__(generation.DecodeCache)  # only its type is looked at
    cuda, mps = torch.device("cuda"), torch.device("mps")
    assert stop_check.is_supported(cuda, decode_cache, False, False)
    assert not stop_check.is_supported(cuda, decode_cache, True, False)  # returned: it would have to be cropped
    assert not stop_check.is_supported(cuda, decode_cache, False, True)  # assisted decoding
    assert not stop_check.is_supported(cuda, DynamicCache(), False, False)
    assert stop_check.is_supported(mps, DynamicCache(), False, False)
    assert not stop_check.is_supported(torch.device("cpu"), decode_cache, False, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deferred_stop_check_on_gpu_stops_at_the_same_token(tiny_checkpoint, monkeypatch):
    """With the stop check a step late, generation stopped by an end-of-sequence token returns exactly what the
    step-by-step check returns (the extra step undone), and both stop there."""
    checkpoint = tiny_checkpoint("afmoe")
    # One row (the unpadded prompt): the call ends when that row does.
    batch = {k: v[:1].cuda() for k, v in prompts(AutoTokenizer.from_pretrained(checkpoint)).items()}
    model = FastModel.for_inference(adapted(checkpoint, "afmoe", dtype=torch.bfloat16, device_map={"": 0}))
    with torch.no_grad():
        free = model.generate(**batch, max_new_tokens=24, do_sample=False)
    eos = int(free[0, batch["input_ids"].shape[1] + 9])  # it ends at its 10th new token (or earlier)
    made = []
    init = transformers.generation.utils.DeferredStopCheck.__init__
    monkeypatch.setattr(transformers.generation.utils.DeferredStopCheck, "__init__",
                        lambda self, *a, **k: made.append(1) or init(self, *a, **k))
    with torch.no_grad():
        deferred = model.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert made == [1]
        monkeypatch.setattr(transformers.generation.utils.DeferredStopCheck, "is_supported",
                            staticmethod(lambda *args, **kwargs: False))
        stepwise = model.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert made == [1] and torch.equal(deferred, stepwise)
    assert deferred.shape[1] < free.shape[1]
