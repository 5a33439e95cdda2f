"""NF4 expert weights: the quantizer against bitsandbytes, the dequantization kernel, and moe_experts_nf4 (Triton vs
its reference vs moe_experts on the dequantized weights), forward and every gradient."""

import pytest
import torch
from fastmoe.kernels import reference_only, use_triton
from fastmoe.kernels.moe import grouped_gemm
from fastmoe.kernels.moe import nf4 as nf4_module
from fastmoe.kernels.moe.experts import ExpertLora, moe_experts, moe_experts_nf4
from fastmoe.kernels.moe.grouped_gemm import gemm_block_m, grouped_mm
from fastmoe.kernels.moe.nf4 import (
    check_register_decode_layout,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_code,
    has_register_decode,
    nf4_code,
    quantize_nf4,
    reference_dequantize_nf4,
)
from fastmoe.kernels.moe.routing import sort_by_expert
from testing_utils import rel_err

gpu = pytest.mark.gpu


def _stack(num_experts, n, k, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(num_experts, n, k, generator=gen) / k**0.5
    w[0, 0, :5] *= 40  # an outlier: its block's absmax squeezes the other codes
    w.view(num_experts, -1)[-1, :64] = 0  # an all-zero block (absmax 0)
    return w.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_bitsandbytes(dtype):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    w = _stack(3, 24, 40, dtype)
    nf4 = quantize_nf4(w)
    assert nf4.packed.shape == (3, 24 * 40 // 2) and nf4.packed.dtype == torch.uint8
    assert nf4.absmax.shape == (3, 24 * 40 // 64) and nf4.absmax.dtype == torch.float32
    ours = reference_dequantize_nf4(nf4)
    assert ours.dtype == dtype and ours.shape == w.shape
    for e in range(3):
        packed, state = bnb_functional.quantize_4bit(w[e].contiguous(), blocksize=64, quant_type="nf4")
        assert torch.equal(packed.view(-1), nf4.packed[e])
        assert torch.equal(state.absmax, nf4.absmax[e])
        # bitsandbytes' own dequantization of our codes and absmax gives our values.
        state.absmax = nf4.absmax[e].clone()
        assert torch.equal(bnb_functional.dequantize_4bit(nf4.packed[e].view(-1, 1), state), ours[e])
    assert rel_err(ours, w) < 0.15  # what 4 bits keep of a Gaussian weight


def test_quantize_refuses_blocks_that_cross_experts():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_nf4(torch.randn(2, 10, 10))


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16])
def test_triton_dequantize_matches_reference(out_dtype):
    nf4 = quantize_nf4(_stack(4, 40, 48))
    assert torch.equal(dequantize_nf4(nf4, out_dtype), reference_dequantize_nf4(nf4, out_dtype))


# --------------------------------------------------------------------------------------------------------
# Double quantization of absmax
# --------------------------------------------------------------------------------------------------------

# (E, N, K) with 300 absmax blocks per expert: two double-quantization blocks, the second partial.
DQ_SHAPE = (3, 96, 200)


def test_dynamic_code_is_bitsandbytes():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_code("cpu"), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_quant_matches_bitsandbytes(dtype):
    """quantize_4bit(compress_statistics=True) per expert: same NF4 codes, offset and 256-block scales; the absmax codes
    are the nearest ones, where bitsandbytes' CPU search now and then takes the other neighbour."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    w = _stack(*DQ_SHAPE, dtype)
    nf4 = quantize_nf4(w, double_quant=True)
    num_blocks = DQ_SHAPE[1] * DQ_SHAPE[2] // 64
    assert nf4.absmax.shape == (3, num_blocks) and nf4.absmax.dtype == torch.uint8
    assert nf4.absmax_scale.shape == (3, 2) and nf4.absmax_offset.shape == (3,)
    plain = quantize_nf4(w)
    assert torch.equal(nf4.packed, plain.packed)
    code = dynamic_code("cpu")
    ours = reference_dequantize_nf4(nf4)
    for e in range(3):
        packed, state = bnb_functional.quantize_4bit(w[e].contiguous(), blocksize=64, quant_type="nf4",
                                                     compress_statistics=True)
        assert torch.equal(packed.view(-1), nf4.packed[e])
        assert torch.equal(state.offset, nf4.absmax_offset[e])
        assert torch.equal(state.state2.absmax, nf4.absmax_scale[e])
        differ = state.absmax != nf4.absmax[e]
        assert differ.sum() <= 0.02 * num_blocks
        target = (plain.absmax[e] - nf4.absmax_offset[e]) / nf4.absmax_scale[e].repeat_interleave(256)[:num_blocks]
        theirs_err, ours_err = ((code[q.long()] - target).abs() for q in (state.absmax, nf4.absmax[e]))
        assert (ours_err <= theirs_err).all()
        # bitsandbytes' own dequantization of our codes and statistics gives our values.
        state.absmax = nf4.absmax[e].clone()
        assert rel_err(bnb_functional.dequantize_4bit(nf4.packed[e].view(-1, 1), state), ours[e]) < 1e-6


def test_double_quant_absmax_is_close_to_fp32():
    w = _stack(*DQ_SHAPE)
    nf4, plain = quantize_nf4(w, double_quant=True), quantize_nf4(w)
    decoded = dequantize_absmax(nf4)
    assert decoded.dtype == torch.float32 and decoded.shape == plain.absmax.shape
    # Nearest of the dynamic code: its widest gap in [-1, 1] is 0.9 / 64, so an absmax is off by at most half of that
    # times its 256-block's scale; over the whole stack that is a few 1e-3 of the absmax.
    scale = nf4.absmax_scale.repeat_interleave(256, dim=1)[:, :decoded.shape[1]]
    bound = 0.45 / 64 * scale + 1e-6 * nf4.absmax_offset[:, None]
    assert ((decoded - plain.absmax).abs() <= bound).all()
    assert rel_err(decoded, plain.absmax) < 5e-3
    assert rel_err(reference_dequantize_nf4(nf4), reference_dequantize_nf4(plain)) < 5e-3


@pytest.mark.parametrize("shape", [DQ_SHAPE, (2, 24, 40 * 8)])  # 300 and 120 absmax blocks per expert
@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_triton_dequantize_double_quant_matches_reference(shape, out_dtype):
    nf4 = quantize_nf4(_stack(*shape), double_quant=True)
    ours, reference = dequantize_nf4(nf4, out_dtype), reference_dequantize_nf4(nf4, out_dtype)
    assert ours.dtype == reference.dtype and rel_err(ours, reference) < 1e-6
    # The reference spelled out: NF4 value times code[q] * scale[block // 256] + offset, per element.
    e, flat = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1] * shape[2]), indexing="ij")
    byte = nf4.packed[e, flat // 2].long()
    nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    block = flat // 64
    absmax = dynamic_code("cpu")[nf4.absmax[e, block].long()] * nf4.absmax_scale[e, block // 256] + nf4.absmax_offset[e]
    spelled = (nf4_code("cpu")[nibble] * absmax).view(shape).to(reference.dtype)
    assert rel_err(reference, spelled) < 1e-6


def test_double_quant_shrinks_absmax_to_an_eighth_of_a_bit():
    w = torch.randn(2, 256, 1024)
    plain, double = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    absmax_bits = [(q.nbytes() - q.packed.numel()) * 8 / w.numel() for q in (plain, double)]
    assert absmax_bits[0] == 0.5
    assert 0.125 < absmax_bits[1] < 0.128  # uint8 per 64 weights, fp32 per 16384, fp32 per expert
    assert double.nbytes() * 8 / w.numel() < 4.13


def test_bf16_weights_dequantize_through_bf16_rounding():
    # bitsandbytes rounds NF4 * absmax to the weight's dtype; asking for fp32 must not skip that rounding.
    nf4 = quantize_nf4(_stack(2, 16, 32, torch.bfloat16))
    as_fp32 = dequantize_nf4(nf4, torch.float32)
    assert torch.equal(as_fp32, reference_dequantize_nf4(nf4).float())


# --------------------------------------------------------------------------------------------------------
# moe_experts_nf4
# --------------------------------------------------------------------------------------------------------


def _inputs(num_tokens, hidden, inter, num_experts, top_k, rank, dtype=torch.float32, device="cpu",
            used_experts=None, lora=True, seed=0, double_quant=False):
    gen = torch.Generator().manual_seed(seed)
    used = used_experts or num_experts
    index = torch.stack([torch.randperm(used, generator=gen)[:top_k] for _ in range(num_tokens)]).to(device)
    weights = (torch.rand(num_tokens, top_k, generator=gen) + 0.1).to(device).requires_grad_()
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype=dtype, device=device).requires_grad_()
    gate_up = quantize_nf4(_stack(num_experts, 2 * inter, hidden, dtype, device, seed + 1), double_quant)
    down = quantize_nf4(_stack(num_experts, hidden, inter, dtype, device, seed + 2), double_quant)
    params = [x, weights]
    loras = [None, None]
    if lora:
        for i, (out_f, in_f) in enumerate([(2 * inter, hidden), (hidden, inter)]):
            a = (torch.randn(num_experts, rank, in_f, generator=gen) / in_f**0.5).to(dtype=dtype, device=device)
            b = (torch.randn(num_experts, out_f, rank, generator=gen) / rank**0.5).to(dtype=dtype, device=device)
            a.requires_grad_(), b.requires_grad_()
            loras[i] = ExpertLora(a, b, 0.5)
            params += [a, b]
    return (x, index, weights, gate_up, down, *loras), params


def _run(fn, args, params):
    out = fn(*args)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    return [out, *torch.autograd.grad(out, params, upstream)]


def _dense(x, index, weights, gate_up, down, gu_lora, down_lora):
    """moe_experts on the dequantized stacks: the semantics moe_experts_nf4 promises."""
    return moe_experts(x, index, weights, dequantize_nf4(gate_up), dequantize_nf4(down), gu_lora, down_lora)


def _check(args, params, tol):
    results = _run(moe_experts_nf4, args, params)
    with reference_only():
        reference = _run(moe_experts_nf4, args, params)
    dense = _run(_dense, args, params)
    names = ["out", "hidden", "top_k_weights", "gate_up A", "gate_up B", "down A", "down B"]
    for name, got, ref, den in zip(names, results, reference, dense):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert rel_err(got, ref) < tol, name
        assert rel_err(got, den) < tol, name


@pytest.mark.parametrize(
    ("num_tokens", "hidden", "inter", "num_experts", "top_k", "used_experts"),
    [
        (37, 40, 24, 6, 2, 5),  # N, K not multiples of the GEMM blocks; expert 5 gets no token
        (21, 64, 32, 4, 1, None),  # top_k = 1
        (50, 48, 40, 3, 3, None),  # several row tiles per expert
    ],
)
def test_moe_experts_nf4_matches_reference_and_dense(num_tokens, hidden, inter, num_experts, top_k, used_experts):
    args, params = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank=3, used_experts=used_experts)
    _check(args, params, 1e-5)


@pytest.mark.parametrize(
    ("num_tokens", "hidden", "inter", "num_experts", "top_k", "used_experts"),
    [
        (37, 136, 72, 4, 2, 3),  # 306 absmax blocks per gate_up expert, rows of 136 and 72; expert 3 gets no token
        (21, 256, 64, 3, 1, None),  # top_k = 1; 512 blocks per gate_up expert (two whole 256-blocks), aligned rows
    ],
)
def test_moe_experts_nf4_double_quant(num_tokens, hidden, inter, num_experts, top_k, used_experts):
    """Double-quantized absmax through every NF4 GEMM, forward and backward, against the reference on
    reference_dequantize_nf4 weights and moe_experts on the Triton-dequantized ones."""
    args, params = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank=3, used_experts=used_experts,
                           double_quant=True)
    assert args[3].double_quant and args[4].double_quant
    _check(args, params, 1e-5)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(("num_tokens", "hidden", "inter", "num_experts", "top_k", "used_experts"), [
    (37, 40, 24, 6, 2, 5),  # N, K not multiples of the GEMM blocks; expert 5 gets no token
    (21, 256, 64, 3, 1, None),  # top_k = 1; two whole 256-blocks of absmax per gate_up expert
])
def test_moe_experts_nf4_torch_products(monkeypatch, double_quant, num_tokens, hidden, inter, num_experts, top_k,
                                         used_experts):
    """The NF4 stacks dequantized whole for torch's grouped GEMM, the kernels as its epilogues: the same outputs and
    gradients as the reference and as moe_experts on the dequantized stacks, all four products taking that path."""
    from testing_utils import count_expert_products

    args, params = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank=3, used_experts=used_experts,
                           double_quant=double_quant)
    calls = count_expert_products(monkeypatch)
    with grouped_gemm.base_products("torch"):
        _check(args, params, 1e-5)
    # moe_experts_nf4 (gate_up, down, d(h), d(x)), then _check's moe_experts on the dequantized stacks as many
    assert len(calls) == 8


@pytest.mark.parametrize(("hidden", "inter", "num_experts", "top_k", "tokens", "expected"), [
    (2048, 5632, 8, 2, 4096, (True, True)),  # JetMoe-8B: 1,024 rows an expert
    (4096, 14336, 8, 2, 4096, (True, True)),  # Mixtral-8x7B: gate_up's 16-bit copy 1.9 GB
    (4096, 14336, 8, 2, 2048, (False, False)),  # Mixtral-8x7B at 2,048 tokens: 512 rows an expert
    (2048, 1792, 32, 4, 4096, (False, False)),  # LFM2-8B-A1B: 512 rows an expert
    (2048, 1792, 32, 4, 16384, (True, True)),  # LFM2-8B-A1B at 16k
    (2048, 1024, 128, 8, 4096, (False, False)),  # Trinity-Mini: 256 rows an expert
])
def test_auto_dequantizes_nf4_stacks_where_rows_pay_for_the_copy(hidden, inter, num_experts, top_k, tokens,
                                                                  expected):
    """"auto"'s rule for NF4 stacks (on a Hopper GPU): torch's rule for 16-bit products, and rows enough an expert
    for the 16-bit copy to pay, within the copy's size limit."""
    a = torch.empty(0, dtype=torch.bfloat16, device="meta")
    rows = tokens * top_k
    assert tuple(grouped_gemm.products_large_enough_for_torch(shape, rows, num_experts)
                 and grouped_gemm.dequantized_products_pay(shape, rows, a)
                 for shape in ((num_experts, 2 * inter, hidden), (num_experts, hidden, inter))) == expected


# Interpreter block caps (BLOCK_N, BLOCK_K): the default 32s, blocks wider than an absmax block (two per row
# segment, and a masked one past the end of a row), and tiles narrower than one.
INTERPRETER_BLOCKS = [(32, 32), (128, 128), (16, 64)]


def _use_blocks(monkeypatch, blocks):
    if not use_triton(torch.empty(0)):
        pytest.skip("the Triton path runs on a GPU or under TRITON_INTERPRET=1")
    monkeypatch.setattr(grouped_gemm, "_INTERPRETER", (*blocks, {}))


@pytest.mark.parametrize("blocks", INTERPRETER_BLOCKS)
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "inter", "num_experts", "top_k", "used_experts"),
    [
        (29, 192, 64, 5, 2, 4),  # H and I multiples of 64: every GEMM loads whole-row tiles; expert 4 gets no token
        (17, 128, 40, 4, 1, None),  # top_k = 1; gate_up rows aligned to absmax blocks, down rows not
    ],
)
def test_moe_experts_nf4_aligned_rows(monkeypatch, blocks, num_tokens, hidden, inter, num_experts, top_k,
                                      used_experts):
    _use_blocks(monkeypatch, blocks)
    args, params = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank=3, used_experts=used_experts)
    _check(args, params, 1e-5)


@pytest.mark.parametrize("blocks", INTERPRETER_BLOCKS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "double_quant"),
    [
        (80, 192, False),  # rows of 192: byte/absmax tiles (the backward's read: 192 output columns over 80 rows)
        (192, 80, False),  # rows of 80: absmax blocks straddle rows, per-element gathers
        (24, 64, False),  # one absmax block per row
        # Double-quantized absmax, 408 blocks per expert (a whole and a partial 256-block): tiles, then gathers.
        (136, 192, True),
        (192, 136, True),
    ],
)
def test_grouped_mm_nf4_matches_dense(monkeypatch, blocks, transpose, n, k, double_quant):
    """Both orientations of the bare NF4 GEMM against the dequantized weights: W (E, n, k), or its transpose."""
    _use_blocks(monkeypatch, blocks)
    num_experts, gen = 5, torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(num_experts - 1, generator=gen)[:2] for _ in range(23)])
    schedule = sort_by_expert(index, num_experts, gemm_block_m(index.device, index.numel(), num_experts))
    rows = torch.arange(schedule.num_pairs, dtype=torch.int32)
    weight = quantize_nf4(_stack(num_experts, n, k, seed=4), double_quant)
    dense = reference_dequantize_nf4(weight)
    dense = dense.transpose(1, 2) if transpose else dense
    a = torch.randn(schedule.num_pairs, dense.shape[2], generator=gen)
    row_expert = index.reshape(-1)[schedule.sorted_pair.long()]
    expected = torch.einsum("sk,snk->sn", a.double(), dense[row_expert].double())
    out = torch.full((schedule.num_pairs, dense.shape[1]), float("nan"))
    grouped_mm(a, rows, weight, schedule, out, rows, transpose=transpose)
    assert rel_err(out, expected) < 1e-5


def test_moe_experts_nf4_without_lora():
    args, params = _inputs(19, 40, 24, 5, 2, rank=0, lora=False)
    _check(args, params, 1e-5)


def test_moe_experts_nf4_only_gate_up_lora():
    """Top-k 1, an expert without tokens, and no LoRA on down: every gradient but the missing factors."""
    (x, index, weights, gate_up, down, gu_lora, _), params = _inputs(23, 40, 24, 4, 1, rank=2, used_experts=3)
    _check((x, index, weights, gate_up, down, gu_lora, None), params[:4], 1e-5)


@pytest.mark.parametrize("double_quant", [False, True])
def test_moe_experts_nf4_backward_from_unpacked_copies(double_quant):
    """The backward rebuilds the NF4 weights from what saved-tensor hooks hand back (offloading returns copies),
    and gives the same gradients as without hooks."""
    if not use_triton(torch.empty(0)):
        pytest.skip("the Triton path runs on a GPU or under TRITON_INTERPRET=1")
    args, params = _inputs(17, 40, 24, 5, 2, rank=3, used_experts=4, double_quant=double_quant)
    results = _run(moe_experts_nf4, args, params)
    unpacked = []

    def unpack(t):
        unpacked.append(t.dtype)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        copied = _run(moe_experts_nf4, args, params)
    assert torch.uint8 in unpacked  # the packed codes went through the hooks
    for got, expected in zip(copied, results):
        assert rel_err(got, expected) < 1e-6


def test_moe_experts_nf4_rejects_mismatched_stacks():
    (x, index, weights, gate_up, _, _, _), _ = _inputs(4, 40, 24, 3, 2, rank=2, lora=False)
    with pytest.raises(ValueError, match="shapes do not fit"):
        moe_experts_nf4(x, index, weights, gate_up, gate_up)


@gpu
@pytest.mark.parametrize("lora", [True, False])
def test_moe_experts_nf4_bf16_gpu(lora):
    args, params = _inputs(1000, 256, 192, 8, 2, rank=16, dtype=torch.bfloat16, device="cuda", used_experts=7,
                           lora=lora)
    _check(args, params, 1e-2)


@gpu
def test_moe_experts_nf4_bf16_gpu_dequantized_products(monkeypatch):
    """On a Hopper GPU "auto" dequantizes stacks whose experts have rows enough (here 1,024 each) for torch's
    products: the same outputs and gradients as the reference, all four products (and the 16-bit comparison's
    four) taking that path."""
    from testing_utils import count_expert_products

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("auto takes torch's products on Hopper GPUs only")
    args, params = _inputs(4096, 1024, 1024, 8, 2, rank=16, dtype=torch.bfloat16, device="cuda", double_quant=True)
    calls = count_expert_products(monkeypatch)
    _check(args, params, 1e-2)
    assert len(calls) == 8


@gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 40])
@pytest.mark.parametrize("double_quant", [False, True])
def test_moe_experts_nf4_bf16_gpu_at_decoding_sizes(num_tokens, double_quant):
    """A decode step's handful of tokens (at most DECODE_PAIRS (token, slot) pairs) takes the NF4 GEMMs' decode
    configuration (grouped_gemm._GPU_NF4_DECODE_ROW_GEMM): forward and backward against the reference, top-8 over 16
    experts, one of them never chosen."""
    args, params = _inputs(num_tokens, 256, 192, 16, 8, rank=16, dtype=torch.bfloat16, device="cuda", used_experts=15,
                           double_quant=double_quant)
    assert num_tokens * 8 <= grouped_gemm.DECODE_PAIRS
    _check(args, params, 1e-2)


def test_register_decode_needs_ampere_and_16_bit_weights(monkeypatch):
    """The PTX decode's packed conversions are sm_80+: a T4 (sm_75) and fp32 weights take the portable decode."""
    cuda = torch.device("cuda", 0)
    for capability, dtype, expected in [((7, 5), torch.float16, False), ((8, 0), torch.float16, True),
                                        ((9, 0), torch.bfloat16, True), ((9, 0), torch.float32, False)]:
        monkeypatch.setattr(nf4_module, "_compute_capability", lambda index, c=capability: c)
        assert has_register_decode(cuda, dtype) is expected
    assert not has_register_decode(torch.device("cpu"), torch.bfloat16)


def _run_ptx(lines: list[str], registers: dict[str, int]) -> dict[str, int]:
    """The integer PTX that the NF4 register decode is made of (mov, and, shr, mul.hi, lop3 with the (a & b) | c
    table, prmt in its default mode), run on 32-bit values in Python: enough to check its byte lookups without a
    GPU."""
    def value(operand: str) -> int:
        return int(operand, 16) if operand.startswith("0x") else registers[operand]

    for line in lines:
        op, operands = line.rstrip(";").split(None, 1)
        dest, *args = [a.strip() for a in operands.split(",")]
        if op == "mov.b32":
            registers[dest] = value(args[0])
        elif op == "and.b32":
            registers[dest] = value(args[0]) & value(args[1])
        elif op == "shr.b32":
            registers[dest] = value(args[0]) >> int(args[1])
        elif op == "mul.hi.u32":
            registers[dest] = (value(args[0]) * value(args[1])) >> 32
        elif op == "lop3.b32" and args[3] == "0xEA":
            registers[dest] = (value(args[0]) & value(args[1])) | value(args[2])
        elif op == "prmt.b32":
            source = value(args[0]) | value(args[1]) << 32  # bytes 0-3 from a, 4-7 from b
            selector, out = value(args[2]), 0
            for i in range(4):
                nibble = (selector >> 4 * i) & 0xF
                byte = (source >> 8 * (nibble & 7)) & 0xFF
                if nibble & 8:  # sign replication
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << 8 * i
            registers[dest] = out
        else:
            raise AssertionError(f"unexpected PTX: {line}")
    return registers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_register_decode_word_looks_up_every_code(dtype):
    """The lookup of one word of packed codes (nf4._decode_word) in the constant planes of the 16 unscaled values
    (nf4._code_planes, what the tensor-core GEMV decodes with): each byte's pair (high nibble's value in the low half)
    equals the NF4 value of each code rounded to dtype, for every code in each position."""
    planes = dict(zip([f"l{j}" for j in range(4)] + [f"h{j}" for j in range(4)], nf4_module._code_planes(dtype)))
    values = [v & 0xFFFF for v in torch.tensor(nf4_module.NF4_CODE).to(dtype).view(torch.int16).tolist()]
    lines = nf4_module._decode_word("w", ("o0", "o1", "o2", "o3"))
    words = [int.from_bytes(bytes([(16 * a + b) for a, b in zip(codes, reversed(codes))]), "little")
             for codes in ([q, (q + 5) % 16, (q + 11) % 16, 15 - q] for q in range(16))]
    words += torch.randint(0, 2**32, (32,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist()
    for word in words:
        out = _run_ptx(lines, dict(planes, w=word))
        for j in range(4):
            byte = (word >> 8 * j) & 0xFF
            assert out[f"o{j}"] == values[byte >> 4] | values[byte & 0xF] << 16


class _Compiled:
    def __init__(self, size_per_thread: str):
        self.asm = {"ttgir": (
            f"#blocked1 = #ttg.blocked<{{sizePerThread = [1, {size_per_thread}], threadsPerWarp = [16, 2], "
            "warpsPerCTA = [4, 1], order = [1, 0]}>\n"
            '%w:2 = tt.elementwise_inline_asm "{...}" {constraints = "=r", packed_element = 16 : i32, pure = true} '
            "%packed, %absmax : tensor<128x32xi8, #blocked1>, tensor<128x32xf32, #blocked1> -> ...\n")}


def test_register_decode_layout_check():
    """16 (or 32) consecutive bytes a thread pass; fewer would decode runs of two rows with one absmax: an error."""
    check_register_decode_layout(_Compiled("16"))
    check_register_decode_layout(_Compiled("32"))
    with pytest.raises(RuntimeError, match="16 consecutive bytes"):
        check_register_decode_layout(_Compiled("8"))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 256, 192), (3, 128, 200)])  # 12 whole programs of 4096; 6.25 (a masked tail)
def test_dequantize_nf4_gpu(dtype, shape):
    """The PTX decode (16-bit weights on NVIDIA GPUs) is bit-exact: code * absmax in fp32, rounded once."""
    nf4 = quantize_nf4(_stack(*shape, dtype, "cuda"))
    assert torch.equal(dequantize_nf4(nf4), reference_dequantize_nf4(nf4))
    assert torch.equal(dequantize_nf4(nf4, torch.float32), reference_dequantize_nf4(nf4, torch.float32))


@gpu
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(("n", "k"), [(320, 192), (192, 320)])
def test_grouped_mm_nf4_register_decode_gpu(transpose, double_quant, n, k):
    """The GEMMs through the PTX decode (bf16, rows of whole absmax blocks), both orientations, N and K not multiples
    of the tiles (masked runs of a tile decode to zeros), against an fp64 GEMM on the dequantized weights: a run
    decoded with another run's absmax, or out of order, would be far off."""
    num_experts, gen = 6, torch.Generator().manual_seed(5)
    index = torch.stack([torch.randperm(num_experts - 1, generator=gen)[:2] for _ in range(700)]).cuda()
    schedule = sort_by_expert(index, num_experts, gemm_block_m(index.device, index.numel(), num_experts))
    rows = torch.arange(schedule.num_pairs, dtype=torch.int32, device="cuda")
    weight = quantize_nf4(_stack(num_experts, n, k, torch.bfloat16, "cuda", seed=6), double_quant)
    assert grouped_gemm._weight_operand(weight, transpose, torch.bfloat16, schedule).layout["REGISTER_DECODE"]
    dense = reference_dequantize_nf4(weight)
    dense = dense.transpose(1, 2) if transpose else dense
    a = torch.randn(schedule.num_pairs, dense.shape[2], generator=gen).to(device="cuda", dtype=torch.bfloat16)
    row_expert = index.reshape(-1)[schedule.sorted_pair.long()]
    expected = torch.einsum("sk,snk->sn", a.double(), dense[row_expert].double())
    out = torch.full((schedule.num_pairs, dense.shape[1]), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_mm(a, rows, weight, schedule, out, rows, transpose=transpose)
    assert rel_err(out, expected) < 3e-3


@gpu
def test_double_quant_nf4_bf16_gpu():
    # The decoded absmax may differ from the reference's by an ulp (fused multiply-add), flipping a bf16 rounding.
    nf4 = quantize_nf4(_stack(4, 256, 192, torch.bfloat16, "cuda"), double_quant=True)
    assert rel_err(dequantize_nf4(nf4), reference_dequantize_nf4(nf4)) < 1e-3
    args, params = _inputs(1000, 256, 192, 8, 2, rank=16, dtype=torch.bfloat16, device="cuda", used_experts=7,
                           double_quant=True)
    _check(args, params, 1e-2)


def test_triton_path_never_dequantizes_a_whole_stack(monkeypatch):
    import fastmoe.kernels.moe.experts as moe_experts_module
    import fastmoe.kernels.moe.nf4 as nf4_module

    def refuse(*args, **kwargs):
        raise AssertionError("a whole expert stack was dequantized")

    if not use_triton(torch.empty(0)):
        pytest.skip("the Triton path runs on a GPU or under TRITON_INTERPRET=1")
    args, params = _inputs(19, 40, 24, 5, 2, rank=2)
    monkeypatch.setattr(moe_experts_module, "reference_dequantize_nf4", refuse)
    monkeypatch.setattr(nf4_module, "reference_dequantize_nf4", refuse)
    monkeypatch.setattr(nf4_module, "dequantize_nf4", refuse)
    _run(moe_experts_nf4, args, params)


def test_absmax_of_listed_experts_is_decoded_for_those_alone():
    """A decode step's GEMMs decode the double-quantized absmax of the experts their tiles hold (repeats and -1
    entries included), equal to the whole stack's decode on those rows."""
    from fastmoe.kernels.moe.nf4 import absmax_fp32

    weight = quantize_nf4(torch.randn(6, 24, 80), double_quant=True)
    whole = absmax_fp32(weight)
    listed = torch.tensor([4, 1, 1, -1, -1], dtype=torch.int32)
    part = absmax_fp32(weight, listed)
    assert torch.equal(part[[1, 4]], whole[[1, 4]])
    assert torch.equal(whole, dequantize_absmax(weight))
