"""Shared fixtures: tiny random checkpoints of every family, built once per session, and the comparison helpers
every model test uses."""

import os

import torch

# Without a GPU every Triton kernel runs in Triton's interpreter on the CPU. Triton reads this when kernels are
# defined, so it is set before anything imports fastmoe's kernels. (importing torch does not import triton.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def _patch_triton_language_once_per_launch() -> None:
    """Triton's interpreter patches the language modules a kernel's globals hold (triton.language, or
    triton.language.core for the language's own @jit functions such as tl.zeros) when the kernel launches, restores
    them when the launch ends, and patches them again on every call of a @jit function inside the kernel, walking
    every member of those modules (~2 ms a call) to re-patch what is patched already. fastmoe's kernels are built
    from small helpers, and that walk was about a fifth of the interpreted kernels' time. Here a launch patches each
    module once; the kernels compute the same bits. Left as it is when the interpreter's internals are not the ones
    this was written for (triton 3.9)."""
    try:
        import triton.language as tl
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    names = ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction")
    if not all(hasattr(interpreter, name) for name in names) or \
            "_patch_lang" not in interpreter.InterpretedFunction.__call__.__code__.co_names:
        return
    languages = (tl, tl.core)
    launch_state = {"running": False, "patched": set()}
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__

    def patch_lang_once(fn):
        used = {id(value) for value in fn.__globals__.values() if any(value is lang for lang in languages)}
        if launch_state["running"] and used <= launch_state["patched"]:
            return interpreter._LangPatchScope()  # nothing changed, nothing to restore
        launch_state["patched"] |= used
        return patch_lang(fn)

    def launch_patching_once(self, *args, **kwargs):
        launch_state["running"], launch_state["patched"] = True, set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            launch_state["running"], launch_state["patched"] = False, set()

    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch_patching_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_language_once_per_launch()

FAMILIES = ("afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_references():
    """On the CPU, every fastmoe op through its PyTorch reference instead of its interpreted Triton kernel: for tests
    whose subject is not the kernels (tests/kernels and tests/models compare those with the references) and which the
    interpreter makes slow, minutes of CI's time for some. On a GPU the kernels run."""
    if torch.cuda.is_available():
        yield
        return
    from fastmoe.kernels.dispatch import reference_only

    with reference_only():
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fastmoe.builtin import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """tiny_checkpoint(model_type) -> path of a random tiny checkpoint (cached for the session)."""
    from fastmoe.builtin import build_tiny_checkpoint

    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = build_tiny_checkpoint(
                model_type, tmp_path_factory.mktemp(model_type), seed=0, tokenizer=tiny_tokenizer)
        return cache[model_type]

    return get


@pytest.fixture(autouse=True)
def _restore_transformers():
    """Every test starts and ends with transformers unpatched, so tests cannot leak patches into each other."""
    import fastmoe

    fastmoe.unpatch()
    yield
    fastmoe.unpatch()
