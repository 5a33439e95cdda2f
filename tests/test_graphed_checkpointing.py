"""Graphed checkpointing (fastmoe.graphed_checkpointing): each decoder layer's forward and recompute + backward run
as one autograd Function whose two bodies are captured as CUDA graphs.

On the CPU the same Function runs without capturing (`GraphedCheckpoint(capture=False)`): the tests check that it
is exactly checkpointing (losses and every LoRA gradient equal torch's checkpoint), when a signature is captured
and when a call takes the fallback. The GPU tests check the captured graphs against eager checkpointing."""

import contextlib
import functools
import math

import pytest
import torch
from testing_utils import RecordOps, batch_with_padding, randomize_lora, rel_err

import fastmoe
from fastmoe import FastModel, kept_attention, padding_free
from fastmoe import sliding_window_attention as swa
from fastmoe.checkpointing import set_checkpointing_mode
from fastmoe.graphed_checkpointing import GraphedCheckpoint, capture_failure_reason, layer_of, standard_checkpoint
from fastmoe.kernels.dispatch import reference_only


@pytest.fixture(autouse=True)
def _references_on_one_thread():
    """What the CPU tests check is the checkpointing; the ops' PyTorch references (the Triton kernels are compared
    with them in tests/kernels and tests/models) keep them quick, and these small matmuls are faster unsplit. On a
    GPU the kernels run: the graphs capture them (the references sync with the host, which no graph can hold)."""
    if torch.cuda.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with reference_only():
        yield
    torch.set_num_threads(threads)


def lora_model(checkpoint, dtype=torch.float32):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=dtype, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora(model)
    return FastModel.for_training(model)


def decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.get_base_model().model.layers)


def use_checkpoint_function(model, function) -> None:
    for layer in decoder_layers(model):
        layer._gradient_checkpointing_func = function


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class CountingFallback:
    """torch's checkpoint, counting the calls that took it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, function, *args, **kwargs):
        self.calls += 1
        return standard_checkpoint(function, *args, **kwargs)


def assert_graph_steps_equal(model, batch, reference, offload_inputs: bool = False) -> GraphedCheckpoint:
    """Three steps through GraphedCheckpoint (capture off): the first takes the fallback, the next two the Function;
    each step's loss and every LoRA gradient equal `reference` (torch's checkpoint on the same weights)."""
    fallback = CountingFallback()
    graphed = GraphedCheckpoint(fallback=fallback, capture=False, offload_inputs=offload_inputs)
    use_checkpoint_function(model, graphed)
    layers = len(decoder_layers(model))
    for step in range(3):
        loss, grads = loss_and_grads(model, batch)
        assert fallback.calls == layers, f"step {step}: only the first step takes the fallback"
        assert rel_err(loss, reference[0]) < 1e-6
        for name, grad in grads.items():
            assert rel_err(grad, reference[1][name]) < 1e-5, name
    return graphed


def assert_two_forwards_before_backwards_equal(model, batch, graphed) -> None:
    """Two forwards before their backwards (the second replaces what the first kept or offloaded): every LoRA gradient
    equals torch's checkpoint's."""

    def two_forwards(function):
        use_checkpoint_function(model, function)
        model.zero_grad(set_to_none=True)
        second = batch_with_padding(model.config.vocab_size, seed=4, seq=batch["input_ids"].shape[1])
        (model(**batch).loss + 0.5 * model(**second).loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected = two_forwards(standard_checkpoint)
    for name, grad in two_forwards(graphed).items():
        assert rel_err(grad, expected[name]) < 1e-5, name


FAMILIES = ["afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_graph_path_equals_torch_checkpoint(tiny_checkpoint, model_type):
    """Three steps: the first takes torch's checkpoint, the next two the Function (capture off on the CPU). Loss and
    every LoRA gradient equal those of torch's checkpoint on the same weights."""
    model = lora_model(tiny_checkpoint(model_type))
    batch = batch_with_padding(model.config.vocab_size, seed=3)
    use_checkpoint_function(model, standard_checkpoint)
    reference = loss_and_grads(model, batch)

    graphed = assert_graph_steps_equal(model, batch, reference)
    assert len(graphed.graphs) == len(decoder_layers(model))
    # Layers of different signatures (AFMoE's dense and MoE layers, its sliding and full attention) share the input,
    # output and gradient buffers where those have the same layout.
    signatures = list(graphed.buffers.values())
    assert len({id(buffers.inputs[0]) for buffers in signatures}) == 1
    assert len({id(buffers.outputs[0]) for buffers in signatures}) == 1
    if model_type == "afmoe":
        assert len(signatures) > 1
    # The position ids every layer receives are copied once, for all layers and signatures (one comparison a step).
    positions = torch.arange(batch["input_ids"].shape[1])[None]
    position_copies = {id(v) for g in graphed.graphs.values() for v in g.control_values
                       if v.shape == positions.shape and torch.equal(v, positions)}
    assert len(position_copies) == 1


def test_gradient_accumulation_adds_into_grad(tiny_checkpoint):
    model = lora_model(tiny_checkpoint("afmoe"))
    batches = [batch_with_padding(model.config.vocab_size, seed=s) for s in (4, 5)]
    use_checkpoint_function(model, standard_checkpoint)
    model.zero_grad(set_to_none=True)
    for batch in batches:
        model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    graphed = GraphedCheckpoint(capture=False)
    use_checkpoint_function(model, graphed)
    for _ in range(2):  # the second round runs every layer through the Function
        model.zero_grad(set_to_none=True)
        for batch in batches:
            model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert rel_err(param.grad, expected[name]) < 1e-5, name


def is_cast(func, args, kwargs) -> bool:
    """float32 -> bf16 copies: one tensor at a time (aten._to_copy) or many at once (aten._foreach_copy_)."""
    return (func is torch.ops.aten._foreach_copy_.default
            or func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
            and kwargs.get("dtype") == torch.bfloat16)


def single_and_multi(record: RecordOps) -> tuple[int, int]:
    multi = sum(func is torch.ops.aten._foreach_copy_.default for func, *_ in record.calls)
    return len(record.calls) - multi, multi


@pytest.mark.parametrize("model_type", ["afmoe", "jetmoe"])
def test_each_body_casts_the_layers_lora_factors_at_once(tiny_checkpoint, model_type, monkeypatch):
    """bf16 activations, float32 LoRA factors: each layer's forward and its recompute + backward cast the layer's
    factors by one multi-tensor copy, and the ops take views of those casts: the same losses and gradients, bit for
    bit, as casting where each op needs a factor."""
    model = lora_model(tiny_checkpoint(model_type), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    batch = batch_with_padding(model.config.vocab_size, seed=3)
    layers = len(decoder_layers(model))

    def steps(graphed):
        use_checkpoint_function(model, graphed)
        results = [loss_and_grads(model, batch) for _ in range(2)]  # the second runs every layer through the Function
        with RecordOps(is_cast) as casts:
            loss_and_grads(model, batch)
        return results[-1], single_and_multi(casts)

    (loss, grads), counts = steps(GraphedCheckpoint(capture=False))
    assert counts[1] == 2 * layers
    with monkeypatch.context() as patched:
        patched.setattr("fastmoe.graphed_checkpointing._LayerGraphs._casts", lambda self: contextlib.nullcontext())
        (ref_loss, ref_grads), ref_counts = steps(GraphedCheckpoint(capture=False))
    assert ref_counts[1] == 0 and counts[0] < ref_counts[0] - 2 * layers
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


def test_changed_mask_adapter_state_or_weights_leave_the_graphs(tiny_checkpoint):
    """Control values (the attention mask) are compared with the captured ones; a disabled adapter is another
    signature; a parameter moved to new memory drops the layer's graphs."""
    model = lora_model(tiny_checkpoint("afmoe"))
    batch = batch_with_padding(model.config.vocab_size, seed=6)
    fallback = CountingFallback()
    graphed = GraphedCheckpoint(fallback=fallback, capture=False)
    use_checkpoint_function(model, graphed)
    layers = len(decoder_layers(model))
    for _ in range(2):
        loss_and_grads(model, batch)
    assert fallback.calls == layers and len(graphed.graphs) == layers

    other_padding = dict(batch)
    other_padding["attention_mask"] = batch["attention_mask"].clone()
    other_padding["attention_mask"][0, -2:] = 0
    other_padding["labels"] = batch["labels"].clone()
    other_padding["labels"][0, -2:] = -100
    use_checkpoint_function(model, standard_checkpoint)
    expected = loss_and_grads(model, other_padding)
    use_checkpoint_function(model, graphed)
    before = fallback.calls
    loss, grads = loss_and_grads(model, other_padding)
    assert fallback.calls == before + layers, "a different mask must not replay the captured layers"
    assert rel_err(loss, expected[0]) < 1e-6

    before = fallback.calls
    with model.disable_adapter():
        model(**batch).loss.backward()
    assert fallback.calls == before + layers, "adapters off is a new signature, seen for the first time"

    layer = decoder_layers(model)[0]
    stale = {key: graphs for key, graphs in graphed.graphs.items() if key[0] == id(layer)}
    lora_a = next(p for n, p in layer.named_parameters() if "lora_A" in n)
    lora_a.data = lora_a.data.clone()
    loss_and_grads(model, batch)
    for key, graphs in stale.items():
        assert graphed.graphs[key] is not graphs, "graphs over moved weights are captured again"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_router_logits_for_the_aux_loss_are_recorded_through_the_graphs(tiny_checkpoint, model_type):
    """trl's SFTTrainer asks for router logits at its defaults on Qwen3-MoE, Mixtral and Qwen2-MoE (their configs have
    a router_aux_loss_coef): the graphed calls return them from their own collector, so the loss with the
    load-balancing term and every LoRA gradient (the aux loss's included) equal torch's checkpoint, and only the first
    step takes the fallback."""
    model = lora_model(tiny_checkpoint(model_type))
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.5  # large, so that a missing aux term or gradient shows
    batch = batch_with_padding(model.config.vocab_size, seed=4)
    use_checkpoint_function(model, standard_checkpoint)
    reference = loss_and_grads(model, batch)
    without_aux = model(**batch, output_router_logits=False).loss.detach()
    # The aux term moves the loss by ~1e-3, a thousand times the tolerance below.
    assert abs(reference[0] - without_aux) > 1e-3, "the aux loss is part of the compared loss"

    graphed = assert_graph_steps_equal(model, batch, reference)
    assert all(graphs.recorded_keys == ("router_logits",) for graphs in graphed.graphs.values())
    # Without a collector (no router logits asked for) the same layers take graphs of another signature.
    model(**batch, output_router_logits=False).loss.backward()
    model(**batch, output_router_logits=False).loss.backward()
    assert {graphs.recorded_keys for graphs in graphed.graphs.values()} == {("router_logits",), ()}


def test_recording_hidden_states_takes_the_fallback(tiny_checkpoint):
    """Hidden states are recorded from a layer's input too (the first entry): those calls take torch's checkpoint."""
    model = lora_model(tiny_checkpoint("mixtral"))
    batch = batch_with_padding(model.config.vocab_size, seed=4)
    fallback = CountingFallback()
    use_checkpoint_function(model, GraphedCheckpoint(fallback=fallback, capture=False))
    for _ in range(2):
        outputs = model(**batch, output_hidden_states=True)
        outputs.loss.backward()
    assert fallback.calls == 2 * len(decoder_layers(model))
    assert len(outputs.hidden_states) == len(decoder_layers(model)) + 1


def test_hooks_and_dropout_take_the_fallback(tiny_checkpoint):
    model = lora_model(tiny_checkpoint("afmoe"))
    batch = batch_with_padding(model.config.vocab_size, seed=7)
    fallback = CountingFallback()
    graphed = GraphedCheckpoint(fallback=fallback, capture=False)
    use_checkpoint_function(model, graphed)
    layer = decoder_layers(model)[0]
    handle = layer.mlp.register_forward_hook(lambda *args: None)
    for _ in range(2):
        loss_and_grads(model, batch)
    assert fallback.calls == 2 * 1 + len(decoder_layers(model)) - 1
    handle.remove()
    assert not any(key[0] == id(layer) for key in graphed.graphs)

    dropout = torch.nn.Dropout(0.1)
    layer.mlp.add_module("extra_dropout", dropout)
    before = fallback.calls
    loss_and_grads(model, batch)
    assert fallback.calls > before


def test_shapes_are_capped_not_layer_kinds():
    """Signatures of at most max_shapes hidden-state shapes are followed; layers of other kinds (here, other
    parameters) called with a shape already followed are followed too."""
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False)]
    graphed = GraphedCheckpoint(max_shapes=2, capture=False)

    def layer_call(layer, rows):
        x = torch.randn(rows, 4, requires_grad=True)
        return graphed(functools.partial(torch.nn.Module.__call__, layer), x)

    for _ in range(2):
        for rows in (1, 2, 3):
            for layer in layers:
                layer_call(layer, rows).sum().backward()
    assert graphed.seen_shapes == {(1, 4), (2, 4)}
    followed = {signature for signature in graphed.seen if signature[1][0][0] in graphed.seen_shapes}
    assert len(followed) == 4 and {key[1] for key in graphed.graphs} == followed


def test_a_shape_seen_once_takes_no_place():
    """With data of varied lengths the first batch's length may never come back: a shape takes one of the max_shapes
    places when a layer is called with it a second time, so an outlier first leaves the place to a length that
    recurs."""
    layer = torch.nn.Linear(4, 4)
    graphed = GraphedCheckpoint(max_shapes=1, capture=False)

    def step(rows):
        x = torch.randn(rows, 4, requires_grad=True)
        graphed(functools.partial(torch.nn.Module.__call__, layer), x).sum().backward()

    step(5)  # the outlier
    assert graphed.seen_shapes == set() and graphed.row_tokens_for_graphs(3) == 3
    step(3)
    step(3)
    assert graphed.seen_shapes == {(3, 4)} and [key[1][1][0][0] for key in graphed.graphs] == [(3, 4)]
    step(5)
    step(5)  # no place left
    assert graphed.seen_shapes == {(3, 4)} and len(graphed.graphs) == 1


def test_capture_failures_name_the_live_loss_as_the_usual_cause():
    failed = capture_failure_reason(RuntimeError("CUDA error: operation failed due to a previous error during capture\n"
                                                 "Search for `cudaErrorStreamCaptureInvalidated'"))
    assert "\n" not in failed and failed.startswith("RuntimeError: CUDA error") and "`del loss`" in failed
    assert capture_failure_reason(ValueError("no graph here")) == "ValueError: no graph here"


def test_layer_of_reads_both_transformers_call_forms():
    layer = torch.nn.Linear(2, 2)
    assert layer_of(functools.partial(torch.nn.Module.__call__, layer, x=1)) is layer  # 5.18+: partial(forward, self)
    assert layer_of(functools.partial(layer.__call__, x=1)) is layer  # 5.17: partial(super().__call__)
    assert layer_of(lambda: None) is None


def test_trainer_enabling_checkpointing_keeps_fastmoe_mode(tiny_checkpoint, tmp_path):
    """trl's SFTConfig turns checkpointing on and transformers' Trainer hands torch's checkpoint to every layer; the
    model's mode (here host offload, which runs on the CPU) must survive that."""
    import trl
    from datasets import Dataset

    from fastmoe.offloaded_checkpointing import checkpoint_with_offloaded_inputs

    model, tokenizer = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32,
                                                 max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="fastmoe")
    dataset = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9, 10]] * 4})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                         report_to=[], save_strategy="no", gradient_checkpointing=True)
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    trainer.train()
    assert all(layer._gradient_checkpointing_func is checkpoint_with_offloaded_inputs
               for layer in decoder_layers(model))


def test_other_checkpoint_functions_are_kept(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    set_checkpointing_mode(model, "offload")
    reentrant = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=reentrant)
    assert all(layer._gradient_checkpointing_func is reentrant for layer in model.model.layers)
    with pytest.raises(ValueError, match="checkpointing mode"):
        set_checkpointing_mode(model, "fast")


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", [*FAMILIES, "qwen3_moe-router-logits", "mixtral-router-logits",
                                        "qwen2_moe-router-logits"])
def test_captured_graphs_equal_eager_checkpointing_on_gpu(tiny_checkpoint, model_type):
    """The GPU kernels captured: three steps in fp32 (the first takes torch's checkpoint, the next two replay the
    graphs) give torch's checkpoint's loss and LoRA gradients; in bf16 the replays give what the same Function gives
    without capture (its second call: the first takes torch's checkpoint too). "-router-logits": with the
    load-balancing loss on, as trl's SFTTrainer sets it, its router logits recorded through the graphs.

    bf16 is not compared with torch's checkpoint: its first forward runs with autograd on, where the graphed forward
    runs without, and some kernels differ between the two (without autograd, the expert GEMMs at these few rows
    compute LoRA's thin product inside the tile: kernels/moe/experts.py); the next layers see other roundings, a tie
    between two experts can go the other way, and the tiny models' gradients then differ by 2-18% (H200,
    2026-12-04), while fp32 agrees to 1e-5."""
    model_type, _, recorded = model_type.partition("-")

    def prepared(dtype):
        model, _ = FastModel.from_pretrained(str(tiny_checkpoint(model_type)), dtype=dtype, max_seq_length=64)
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
        randomize_lora(model)
        model.config.output_router_logits = bool(recorded)
        return model.cuda().train()

    batch = {k: v.cuda() for k, v in batch_with_padding(512, seed=8, seq=24).items()}
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 1e-3)):
        model = prepared(dtype)
        use_checkpoint_function(model, standard_checkpoint if dtype == torch.float32
                                else GraphedCheckpoint(capture=False))
        reference = [loss_and_grads(model, batch) for _ in range(2)][-1]
        graphed = GraphedCheckpoint()
        use_checkpoint_function(model, graphed)
        for step in range(3):
            loss, grads = loss_and_grads(model, batch)
            if step == 0 and dtype == torch.bfloat16:
                continue  # torch's checkpoint: the graphs are captured on a signature's second call
            assert rel_err(loss, reference[0]) < tolerance
            for name, grad in grads.items():
                assert rel_err(grad, reference[1][name]) < tolerance, (dtype, name)
        assert not graphed.ungraphable, graphed.ungraphable
        assert all(g.forward_graph is not None and g.backward_graph is not None for g in graphed.graphs.values())
        assert len(graphed.graphs) == len(decoder_layers(model))


def kept_reference_attention(calls: list):
    """flash_causal_attention's stand-in on the CPU: the reference, handed to kept_attention.run as a kernel whose
    forward is counted and whose backward differentiates the reference again."""

    def attention(query, key, value, layout, scale):
        def forward(keep_lse):
            calls.append(1)
            return swa.reference_flash_causal_attention(query, key, value, layout, scale), ()

        def backward(grad, q, k, v, output, aux):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = swa.reference_flash_causal_attention(*leaves, layout, scale)
                return torch.autograd.grad(out, leaves, grad)

        return kept_attention.run(query, key, value, forward, backward)

    return attention


def test_the_recompute_reuses_the_forwards_attention_outputs(tmp_path, tiny_tokenizer, monkeypatch):
    """AFMoE with its flash path's layouts on the CPU, the reference as the kernel: graphed steps run each attention
    layer's kernel forward once (torch's checkpoint: twice), with torch's checkpoint's loss and gradients; two
    forwards before their backwards (the second replaces what the first kept) still give the right gradients."""
    from fastmoe.builtin import build_tiny_checkpoint
    from fastmoe.models import afmoe

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model = lora_model(checkpoint)
    calls = []
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: True)
    monkeypatch.setattr(afmoe, "flash_causal_attention", kept_reference_attention(calls))
    batch = batch_with_padding(model.config.vocab_size, seed=3, seq=3 * model.config.sliding_window + 1)
    use_checkpoint_function(model, standard_checkpoint)
    reference = loss_and_grads(model, batch)
    layers = len(calls) // 2  # torch's checkpoint: the forward and the recompute
    assert layers == len(decoder_layers(model))

    graphed = assert_graph_steps_equal(model, batch, reference)
    calls.clear()
    loss_and_grads(model, batch)
    assert len(calls) == layers
    assert all(len(g.kept.entries) == 1 for g in graphed.graphs.values())
    assert_two_forwards_before_backwards_equal(model, batch, graphed)


def test_shapes_beyond_the_kept_attention_ones_recompute_attention(tmp_path, tiny_tokenizer, monkeypatch):
    """kept_attention_shapes: the graphs of the first shapes to come back keep their attention outputs, those of later
    shapes run attention's kernel again in the recompute (no kept outputs to hold per layer); both give torch's
    checkpoint's losses and gradients."""
    from fastmoe.builtin import build_tiny_checkpoint
    from fastmoe.models import afmoe

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model = lora_model(checkpoint)
    calls = []
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: True)
    monkeypatch.setattr(afmoe, "flash_causal_attention", kept_reference_attention(calls))
    window = model.config.sliding_window
    batches = [batch_with_padding(model.config.vocab_size, seed=3, seq=seq) for seq in (3 * window + 1, 2 * window)]
    use_checkpoint_function(model, standard_checkpoint)
    references = [loss_and_grads(model, batch) for batch in batches]
    graphed = GraphedCheckpoint(fallback=CountingFallback(), capture=False, max_shapes=2, kept_attention_shapes=1)
    use_checkpoint_function(model, graphed)
    for _ in range(2):
        for batch in batches:
            loss_and_grads(model, batch)
    assert len(graphed.seen_shapes) == 2 and len(graphed.kept_shapes) == 1
    layers = len(decoder_layers(model))
    for batch, reference, kept in zip(batches, references, (True, False)):
        calls.clear()
        loss, grads = loss_and_grads(model, batch)
        assert len(calls) == layers * (1 if kept else 2)  # a kept forward's output serves its recompute
        assert rel_err(loss, reference[0]) < 1e-6
        for name, grad in grads.items():
            assert rel_err(grad, reference[1][name]) < 1e-5, name
    for (_, signature), graphs in graphed.graphs.items():
        kept = signature[1][0][0] in graphed.kept_shapes
        assert graphs.keep_attention == kept and len(graphs.kept.entries) == kept


def test_a_shape_taking_a_dropped_kept_shapes_place_keeps_attention_only_up_to_its_tokens():
    """Once a shape whose graphs keep attention outputs gives its place up, a shape followed after it keeps them only
    if it has no more tokens than the kept shapes had: a length that takes a place by cost may be the long rows'
    catch-all, whose kept outputs would hold the most memory."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, hidden):
            return self.linear(hidden)

    layer = Layer()
    graphed = GraphedCheckpoint(capture=False, max_shapes=2, kept_attention_shapes=1)

    def steps(tokens, count=2):
        for _ in range(count):
            call = functools.partial(torch.nn.Module.__call__, layer)
            graphed(call, torch.randn(1, tokens, 4, requires_grad=True)).sum().backward()

    steps(16)
    steps(24)
    assert graphed.seen_shapes == {(1, 16, 4), (1, 24, 4)} and graphed.kept_shapes == {(1, 16, 4)}
    graphed._drop_shape((1, 16, 4))
    steps(32)  # followed in the free place, but longer than the dropped kept shape
    assert graphed.seen_shapes == {(1, 24, 4), (1, 32, 4)} and not graphed.kept_shapes
    graphed._drop_shape((1, 24, 4))
    steps(8)
    assert graphed.kept_shapes == {(1, 8, 4)}
    graphed.release()
    steps(40)
    assert graphed.kept_shapes == {(1, 40, 4)}  # a fresh start: the first shape to come back keeps them


def test_offloaded_inputs_keep_no_attention_outputs_and_recompute_attention(tmp_path, tiny_tokenizer, monkeypatch):
    """offload_inputs (use_gradient_checkpointing="fastmoe" with graphs): the same losses and gradients as torch's
    checkpoint, with the hidden states handed to HostInputs (on the CPU it keeps them where they are) and no
    attention output kept from the forward: the recompute runs attention's kernel again, as torch's checkpoint
    does. Two forwards before their backwards too."""
    from fastmoe import graphed_checkpointing
    from fastmoe.builtin import build_tiny_checkpoint
    from fastmoe.models import afmoe

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model = lora_model(checkpoint)
    calls = []
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: True)
    monkeypatch.setattr(afmoe, "flash_causal_attention", kept_reference_attention(calls))
    offloaded = []
    offload = graphed_checkpointing.offload_to_host
    monkeypatch.setattr(graphed_checkpointing, "offload_to_host", lambda t: offloaded.append(t) or offload(t))
    batch = batch_with_padding(model.config.vocab_size, seed=3, seq=3 * model.config.sliding_window + 1)
    use_checkpoint_function(model, standard_checkpoint)
    reference = loss_and_grads(model, batch)
    layers = len(decoder_layers(model))

    graphed = assert_graph_steps_equal(model, batch, reference, offload_inputs=True)
    assert len(offloaded) == 2 * layers and all(t.shape == offloaded[0].shape for t in offloaded)
    calls.clear()
    loss_and_grads(model, batch)
    assert len(calls) == 2 * layers  # the forward and the recompute
    assert all(not g.keep_attention and not g.kept.entries for g in graphed.graphs.values())
    assert_two_forwards_before_backwards_equal(model, batch, graphed)


def test_fastmoe_checkpointing_offloads_eagerly_without_cuda_and_through_graphs_with_it(tiny_checkpoint):
    """use_gradient_checkpointing="fastmoe": graphed checkpointing with the inputs in host memory where CUDA is
    (its fallback the eager offload, for long rows and first steps), the eager offload without CUDA or with
    cuda_graphs=False."""
    from fastmoe.offloaded_checkpointing import checkpoint_with_offloaded_inputs

    for cuda_graphs in (True, False):
        model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
        model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="fastmoe", cuda_graphs=cuda_graphs)
        functions = {layer._gradient_checkpointing_func for layer in decoder_layers(model)}
        assert len(functions) == 1
        (function,) = functions
        if cuda_graphs and torch.cuda.is_available():
            assert isinstance(function, GraphedCheckpoint) and function.host_inputs is not None
            assert function.fallback is checkpoint_with_offloaded_inputs
        else:
            assert function is checkpoint_with_offloaded_inputs


@pytest.mark.gpu
def test_offloaded_inputs_through_graphs_on_gpu(tmp_path, tiny_tokenizer, monkeypatch):
    """The captured graphs with offload_inputs: fp32 losses and LoRA gradients of torch's checkpoint at every step,
    each layer's hidden states in pinned host memory, all but the last layer's brought back ahead of its backward,
    and a step's peak below that of the graphs that keep inputs and attention outputs on the GPU."""
    from fastmoe import graphed_checkpointing
    from fastmoe.builtin import build_tiny_checkpoint

    layers, hidden, seq = 6, 512, 512
    checkpoint = build_tiny_checkpoint(
        "afmoe", tmp_path, tokenizer=tiny_tokenizer, num_hidden_layers=layers, hidden_size=hidden,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), max_position_embeddings=seq)
    batch = {k: v.cuda() for k, v in batch_with_padding(len(tiny_tokenizer), batch=2, seq=seq).items()}
    copies, prefetched = [], []
    offload, take = graphed_checkpointing.offload_to_host, graphed_checkpointing.HostInputs._prefetched
    monkeypatch.setattr(graphed_checkpointing, "offload_to_host", lambda t: copies.append(offload(t)) or copies[-1])
    monkeypatch.setattr(graphed_checkpointing.HostInputs, "_prefetched",
                        staticmethod(lambda copy: prefetched.append(copy) or take(copy)))

    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=seq)
    model = FastModel.get_peft_model(model.cuda(), r=4, lora_alpha=8)
    randomize_lora(model)
    FastModel.for_training(model)
    use_checkpoint_function(model, standard_checkpoint)
    reference = loss_and_grads(model, batch)
    peaks = {}
    for offload_inputs in (False, True):
        graphed = GraphedCheckpoint(offload_inputs=offload_inputs)
        use_checkpoint_function(model, graphed)
        for step in range(3):
            copies.clear(), prefetched.clear()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            loss, grads = loss_and_grads(model, batch)
            torch.cuda.synchronize()
            peaks[offload_inputs] = torch.cuda.max_memory_allocated() - start
            assert rel_err(loss, reference[0]) < 1e-4, (offload_inputs, step)
            for name, grad in grads.items():
                assert rel_err(grad, reference[1][name]) < 1e-4, (offload_inputs, step, name)
        assert all(g.forward_graph is not None and g.backward_graph is not None for g in graphed.graphs.values())
        if offload_inputs:
            assert len(copies) == layers and all(c.host.is_pinned() for c in copies)
            assert len(prefetched) == layers - 1
        graphed.release()
    assert peaks[True] < peaks[False], peaks


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size, seq", [(1, 2100), (2, 300)])
def test_kept_attention_outputs_equal_eager_checkpointing_on_gpu(tmp_path, tiny_tokenizer, batch_size, seq):
    """bf16, the attention kernels themselves: rows of 2,100 tokens (cuDNN in the full layers on Hopper, flash with
    its window in the sliding ones) and right-padded rows (flash's variable-length form). The recompute reuses the
    forward's outputs; loss and gradients equal torch's checkpoint."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=4096)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora(model)
    model.cuda().train()
    if batch_size == 1:
        input_ids = torch.randint(3, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(8))
        batch = {"input_ids": input_ids, "labels": input_ids}
    else:
        batch = batch_with_padding(model.config.vocab_size, seed=8, batch=batch_size, seq=seq)
    batch = {k: v.cuda() for k, v in batch.items()}
    use_checkpoint_function(model, standard_checkpoint)
    loss_and_grads(model, batch)  # a first batch of one row trains rounded up, the next of its length at its own
    reference = loss_and_grads(model, batch)
    graphed = GraphedCheckpoint()
    use_checkpoint_function(model, graphed)
    for _ in range(3):
        loss, grads = loss_and_grads(model, batch)
        assert rel_err(loss, reference[0]) < 1e-3
        for name, grad in grads.items():
            assert rel_err(grad, reference[1][name]) < 2e-2, name
    assert not graphed.ungraphable, graphed.ungraphable
    assert all(g.backward_graph is not None and len(g.kept.entries) == 1 for g in graphed.graphs.values())


def flash_gpu_model(tmp_path, tiny_tokenizer):
    """A bf16 LoRA AFMoE on the GPU whose padded batches take flash's variable-length kernels."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=4096)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora(model)
    return model.cuda().train()


def cuda_padded(vocab_size: int, lengths: tuple[int, ...], width: int, seed: int) -> dict:
    """right_padded's batch on the GPU."""
    return {k: v.cuda() for k, v in right_padded(vocab_size, lengths, seed, width).items()}


@pytest.mark.gpu
def test_batches_of_other_documents_replay_one_graph_on_gpu(tmp_path, tiny_tokenizer):
    """bf16, flash's variable-length kernels captured: padded batches of other documents (295 and 292 tokens, both
    rounded up to 384) replay the graphs the first captured, their offsets copied in; loss and gradients equal
    torch's checkpoint on each batch."""
    model = flash_gpu_model(tmp_path, tiny_tokenizer)
    graphed = model.get_base_model()._fastmoe_graphed_checkpoint
    batches = [cuda_padded(model.config.vocab_size, lengths, 200, seed)
               for seed, lengths in ((8, (200, 90, 5)), (9, (150, 1, 141)))]
    use_checkpoint_function(model, standard_checkpoint)
    references = [loss_and_grads(model, batch) for batch in batches]
    use_checkpoint_function(model, graphed)
    for step, index in enumerate([0, 0, 1, 0, 1]):
        loss, grads = loss_and_grads(model, batches[index])
        if step == 1:
            captured = len(graphed.graphs)
        assert rel_err(loss, references[index][0]) < 1e-3
        for name, grad in grads.items():
            assert rel_err(grad, references[index][1][name]) < 2e-2, name
    assert not graphed.ungraphable, graphed.ungraphable
    assert len(graphed.graphs) == captured == len(decoder_layers(model))
    assert all(g.backward_graph is not None for g in graphed.graphs.values())
    fastmoe.unpatch()


@pytest.mark.gpu
def test_a_length_taking_a_place_recaptures_in_the_shared_pool_on_gpu(tmp_path, tiny_tokenizer, monkeypatch):
    """bf16, graphs captured for real in the one pool all layers share: the only place taken by a 105-token batch
    (its row 112), a 200-token batch (224) runs eagerly until asked for a fifth time, then takes the place (the
    first batch's graphs dropped), is captured where they were and replayed; the first batch then pads up to 224 and
    replays those graphs. Every step's loss and gradients equal torch's checkpoint on that batch. Rows round to a
    quarter octave from the first."""
    monkeypatch.setattr(padding_free, "COARSE_ROUNDING_ROWS", 0)
    model = flash_gpu_model(tmp_path, tiny_tokenizer)
    batches = [cuda_padded(model.config.vocab_size, lengths, 100, seed)
               for seed, lengths in ((8, (60, 40, 5)), (9, (100, 90, 10)))]
    use_checkpoint_function(model, standard_checkpoint)
    references = [loss_and_grads(model, batch) for batch in batches]
    fallback = CountingFallback()
    graphed = GraphedCheckpoint(fallback=fallback, max_shapes=1)
    model.get_base_model().__dict__["_fastmoe_graphed_checkpoint"] = graphed
    use_checkpoint_function(model, graphed)
    layers = len(decoder_layers(model))
    for step, index in enumerate([0, 0] + [1] * 9 + [0, 1, 0]):
        loss, grads = loss_and_grads(model, batches[index])
        assert rel_err(loss, references[index][0]) < 1e-3, step
        for name, grad in grads.items():
            assert rel_err(grad, references[index][1][name]) < 2e-2, (step, name)
    assert fallback.calls == (1 + 5) * layers  # the first 105-token step, the 200-token steps before the capture
    assert [shape[1] for shape in graphed.seen_shapes] == [224]
    assert graphed.row_requests == pytest.approx({112: 4, 224: 10}, rel=0.02)  # requests weigh more as they come
    assert not graphed.ungraphable, graphed.ungraphable
    assert len(graphed.graphs) == layers and all(g.backward_graph is not None for g in graphed.graphs.values())
    fastmoe.unpatch()


@pytest.mark.gpu
def test_get_peft_model_and_trainer_use_graphs_on_gpu(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.bfloat16, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    assert all(isinstance(layer._gradient_checkpointing_func, GraphedCheckpoint) for layer in decoder_layers(model))
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(isinstance(layer._gradient_checkpointing_func, GraphedCheckpoint) for layer in decoder_layers(model))
    fastmoe.unpatch()


def test_long_calls_take_torch_checkpoint(tiny_checkpoint):
    """Above max_tokens (batch x seq) the layers run torch's checkpoint on every step: no signature is followed."""
    model = lora_model(tiny_checkpoint("lfm2_moe"))
    batch = batch_with_padding(model.config.vocab_size, seed=3)
    tokens = batch["input_ids"].numel()
    fallback = CountingFallback()
    use_checkpoint_function(model, GraphedCheckpoint(fallback=fallback, capture=False, max_tokens=tokens - 1))
    layers = len(decoder_layers(model))
    for step in range(2):
        loss_and_grads(model, batch)
        assert fallback.calls == (step + 1) * layers
    graphed = GraphedCheckpoint(fallback=fallback, capture=False, max_tokens=tokens)  # exactly at the limit: graphed
    use_checkpoint_function(model, graphed)
    for _ in range(2):
        loss_and_grads(model, batch)
    assert len(graphed.graphs) == layers


def flash_layout_model(checkpoint, monkeypatch) -> tuple[torch.nn.Module, list[int]]:
    """A LoRA AFMoE model whose packed rows take flash layouts on the CPU (its attention the reference on them), and
    the list every attention call appends its row's length to."""
    from fastmoe.models import afmoe

    model = lora_model(checkpoint)
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: True)
    rows = []
    attention = kept_reference_attention([])
    monkeypatch.setattr(afmoe, "flash_causal_attention", lambda q, *a: rows.append(q.shape[2]) or attention(q, *a))
    return model, rows


def right_padded(vocab_size: int, lengths: tuple[int, ...], seed: int, width: int = 20) -> dict:
    """Rows of `lengths` random tokens right-padded to `width`, padding out of the labels."""
    input_ids = torch.randint(3, vocab_size, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                labels=input_ids.masked_fill(attention_mask == 0, -100))


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_batches_of_other_documents_replay_one_signature(tmp_path, tiny_tokenizer, monkeypatch, kind):
    """Padding-free batches (fastmoe.padding_free) under graphed checkpointing: two padded batches with other row
    lengths (or trl's padding-free rows of those documents, with flash-attention's varlen arguments), whose tokens
    (29 and 30) round up to one length (32, the rest filler), run as packed rows of one shape with as many offsets,
    their position ids and document offsets copied in as data: the second batch replays the first one's signature
    (nothing new seen, no fallback), and each step's loss and every LoRA gradient equal torch's checkpoint on the
    unrounded row."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model, rows = flash_layout_model(checkpoint, monkeypatch)

    def padded(lengths, seed):
        batch = right_padded(model.config.vocab_size, lengths, seed)
        if kind == "padded":
            return batch
        input_ids, labels = batch["input_ids"], batch["labels"]
        keep = batch["attention_mask"].bool()  # as trl's padding-free collator packs the same documents
        offsets = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        labels[:, 0] = -100
        return dict(input_ids=input_ids[keep][None], labels=labels[keep][None],
                    position_ids=torch.cat([torch.arange(n) for n in lengths])[None], cu_seq_lens_q=offsets,
                    cu_seq_lens_k=offsets, max_length_q=max(lengths), max_length_k=max(lengths))

    batches = [padded((20, 6, 3), seed=1), padded((11, 1, 18), seed=2)]
    use_checkpoint_function(model, standard_checkpoint)
    references = [loss_and_grads(model, batch) for batch in batches]
    assert set(rows) == {29, 30}  # torch's checkpoint: no graphs, no filler

    fallback = CountingFallback()
    graphed = GraphedCheckpoint(fallback=fallback, capture=False)
    model.get_base_model().__dict__["_fastmoe_graphed_checkpoint"] = graphed  # as fastmoe.checkpointing keeps it
    use_checkpoint_function(model, graphed)
    layers = len(decoder_layers(model))
    rows.clear()
    for step, index in enumerate([0, 0, 1, 0]):
        loss, grads = loss_and_grads(model, batches[index])
        assert fallback.calls == layers, f"step {step}: only the first step takes the fallback"
        reference_loss, reference_grads = references[index]
        assert rel_err(loss, reference_loss) < 1e-6
        for name, grad in grads.items():
            assert rel_err(grad, reference_grads[name]) < 1e-5, name
    assert set(rows) == {32} and len(graphed.seen) == len({key[1] for key in graphed.graphs})
    assert len(graphed.graphs) == layers


def test_row_tokens_for_graphs_are_a_followed_length_or_one_with_room():
    """What padding-free rows are padded to (fastmoe.padding_free.filler_for_graphs): their own length while it is
    followed or a place is free; once the places are taken, the shortest followed length within PAD_UP_TO_GRAPHS
    times theirs; none beyond max_tokens or with no followed length near enough."""
    graphed = GraphedCheckpoint(max_shapes=2, capture=False, max_tokens=64)
    assert graphed.row_tokens_for_graphs(32) == 32 and graphed.row_tokens_for_graphs(65) is None
    graphed.seen_shapes |= {(1, 32, 8)}
    assert graphed.row_tokens_for_graphs(10) == 10  # a place is free
    graphed.seen_shapes |= {(1, 48, 8)}
    assert [graphed.row_tokens_for_graphs(t) for t in (32, 48)] == [32, 48]
    assert [graphed.row_tokens_for_graphs(t) for t in (16, 20, 40, 15, 56)] == [32, 32, 48, None, None]


def test_a_length_takes_the_place_of_the_followed_one_it_saves_most_against():
    """The first lengths to come back keep no place for good: once a length without one would have made the rows
    asked for so far cheaper (a graphed step GRAPHED_STEP_FIXED_TOKENS + its tokens, an eager one EAGER_STEP_COST times
    that) by more than PLACE_SWAP_STEPS eager steps of its own, it takes the place of the followed length whose loss
    costs least; that one's graphs and buffers go (its rows now pad up to the new length) and the length gets its place
    (its layers run eagerly once more, then capture)."""
    from fastmoe.graphed_checkpointing import EAGER_STEP_COST, GRAPHED_STEP_FIXED_TOKENS, PLACE_SWAP_STEPS

    graphed = GraphedCheckpoint(max_shapes=2, capture=False, max_tokens=64)
    for tokens in (32, 48, 32, 48):
        assert graphed.row_tokens_for_graphs(tokens) == tokens
    graphed.seen_shapes |= {(1, 32, 8), (1, 48, 8)}
    for tokens in (32, 32, 32):
        assert graphed.row_tokens_for_graphs(tokens) == 32
    other_signature = ("signature", (((1, 48, 8),),))
    graphed.seen[other_signature] = {1}
    graphed.graphs[(1, other_signature)] = object()
    # 56: beyond every followed length, so eager. Its n-th request: with 56 in 48's place, 48's two rows pad up to 56
    # (8 tokens more each) and n eager rows replay, which saves more than two eager steps of 56 from n = 5 on (in 32's
    # place, 32's five rows would pad up to 48: a smaller saving).
    fixed, eager = GRAPHED_STEP_FIXED_TOKENS, EAGER_STEP_COST
    saving = [n * (eager - 1) * (fixed + 56) - 2 * 8 for n in range(1, 8)]
    first = next(n for n, s in enumerate(saving, 1) if s > PLACE_SWAP_STEPS * eager * (fixed + 56))
    assert first == 5
    assert [graphed.row_tokens_for_graphs(56) for _ in range(first)] == [None] * (first - 1) + [56]
    assert graphed.seen_shapes == {(1, 32, 8)} and not graphed.graphs and not graphed.seen
    assert graphed.row_tokens_for_graphs(48) == 48  # a place is free again


def test_a_row_longer_than_every_followed_length_takes_a_place_for_the_long_rows_together():
    """Long rows each rare but together worth a place: the length they can all pad up to takes the place of a followed
    length whose rows pad up to another, where no long length's own requests would have earned one."""
    graphed = GraphedCheckpoint(max_shapes=2, capture=False, max_tokens=4096)
    for tokens in (1024, 1280, 1024, 1280):
        graphed.row_tokens_for_graphs(tokens)
    graphed.seen_shapes |= {(1, 1024, 8), (1, 1280, 8)}
    for _ in range(20):
        assert graphed.row_tokens_for_graphs(1024) == 1024
        assert graphed.row_tokens_for_graphs(1280) == 1280
    # Rows of 2,560, 3,072 and 3,584 tokens, each asked for once a round, nothing followed within twice them: eager,
    # until in the third round 3,584 (which all three pad up to) takes 1,024's place (1,024's rows pad up to 1,280;
    # 1,280's could not pad up to 3,584, more than twice theirs).
    results = [graphed.row_tokens_for_graphs(tokens) for _ in range(3) for tokens in (2560, 3072, 3584)]
    assert results == [None] * 8 + [3584]
    assert {shape[1] for shape in graphed.seen_shapes} == {1280}
    assert graphed.row_tokens_for_graphs(3584) == 3584  # a place is free: its own length, followed when it comes back
    graphed.seen_shapes |= {(1, 3584, 8)}
    assert [graphed.row_tokens_for_graphs(t) for t in (1024, 2560, 3072)] == [1280, 3584, 3584]


def test_a_shift_in_lengths_gives_the_new_length_a_place_within_a_half_life(monkeypatch):
    """Requests weigh less as they age (REQUESTS_HALF_LIFE): after 1,500 steps of 16-token rows the data shifts to
    40-token rows (no padding either way: eager until 40 takes the only place, 16's rows eager after). The new length
    takes the place in under a half-life of requests; counted without decay, the old rows' requests would hold it
    about three times as long."""
    from fastmoe import graphed_checkpointing

    def requests_until_the_place_is_taken(half_life: float) -> int:
        monkeypatch.setattr(graphed_checkpointing, "REQUESTS_HALF_LIFE", half_life)
        graphed = GraphedCheckpoint(max_shapes=1, capture=False, max_tokens=64)
        graphed.row_tokens_for_graphs(16)
        graphed.seen_shapes |= {(1, 16, 8)}
        for _ in range(1500):
            assert graphed.row_tokens_for_graphs(16) == 16
        for requests in range(1, 3000):
            if graphed.row_tokens_for_graphs(40) == 40:
                return requests
        raise AssertionError("40 never took the place")

    decayed = requests_until_the_place_is_taken(graphed_checkpointing.REQUESTS_HALF_LIFE)
    assert decayed < graphed_checkpointing.REQUESTS_HALF_LIFE
    assert requests_until_the_place_is_taken(math.inf) > 3 * decayed


def train_padded_batches(checkpoint, monkeypatch, lengths: list[tuple[int, ...]], order: list[int],
                         max_shapes: int) -> tuple[GraphedCheckpoint, int, set[int], int]:
    """Padded batches of rows of `lengths` (documents padded to 20), trained in `order` under graphed checkpointing
    (capture=False) with max_shapes places: each step's loss and LoRA gradients checked against torch's checkpoint on
    the unpadded rows (fp64: filler tokens change the order of fp32 sums). Returns the graphed checkpoint, its
    fallback's calls, the packed rows' lengths the attention saw, and the number of layers. Rows round to a quarter
    octave from the first (the lengths are the subject)."""
    monkeypatch.setattr(padding_free, "COARSE_ROUNDING_ROWS", 0)
    model, rows = flash_layout_model(checkpoint, monkeypatch)
    model.double()
    batches = [right_padded(model.config.vocab_size, row_lengths, seed) for seed, row_lengths in enumerate(lengths)]
    use_checkpoint_function(model, standard_checkpoint)
    references = [loss_and_grads(model, batch) for batch in batches]
    fallback = CountingFallback()
    graphed = GraphedCheckpoint(fallback=fallback, capture=False, max_shapes=max_shapes)
    model.get_base_model().__dict__["_fastmoe_graphed_checkpoint"] = graphed
    use_checkpoint_function(model, graphed)
    rows.clear()
    for step, index in enumerate(order):
        loss, grads = loss_and_grads(model, batches[index])
        reference_loss, reference_grads = references[index]
        assert rel_err(loss, reference_loss) < 1e-12, step
        for name, grad in grads.items():
            assert rel_err(grad, reference_grads[name]) < 1e-10, (step, name)
    return graphed, fallback.calls, set(rows), len(decoder_layers(model))


def test_a_length_without_a_place_is_padded_up_to_a_followed_one(tmp_path, tiny_tokenizer, monkeypatch):
    """Once every place is taken, a padded batch whose packed row (20 tokens) has no graphs of its own is padded up
    to the followed length (32) with filler, replays its graphs instead of running eager layers, and keeps torch's
    checkpoint's loss and LoRA gradients on the unpadded row."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    # both longest documents round up to 32 (the layouts' maximum length, part of the signature)
    graphed, fallback_calls, rows, layers = train_padded_batches(checkpoint, monkeypatch, [(20, 6, 3), (17, 2, 1)],
                                                                 [0, 0, 1, 1], max_shapes=1)
    assert fallback_calls == layers  # the first step only
    assert rows == {32} and len(graphed.graphs) == layers


def test_a_length_asked_for_often_replaces_the_first_followed_one_on_a_model(tmp_path, tiny_tokenizer, monkeypatch):
    """The only place taken by a 20-token row (two steps), a 32-token row (longer: no padding up) runs eagerly until
    asked for a fifth time, then takes the place (the 20-token rows then pad up to it): eager once more, captured,
    replayed; every step with torch's checkpoint's loss and gradients."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    graphed, fallback_calls, rows, layers = train_padded_batches(checkpoint, monkeypatch, [(10, 6, 3), (20, 6, 3)],
                                                                 [0, 0] + [1] * 9, max_shapes=1)
    assert fallback_calls == (1 + 5) * layers  # the first 20-token step, the 32-token steps before the capture
    assert rows == {20, 32} and [shape[1] for shape in graphed.seen_shapes] == [32]
    assert len(graphed.graphs) == layers and graphed.row_requests == pytest.approx({20: 2, 32: 9}, rel=0.02)
