"""Static-cache generation under torch.compile (transformers compiles the decode forward when generate is given a
static cache, as its test_generate_compile_model_forward_fullgraph does): fastmoe's patched forwards, an adapter
attached and for_inference on, compile as one graph, give the tokens and scores of the eager decode path, and a second
generate of new inputs of the same shapes compiles nothing again."""

import pytest
import torch
from fastmoe.kernels.dispatch import reference_only
from test_inference import adapted, prompts
from transformers import AutoTokenizer, CompileConfig

from fastmoe import FastModel

NEW_TOKENS = 5


def generate(model, batch: dict, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, use_cache=True, do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, output_scores=True, return_dict_in_generate=True, **kwargs)


def compiled_and_eager(model, first: dict, compile_all_devices: bool):
    """(compiled, eager) generations of `first` and of new inputs of the same shapes (the second prompt's tokens in
    reverse order, the same padding), the second compiled one under fail_on_recompile."""
    second = {"input_ids": first["input_ids"].flip(0), "attention_mask": first["attention_mask"].flip(0)}
    compile_config = CompileConfig(fullgraph=True, dynamic=False)  # a graph break or a dynamic shape is an error
    compile_config._compile_all_devices = compile_all_devices  # transformers compiles on CUDA only unless told
    torch.compiler.reset()
    with torch.compiler.set_stance("force_eager"):
        eager = [generate(model, batch) for batch in (first, second)]
    compiled = [generate(model, first, cache_implementation="static", compile_config=compile_config)]
    assert hasattr(model.get_base_model(), "_compiled_call") or hasattr(model, "_compiled_call")
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled.append(generate(model, second, cache_implementation="static", compile_config=compile_config))
    return compiled, eager


def assert_same_generations(compiled, eager, rtol: float, atol: float) -> None:
    for got, expected in zip(compiled, eager):
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.scores, expected.scores):
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a))
            assert torch.allclose(a[finite], b[finite], rtol=rtol, atol=atol)


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe"])
def test_static_cache_generation_compiles_once_as_one_graph_with_the_eager_tokens(tiny_checkpoint, model_type, tmp_path,
                                                                                  monkeypatch):
    # A cache of its own: inductor's CPU cache does not key its kernels on ATEN_CPU_CAPABILITY (a kernel built for
    # another instruction set on this machine would be loaded).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    checkpoint = tiny_checkpoint(model_type)
    model = FastModel.for_inference(adapted(checkpoint, model_type, dtype=torch.float32))
    # The ops' PyTorch references (their kernels' compile support: tests/kernels/test_custom_op.py): Triton's
    # interpreter under inductor would take minutes here.
    with reference_only():
        compiled, eager = compiled_and_eager(model, prompts(AutoTokenizer.from_pretrained(checkpoint)), True)
    assert_same_generations(compiled, eager, rtol=1e-4, atol=1e-5)


def test_static_cache_generation_compiles_with_the_kernels_in_the_interpreter(tiny_checkpoint, tmp_path, monkeypatch):
    """The same with fastmoe's Triton kernels (Triton's interpreter), custom ops in the compiled graph: none of their
    launches is traced (dynamo stopped at the few-rows projections' launch while they were)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    checkpoint = tiny_checkpoint("afmoe")
    model = FastModel.for_inference(adapted(checkpoint, "afmoe", dtype=torch.float32))
    compiled, eager = compiled_and_eager(model, prompts(AutoTokenizer.from_pretrained(checkpoint)), True)
    assert_same_generations(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe"])
def test_static_cache_generation_compiles_with_the_kernels_on_gpu(tiny_checkpoint, model_type):
    """The same with fastmoe's Triton kernels in the compiled graph, as custom ops (the experts' decoding forms among
    them: one token's GEMVs, LoRA inside the GEMM tiles). (transformers compiles no bitsandbytes 4-bit model.)"""
    checkpoint = tiny_checkpoint(model_type)
    model = FastModel.for_inference(adapted(checkpoint, model_type, dtype=torch.float32, device_map={"": 0}))
    first = {k: v.cuda() for k, v in prompts(AutoTokenizer.from_pretrained(checkpoint)).items()}
    compiled, eager = compiled_and_eager(model, first, False)
    assert_same_generations(compiled, eager, rtol=1e-3, atol=1e-4)
