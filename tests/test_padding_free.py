"""Right-padded training batches run padding-free (fastmoe/padding_free.py): the layers see one packed row of the
batch's real tokens, and the loss, the router load-balancing loss, trl's per-token fields and every LoRA gradient are
those of the padded batch under transformers' masks (fp32).

The packed row runs on the flash layouts, which need CUDA: as in test_sliding_window_attention, `flash_supports` is
switched on and the layouts' PyTorch reference stands in for the kernel; switched off, the same model takes
transformers' dense masks on the padded batch, the reference result."""

import pytest
import torch
from testing_utils import attention_kernel_caller, randomize_lora, rel_err

import fastmoe
from fastmoe import FastModel, trl_fused_head
from fastmoe import sliding_window_attention as swa
from fastmoe.kernels.linear_cross_entropy import shift_labels
from fastmoe.padding_free import pack_padded_rows

FAMILIES = ("afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss")
# The layout attention each family's forward calls, and the reference that stands in for it on the CPU.
LAYOUT_ATTENTION = {"gpt_oss": ("flash_causal_attention_with_sinks", swa.reference_flash_causal_attention_with_sinks)}
SEQ, LENGTHS = 13, (13, 5, 1)  # a full row, a padded one, a one-token one
# Under graphed checkpointing the packed row's 19 tokens round up to 24: a multiple of half the power of two below,
# as the first rows of a run do (fastmoe.padding_free.COARSE_ROUNDING_ROWS).
GRAPHED_ROW = 24
# Left padding before each row's tokens, as GRPO's left-padded prompts followed by right-padded completions.
LEFT = {"right": (0, 0, 0), "both": (0, 3, 12)}

# The subject is which tokens the layers see, not the kernels (tests/kernels, tests/models).
pytestmark = pytest.mark.usefixtures("kernel_references")


def padded_batch(vocab_size: int, labels_on_padding: bool = False, padding: str = "right") -> dict:
    """Rows of LENGTHS real tokens after LEFT[padding] pads, padded on the right to SEQ (pad id 0); each row's first
    tokens a prompt out of the labels; the padding's labels -100 unless `labels_on_padding` (labels copied from
    input_ids, pads included)."""
    input_ids = torch.randint(3, vocab_size, (len(LENGTHS), SEQ), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.zeros_like(input_ids)
    labels = input_ids.clone()
    for row, (left, length) in enumerate(zip(LEFT[padding], LENGTHS)):
        attention_mask[row, left:left + length] = 1
        labels[row, left:left + 3] = -100
    input_ids[attention_mask == 0] = 0
    if not labels_on_padding:
        labels[attention_mask == 0] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def lora_model(checkpoint, **load_kwargs):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64, **load_kwargs)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    randomize_lora(model)
    return model.train()


def layout_rows(monkeypatch, model_type: str) -> list[tuple[int, int]]:
    """Put the layouts' reference in for the family's flash kernel; returns the list of (rows, tokens) of the
    queries it is called with."""
    name, reference = LAYOUT_ATTENTION.get(model_type, ("flash_causal_attention", swa.reference_flash_causal_attention))
    module = attention_kernel_caller(model_type, name)
    calls = []
    monkeypatch.setattr(module, name, lambda query, *a: calls.append((query.shape[0], query.shape[2]))
                        or reference(query, *a))
    return calls


def loss_and_grads(model, batch, monkeypatch, layouts: bool, **call_kwargs):
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: layouts)
    model.zero_grad(set_to_none=True)
    out = model(**batch, **call_kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(out, grads, ref, ref_grads, tol=1e-5):
    assert rel_err(out.loss, ref.loss) < tol
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) < tol, name


@pytest.mark.parametrize("padding", ["right", "both"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_padded_batch_trains_as_one_packed_row(tiny_checkpoint, monkeypatch, model_type, padding):
    """The layers see one row of the 19 real tokens; loss and every LoRA gradient are the padded batch's."""
    model = lora_model(tiny_checkpoint(model_type))
    batch = padded_batch(model.config.vocab_size, padding=padding)
    rows = layout_rows(monkeypatch, model_type)
    out, grads = loss_and_grads(model, batch, monkeypatch, layouts=True)
    assert rows and set(rows) == {(1, sum(LENGTHS))}
    rows.clear()
    ref, ref_grads = loss_and_grads(model, batch, monkeypatch, layouts=False)
    assert not rows
    assert_same(out, grads, ref, ref_grads)
    fastmoe.unpatch()


def use_graphed_checkpointing(model) -> None:
    """Graphed checkpointing on `model`'s layers, as get_peft_model installs it on a GPU (capture=False: the same
    path, run eagerly): packed rows are rounded up with filler (19 tokens to GRAPHED_ROW)."""
    from fastmoe.graphed_checkpointing import GraphedCheckpoint

    base = model.get_base_model()
    base.__dict__["_fastmoe_graphed_checkpoint"] = checkpointing = GraphedCheckpoint(capture=False)
    for layer in base.model.layers:
        layer._gradient_checkpointing_func = checkpointing


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe"])
def test_one_example_a_step_is_rounded_up_for_the_graphs(tiny_checkpoint, monkeypatch, model_type, with_mask):
    """A batch of one row without padding (trl's collator at one example a step pads nothing; a plain loop may pass
    no attention mask) trains under graphed checkpointing as the row and a filler document up to the rounded length
    (13 tokens to 16), so that steps of nearby lengths replay the same graphs, and after a batch of as many tokens at
    its own length (data of one fixed length); loss and every LoRA gradient are the row's alone."""
    model = lora_model(tiny_checkpoint(model_type))
    one = {name: value[:1] for name, value in padded_batch(model.config.vocab_size).items()}  # 13 tokens, no padding
    assert bool(one["attention_mask"].all())
    if not with_mask:
        del one["attention_mask"]
    rows = layout_rows(monkeypatch, model_type)
    ref, ref_grads = loss_and_grads(model, one, monkeypatch, layouts=False)
    use_graphed_checkpointing(model)
    out, grads = loss_and_grads(model, one, monkeypatch, layouts=True)
    assert rows and set(rows) == {(1, 16)}
    assert_same(out, grads, ref, ref_grads)
    # One example of the same length again, as data of one fixed length has: its own length from then on, no filler.
    rows.clear()
    out, grads = loss_and_grads(model, one, monkeypatch, layouts=True)
    assert rows and set(rows) == {(1, 13)}
    assert_same(out, grads, ref, ref_grads)
    rows.clear()
    loss_and_grads(model, {name: value[:, :11] for name, value in one.items()}, monkeypatch, layouts=True)
    assert set(rows) == {(1, 12)}  # another length: rounded again
    fastmoe.unpatch()


@pytest.mark.parametrize("model_type, graphed", [("qwen3_moe", False), ("jetmoe", False), ("qwen3_moe", True),
                                                 ("jetmoe", True)])
def test_router_aux_loss_of_the_packed_row_is_the_padded_batchs(tiny_tokenizer, tmp_path, monkeypatch, model_type,
                                                               graphed):
    """transformers averages the load-balancing loss over the tokens its attention mask keeps: the packed row's;
    under graphed checkpointing the row's filler is left out of it."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(model_type, tmp_path, seed=3, tokenizer=tiny_tokenizer,
                                       output_router_logits=True)
    model = lora_model(checkpoint)
    if graphed:
        use_graphed_checkpointing(model)
    batch = padded_batch(model.config.vocab_size)
    rows = layout_rows(monkeypatch, model_type)
    ref, ref_grads = loss_and_grads(model, batch, monkeypatch, layouts=False)
    if ref.aux_loss is None:
        pytest.skip(f"this transformers' {model_type} returns no router logits")
    out, grads = loss_and_grads(model, batch, monkeypatch, layouts=True)
    assert set(rows) == {(1, GRAPHED_ROW if graphed else sum(LENGTHS))}
    assert out.aux_loss is not None and rel_err(out.aux_loss, ref.aux_loss) < 1e-6
    assert_same(out, grads, ref, ref_grads)
    fastmoe.unpatch()


@pytest.mark.parametrize("model_type", ["afmoe", "mixtral"])
def test_padding_a_label_scores_keeps_the_masks(tiny_checkpoint, monkeypatch, model_type):
    """Labels copied from input_ids with the pad tokens left in score the padding, and transformers' loss trains on
    what its masks give the padded positions (their row's tokens): the batch keeps its padding and its masks, where
    the layouts would have made the padding a document of its own."""
    model = lora_model(tiny_checkpoint(model_type))
    batch = padded_batch(model.config.vocab_size, labels_on_padding=True)
    rows = layout_rows(monkeypatch, model_type)
    out, grads = loss_and_grads(model, batch, monkeypatch, layouts=True)
    assert not rows
    ref, ref_grads = loss_and_grads(model, batch, monkeypatch, layouts=False)
    assert_same(out, grads, ref, ref_grads)
    fastmoe.unpatch()


@pytest.mark.parametrize("model_type, padding, graphed", [("lfm2_moe", "right", False), ("qwen3_moe", "both", False),
                                                            ("qwen3_moe", "right", True)])
def test_trls_fused_head_on_a_padded_batch(tiny_tokenizer, tmp_path, monkeypatch, model_type, padding, graphed):
    """trl's fused LM head (fastmoe's) on the packed row gives trl's own head on the padded batch under the masks:
    every per-token field in the padded layout, the label mask, the aux loss and the gradients; SFT's right padding,
    and GRPO's left-padded prompts before right-padded completions. Under graphed checkpointing the row is rounded
    up (19 tokens to GRAPHED_ROW) with filler that the load-balancing loss leaves out."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(model_type, tmp_path, seed=3, tokenizer=tiny_tokenizer,
                                       output_router_logits=True, router_aux_loss_coef=0.25)
    model = lora_model(checkpoint)
    base = model.get_base_model()
    if graphed:
        use_graphed_checkpointing(model)
    batch = padded_batch(model.config.vocab_size, padding=padding)
    rows = layout_rows(monkeypatch, model_type)
    fields = trl_fused_head.PER_TOKEN_FIELDS

    def fused(add_head, layouts):
        base.__dict__.pop("forward", None)
        add_head(base, temperature=0.7, outputs=fields)
        return loss_and_grads(model, batch, monkeypatch, layouts, fused_lm_head=True, num_items_in_batch=11)

    out, grads = fused(trl_fused_head.add_fused_lm_head, layouts=True)
    assert set(rows) == {(1, GRAPHED_ROW if graphed else sum(LENGTHS))}
    _, trls_own = trl_fused_head._trl()
    ref, ref_grads = fused(trls_own, layouts=False)
    assert torch.equal(out.label_mask, ref.label_mask)
    if model_type == "qwen3_moe":  # LFM2-MoE records no router logits on some transformers releases
        assert rel_err(out.aux_loss, ref.aux_loss) < 1e-6
    for name in fields:
        value, expected = getattr(out, name), getattr(ref, name)
        assert value.shape == expected.shape, name
        if name == "is_top1":
            assert torch.equal(value, expected)
        else:
            assert rel_err(value, expected) < 1e-5, name
    assert_same(out, grads, ref, ref_grads)
    fastmoe.unpatch()


def test_which_calls_drop_their_padding(tiny_checkpoint, monkeypatch):
    model = lora_model(tiny_checkpoint("lfm2_moe")).get_base_model()
    batch = padded_batch(model.config.vocab_size)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    targets = shift_labels(batch["labels"]).view_as(batch["labels"])

    assert pack_padded_rows(model, inputs, targets) is None  # the CPU: no flash layouts
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: True)
    packed = pack_padded_rows(model, inputs, targets)
    keep = batch["attention_mask"].bool()
    assert torch.equal(packed.inputs["input_ids"], batch["input_ids"][keep][None])
    assert packed.inputs["attention_mask"] is None and packed.inputs["use_cache"] is False
    assert packed.inputs["position_ids"].tolist() == [[*range(13), *range(5), 0]]
    assert torch.equal(packed.take(targets), targets[keep])
    embeds = dict(inputs, input_ids=None, inputs_embeds=model.get_input_embeddings()(batch["input_ids"]))
    assert torch.equal(pack_padded_rows(model, embeds, targets).inputs["inputs_embeds"],
                       embeds["inputs_embeds"][keep][None])

    both = padded_batch(model.config.vocab_size, padding="both")
    both_targets = shift_labels(both["labels"]).view_as(both["labels"])
    left_packed = pack_padded_rows(model, dict(inputs, attention_mask=both["attention_mask"]), both_targets)
    # transformers' default positions count the left padding.
    assert left_packed.inputs["position_ids"].tolist() == [[*range(13), *range(3, 8), 12]]
    gapped_mask, gapped_targets = batch["attention_mask"].clone(), targets.clone()
    gapped_mask[0, 4] = 0
    gapped_targets[0, 4] = -100
    assert pack_padded_rows(model, inputs, gapped_targets) is not None  # each call below keeps it for its own reason
    continuing = dict(inputs, position_ids=torch.tensor([list(range(SEQ)), list(range(13, 13 + SEQ)),
                                                         list(range(SEQ))]))
    kept = [
        dict(inputs, attention_mask=torch.ones_like(batch["attention_mask"])),  # nothing to drop
        dict(inputs, attention_mask=gapped_mask),  # a row with a gap between its tokens
        continuing,  # the second row's positions continue the first's: one document to the layouts
        dict(inputs, output_hidden_states=True),
        dict(inputs, token_type_ids=torch.zeros_like(batch["input_ids"])),  # a per-position input it cannot pack
        dict(inputs, past_key_values=object()),
    ]
    for call in kept:
        assert pack_padded_rows(model, call, gapped_targets) is None
    scores_padding = targets.clone()
    scores_padding[1, 7] = 5
    assert pack_padded_rows(model, inputs, scores_padding) is None
    fastmoe.unpatch()

    # LFM2's short convolution restarts at packed documents only as fastmoe's op: switched off, no packing.
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("lfm2_moe")), dtype=torch.float32, max_seq_length=64,
                                         fast_ops={"short_conv": False})
    assert pack_padded_rows(model, inputs, targets) is None
    fastmoe.unpatch()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type, sizes", [("afmoe", dict(head_dim=16)), ("lfm2_moe", dict(hidden_size=64))])
def test_gpu_bf16_padded_batch_on_flash_as_under_the_masks(tiny_tokenizer, tmp_path, monkeypatch, model_type, sizes):
    """On a GPU in bf16 the packed row runs PyTorch's flash kernel (head_dim 16); the padded batch under transformers'
    masks (SDPA) is the reference: loss and LoRA gradients within bf16's tolerance."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(model_type, tmp_path, seed=3, tokenizer=tiny_tokenizer, **sizes)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    randomize_lora(model)
    model.train()
    batch = {name: t.cuda() for name, t in padded_batch(model.config.vocab_size).items()}
    taken = []
    module = attention_kernel_caller(model_type, "flash_causal_attention")
    flash = module.flash_causal_attention
    monkeypatch.setattr(module, "flash_causal_attention", lambda query, *a: taken.append(query.shape[0])
                        or flash(query, *a))
    out, grads = loss_and_grads(model, batch, monkeypatch, layouts=True)
    assert taken and set(taken) == {1}
    taken.clear()
    ref, ref_grads = loss_and_grads(model, batch, monkeypatch, layouts=False)
    assert not taken
    assert_same(out, grads, ref, ref_grads, tol=1e-2)
    fastmoe.unpatch()


def test_rows_round_coarser_while_the_graphs_places_fill():
    """A run's first COARSE_ROUNDING_ROWS rows of up to COARSE_ROUNDING_MAX_TOKENS round up to a multiple of half the
    power of two below them (fewer lengths to capture while the places fill), longer ones and later rows to a quarter;
    release() starts a run afresh."""
    from fastmoe.graphed_checkpointing import GraphedCheckpoint
    from fastmoe.padding_free import COARSE_ROUNDING_MAX_TOKENS, COARSE_ROUNDING_ROWS, row_length_for_graphs

    graphed = GraphedCheckpoint(capture=False, max_tokens=8192)
    assert COARSE_ROUNDING_MAX_TOKENS == 4096
    assert [row_length_for_graphs(graphed, t) for t in (13, 19, 2049, 3073, 4096, 4097)] == [
        16, 24, 3072, 4096, 4096, 5120]
    graphed.rows_asked = COARSE_ROUNDING_ROWS
    assert [row_length_for_graphs(graphed, t) for t in (13, 19, 2049, 3073, 4097)] == [14, 20, 2560, 3584, 5120]
    graphed.release()
    assert graphed.rows_asked == 0 and row_length_for_graphs(graphed, 2049) == 3072
