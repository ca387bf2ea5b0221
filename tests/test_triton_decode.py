"""Our split-K Triton decode kernel (model/triton_decode.py), run on the CPU under Triton's interpreter, against
SDPA over the filled slots in float64; and the decode step through it against the eager step (same greedy
tokens). The interpreter has no bfloat16 (NumPy has none): float32 and float16 here, bfloat16 on the GPU machine
(benchmarks/compiled_vs_eager.py compares the compiled step's tokens with the eager step's there)."""

import pytest
import torch
import torch.nn.functional as F
from bounds import assert_within, attention_terms, bound, model_terms

from model.attention import UnsupportedBackend

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

pytest.importorskip("triton")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter (tests/conftest.py)


@pytest.fixture(scope="module")
def kernel():
    import numpy
    import triton

    import model.triton_decode as module

    triton_version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if DEVICE.type == "cpu" and triton_version < (3, 7) and int(numpy.__version__.split(".")[0]) >= 2:
        # Triton 3.6's interpreter takes a loop bound with int() of a 1-element array, which NumPy 2 refuses
        # (3.7.1 and 3.9.0 run these tests). A CUDA build of torch 2.11 pins triton 3.6.0; `make setup` gives a
        # CPU torch triton 3.9.0 (pyproject.toml, extra `interpreter`).
        pytest.skip(
            f"triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__}: "
            "triton>=3.7 or numpy<2 runs these"
        )
    why = module.unavailable_reason(DEVICE)
    assert why is None, why  # on the CPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported
    return module


def kernel_bound(expected: torch.Tensor, hs: int, keys: int, dtype: torch.dtype) -> float:
    """The kernel against float64 attention: its sums accumulate in float32 (the kernel's accumulator), then the output
    is rounded once to `dtype` (half an eps of its own), inputs being exact in `dtype`."""
    return bound(expected, attention_terms(hs, keys), torch.float32) + torch.finfo(dtype).eps * float(
        expected.abs().max()
    )


CASES = [  # batch, n_head, KV heads, slots, head size, filled, dtype, options
    (2, 8, 2, 300, 32, 137, torch.float32, None),  # 4 query heads per KV head, a partly filled buffer
    (1, 9, 3, 256, 64, 1, torch.float32, None),  # SmolLM2's 3 per KV head; one filled slot (empty splits)
    (3, 4, 4, 500, 64, 500, torch.float32, {"BLOCK_N": 32, "SPLIT_KV": 7}),  # no GQA; full; uneven splits
    (2, 32, 8, 1000, 64, 999, torch.float32, {"SPLIT_KV": 1}),  # Llama-3.2-1B's heads, one split (no merge)
    (2, 8, 2, 300, 32, 211, torch.float16, None),
    *([(4, 32, 8, 4160, 64, 4097, torch.bfloat16, None)] if DEVICE.type == "cuda" else []),  # no bf16 in NumPy
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}h{c[2]}g-n{c[5]}-{str(c[6])[6:]}" for c in CASES])
def test_the_kernel_matches_sdpa_over_the_filled_slots(kernel, case):
    B, H, G, S, hs, n_valid, dtype, options = case
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(B, H, 1, hs, generator=gen).to(DEVICE, dtype)
    buffers = [torch.randn(B + 1, G, S, hs, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    key, value = (b[:B] for b in buffers)  # a batch slice of a larger buffer, as a cache hands it over
    out = kernel.decode_attention(query, key, value, torch.tensor(n_valid, device=DEVICE), None, options)
    expected = F.scaled_dot_product_attention(
        query.double(), key[:, :, :n_valid].double(), value[:, :, :n_valid].double(), enable_gqa=True
    )  # (B, H, 1, hs)
    expected = expected.transpose(1, 2).reshape(B, 1, H * hs)  # (B, 1, H * hs)
    assert out.shape == (B, 1, H * hs) and out.dtype == dtype
    assert_within(out, expected, kernel_bound(expected, hs, n_valid, dtype))


@pytest.mark.parametrize("buffer", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantized_buffers_are_dequantized_in_the_kernel(kernel, buffer, dtype):
    """K/V as a quantized buffer stores them (codes, float16 scales and zeros per group of channels), read by the
    kernel tile by tile: the same output as SDPA over the buffer's own dequantized K/V."""
    from caches.buffers import buffer_class

    B, H, G, S, hs, n_valid = 2, 8, 2, 300, 64, 233
    gen = torch.Generator().manual_seed(3)
    buf = buffer_class(buffer)(B, G, S, hs, DEVICE, dtype, group_size=32)
    buf.write_range(B, 0, *(torch.randn(B, G, S, hs, generator=gen).to(DEVICE, dtype) for _ in range(2)))
    query = torch.randn(B, H, 1, hs, generator=gen).to(DEVICE, dtype)
    quantized = {
        "bits": buf.bits,
        "group_size": 32,
        **{n: getattr(buf, n) for n in ("k_scale", "k_zero", "v_scale", "v_zero")},
    }
    out = kernel.decode_attention(
        query, buf.k_q, buf.v_q, torch.tensor(n_valid, device=DEVICE), options={"SPLIT_KV": 3}, quantized=quantized
    )
    key, value = buf.read(B, n_valid)  # (B, G, n_valid, hs) in dtype, as the eager path reads them
    expected = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), enable_gqa=True)
    expected = expected.transpose(1, 2).reshape(B, 1, H * hs)  # (B, 1, H * hs)
    assert_within(out, expected, kernel_bound(expected, hs, n_valid, dtype))
    with pytest.raises(ValueError, match="bits 8 or 4 and a power-of-two group size dividing 64; got bits=2"):
        kernel.decode_attention(query, buf.k_q, buf.v_q, torch.tensor(n_valid), quantized={**quantized, "bits": 2})


def test_bad_input_is_refused_with_the_valid_choices(kernel):
    q, kv = torch.zeros(1, 4, 1, 24, device=DEVICE), torch.zeros(1, 2, 64, 24, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two head size, got 24"):
        kernel.decode_attention(q, kv, kv, torch.tensor(8))
    q, kv = torch.zeros(1, 4, 1, 32, device=DEVICE), torch.zeros(1, 2, 64, 32, device=DEVICE)
    with pytest.raises(ValueError, match="unknown Triton decode option 'BLOCK'; valid: BLOCK_N, num_stages"):
        kernel.decode_attention(q, kv, kv, torch.tensor(8), options={"BLOCK": 64})
    with pytest.raises(ValueError, match="one query per sequence, got T=2"):
        kernel.decode_attention(torch.zeros(1, 4, 2, 32, device=DEVICE), kv, kv, torch.tensor(8))


STEP_CASES = {  # cache, slots, knobs, the launch options the plan settles on (4 splits: the CPU's default)
    "dense": ("dense", 600, {}, "BLOCK_N=64,SPLIT_KV=4,num_stages=3,num_warps=4"),
    "last_recent": ("last_recent", 48, {"sink_tokens": 4}, "BLOCK_N=64,SPLIT_KV=1,num_stages=3,num_warps=4"),
    "dense_int8": ("dense", 600, {"buffer": "int8"}, "BLOCK_N=64,SPLIT_KV=4,num_stages=3,num_warps=4"),
    "last_recent_int4": ("last_recent", 48, {"buffer": "int4"}, "BLOCK_N=64,SPLIT_KV=1,num_stages=3,num_warps=4"),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
@torch.inference_mode()
def test_the_decode_step_through_the_kernel_gives_the_eager_tokens(kernel, case):
    """The fixed-shape step in the Triton form (run eagerly: compiling it needs CUDA) against the eager step, 16
    greedy steps; last_recent is past its buffer (eviction, sinks); on quantized buffers the kernel reads the codes
    (the eager step, a dequantized copy)."""
    from model.compiled_decode import CompiledDecode
    from model.gpt import GPT

    cache, length, knobs, launch = STEP_CASES[case]
    model = GPT.from_name("tiny").to(DEVICE).eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (2, 100), generator=gen).to(DEVICE)
    runs = []
    for form in (None, "triton"):
        model.set_kv_caches(2, cache, length, **knobs)
        token = model(prompt, input_pos=0)[:, -1:].argmax(-1)  # (B, 1)
        step = model if form is None else CompiledDecode(model, compile=False, form=form)
        if form:
            assert step.plan.kernel == f"triton:{launch}"
        tokens, logits = [], []
        for i in range(16):
            out = step(token, input_pos=100 + i)  # (B, 1, vocab)
            token = out[:, -1:].argmax(-1)
            tokens.append(token)
            logits.append(out)
        runs.append((torch.cat(tokens, 1), torch.cat(logits, 1)))
    (eager_tokens, eager_logits), (triton_tokens, triton_logits) = runs
    assert torch.equal(triton_tokens, eager_tokens)
    assert_within(triton_logits, eager_logits, bound(eager_logits, model_terms(model.config, 116)))


def test_triton_is_refused_where_it_cannot_run(monkeypatch, tiny):
    """Without CUDA or the interpreter, or compiled off CUDA: an `unsupported` row's reason."""
    from model import triton_decode
    from model.compiled_decode import plan

    tiny.set_kv_caches(1, "dense", 64, buffer="int8")
    with pytest.raises(UnsupportedBackend, match="compiles on CUDA only"):
        plan(tiny, compile=True, form="triton")
    monkeypatch.setattr(triton_decode, "unavailable_reason", lambda device: "no Triton here")
    with pytest.raises(UnsupportedBackend, match="the Triton decode kernel cannot run: no Triton here"):
        plan(tiny, compile=False, form="triton")


@pytest.mark.parametrize("buffer", ["float", "int8"])
@torch.inference_mode()
def test_the_step_traces_whole_with_the_kernel_as_one_opaque_op_per_layer(kernel, buffer):
    """What torch.compile gets on CUDA (traced here through AOT, run on the interpreter): one graph, the kernel as
    a custom op that reads K/V and writes only its own outputs (so inductor neither copies K/V nor looks inside),
    once per layer, and the same logits as the uncompiled step. On an int8 buffer the op reads the codes: the
    graph dequantizes nothing."""
    from traced import call_targets, traced_step

    from model.compiled_decode import CompiledDecode
    from model.gpt import GPT

    model = GPT.from_name("tiny").to(DEVICE).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(2))
    model.set_kv_caches(2, "dense", 600, buffer=buffer)
    token = model(prompt.to(DEVICE), input_pos=0)[:, -1:].argmax(-1)
    decoder = CompiledDecode(model, compile=False, form="triton")
    decoder.pos.fill_(100)  # the device position, which the int API would set
    expected = decoder._step(token)
    decoder.pos.fill_(100)
    graph, logits = traced_step(decoder, token)
    ops = call_targets(graph)
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    assert ops.count("kvbench.triton_decode_split.default") == model.config.n_layer
    assert not [op for op in ops if "scaled_dot_product" in op or op.startswith("aten.clone")]
    kernel_inputs = {n.args[1].meta["val"].dtype for n in nodes if str(n.target).startswith("kvbench.")}
    assert kernel_inputs == {torch.uint8 if buffer == "int8" else torch.float32}
    assert_within(logits, expected, bound(expected, model_terms(model.config, 101)))
    model.clear_kv_caches()


@pytest.mark.parametrize(
    "dtype, block_n, num_warps, bits",
    [("bf16", 64, 4, 0), ("bf16", 128, 8, 0), ("fp16", 32, 2, 0), ("bf16", 64, 4, 8), ("bf16", 64, 4, 4)],
)
def test_the_kernel_compiles_for_sm90_with_pipelined_vector_loads(dtype, block_n, num_warps, bits):
    """The GPU build, here on the CPU: Triton compiles the kernel for sm_90 (H100/H200) with its bundled ptxas, with
    the specialisation its launcher applies on a GPU (pointers and strides divisible by 16). K and V must arrive
    through asynchronous 16-byte copies, several tiles in flight (cp.async, num_stages=3), not as scalar loads:
    that is what a memory-bound kernel's bandwidth rests on. In a process of its own: this one runs Triton's
    interpreter (tests/conftest.py), which compiles nothing."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = [sys.executable, str(ROOT / "tests" / "triton_sm90.py"), dtype, str(block_n), str(num_warps), str(bits)]
    proc = subprocess.run(script, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout.splitlines()[-1])
    assert ptx["cp.async.cg.shared.global"] >= 2 and ptx["cp.async.wait_group"] >= 1  # K and V, pipelined
    assert ptx["mma.sync"] >= 2  # tensor cores for both products
    # no element-wise loads of K/V (the quantized ones: each row's float16 scale and zero per group, K and V)
    assert ptx["ld.global.b16"] == (0 if bits == 0 else 4)
    # nothing spilled to local memory (each spill is a round trip through the cache hierarchy per tile), and few
    # enough registers for several programs per SM (65536 per SM; 128 threads x 144 = 18432 for int8)
    assert ptx["spill_store_bytes"] == ptx["spill_load_bytes"] == 0
    assert ptx["registers"] * 32 * num_warps <= 65536 // 2
