"""The compiled decode step (model/compiled_decode.py) against the eager one: same greedy tokens over 64 steps,
the int API's checks outside the graph, one graph for every step, and what its plan refuses. On CPU torch.compile
runs inductor without CUDA graphs; both SDPA forms (sdpa_gqa is what CUDA runs) are checked here, compiled. The
score-based caches' step (caches/scored.py, decode_step) keeps the tokens the eager step keeps, while the buffer
fills and once it evicts."""

import math
import re

import pytest
import torch
import torch._dynamo
from bounds import assert_within, bound, level, model_terms
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from traced import call_targets, traced_step

from caches import cache_class
from caches.base import KVCacheParams, create_cache
from model.attention import UnsupportedBackend
from model.compiled_decode import CompiledDecode, DecodePlan, plan
from model.config import Config
from model.gpt import GPT

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

PROMPT, STEPS, BATCH = 100, 64, 2
CASES = {  # cache, cache_length, knobs: the last_recent buffer is shorter than the prompt (eviction + sinks)
    "dense": ("dense", PROMPT + STEPS, {}),
    "last_recent": ("last_recent", 48, {"sink_tokens": 4}),
    "dense_int8": ("dense", PROMPT + STEPS, {"buffer": "int8"}),
    "last_recent_int4": ("last_recent", 48, {"buffer": "int4"}),
}
SCORED = {  # a buffer of 48 is full from the prompt on; one of 120 fills during the first 20 steps, then evicts
    "h2o": ("h2o", 48, {}),
    "h2o_filling": ("h2o", 120, {}),
    "h2o_normalized_int8": ("h2o", 120, {"normalize_scores": True, "buffer": "int8"}),
    "tova": ("tova", 48, {}),
    "tova_filling": ("tova", 120, {}),
    "snapkv_filling": ("snapkv", 120, {"window": 8}),
    "knorm": ("knorm", 48, {}),  # the policies that read no weights at decode: one fused SDPA call
    "keydiff": ("keydiff", 48, {}),
    "keydiff_filling": ("keydiff", 120, {}),
    "random": ("random", 48, {}),
    "snapkv": ("snapkv", 48, {"window": 8}),
    "expected_attention": ("expected_attention", 48, {"n_future": 16}),
    "qh2o_filling": ("qh2o", 120, {}),
}
CASES.update(SCORED)


def reorder(model, logits: torch.Tensor, case: str = "dense") -> float:
    """Two decode steps of one model in other summation orders (another kernel, a compiled graph): within the rounding
    of a logit's sums over every key; a quantized buffer's code may also land one level over where the two orders
    put a value on a rounding boundary (inductor fuses the quantizer's divide-and-round its own way), which moves a
    logit by at most the effect of one level of K or V in each layer."""
    tolerance = bound(logits, model_terms(model.config, PROMPT + STEPS))
    name, _, knobs = CASES[case]
    bits = {"int8": 8, "int4": 4}.get({**cache_class(name).knob_defaults({}), **knobs}.get("buffer"))
    if bits:  # a level of K or V is that fraction of its range, and moves what it feeds by about as much of theirs
        tolerance += model.config.n_layer * level(logits, bits)
    return tolerance


@pytest.fixture(scope="module")
def model():
    return GPT.from_name("tiny").eval()


@pytest.fixture(scope="module")
def prompt(model):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (BATCH, PROMPT), generator=gen)


@torch.inference_mode()
def greedy(
    model, prompt, case: str, step: str, form: str | None = None, backend: str = "auto", kept: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, STEPS), logits of every step (B, STEPS, vocab)); step: eager | static | compiled; backend: the
    SDPA kernel of the step (the eager reference always runs its own default). kept: gets each layer's cached
    token positions at the end, sorted per sequence and head."""
    cache, length, knobs = CASES[case]
    if step == "compiled":  # earlier tests' graphs of the step must not count against dynamo's recompile limit
        torch._dynamo.reset()
    model.set_kv_caches(BATCH, cache, length, **knobs)
    model.set_attention_backend("auto" if step == "eager" else backend)
    token = model(prompt, input_pos=0)[:, -1:].argmax(-1)  # (B, 1)
    decoder = model if step == "eager" else CompiledDecode(model, compile=step == "compiled", form=form)
    tokens, logits = [], []
    for i in range(STEPS):
        out = decoder(token, input_pos=PROMPT + i)  # (B, 1, vocab)
        token = out[:, -1:].argmax(-1)
        tokens.append(token)
        logits.append(out)
    if kept is not None:
        kept.extend(c.token_positions().sort(dim=-1).values.clone() for c in model.kv_caches)
    model.clear_kv_caches()
    return torch.cat(tokens, 1), torch.cat(logits, 1)


@pytest.mark.parametrize("form", ["sdpa", "sdpa_gqa"])
@pytest.mark.parametrize("case", [c for c in CASES if c not in SCORED])
def test_the_fixed_shape_step_equals_the_eager_step(model, prompt, case, form):
    """Both SDPA forms of the fixed-shape step, run eagerly (the Triton form: tests/test_triton_decode.py)."""
    eager_tokens, eager_logits = greedy(model, prompt, case, "eager")
    static_tokens, static_logits = greedy(model, prompt, case, "static", form)
    assert torch.equal(static_tokens, eager_tokens)
    assert_within(static_logits, eager_logits, reorder(model, eager_logits))


@pytest.mark.parametrize(
    "case, form, backend",
    [("last_recent", "sdpa", "auto"), ("dense_int8", "sdpa", "auto"), ("dense", "sdpa_gqa", "math")],
)
def test_compiled_decode_gives_the_eager_greedy_tokens(model, prompt, case, form, backend):
    graphs = counters["stats"]["unique_graphs"]
    eager_tokens, eager_logits = greedy(model, prompt, case, "eager")
    compiled_tokens, compiled_logits = greedy(model, prompt, case, "compiled", form, backend)
    assert torch.equal(compiled_tokens, eager_tokens)
    assert_within(compiled_logits, eager_logits, reorder(model, eager_logits, case))
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph, every position (no recompilation)


@pytest.mark.parametrize("case", list(SCORED))
def test_the_score_based_step_keeps_what_the_eager_step_keeps(model, prompt, case):
    """The fixed-shape step of h2o, tova, snapkv and qh2o (run eagerly here) against their eager `_step`: same
    greedy tokens, same logits, and the same tokens kept in every layer, sequence and head after 64 steps."""
    kept_eager, kept_static = [], []
    eager_tokens, eager_logits = greedy(model, prompt, case, "eager", kept=kept_eager)
    static_tokens, static_logits = greedy(model, prompt, case, "static", kept=kept_static)
    assert torch.equal(static_tokens, eager_tokens)
    assert_within(static_logits, eager_logits, reorder(model, eager_logits, case))
    assert all(torch.equal(a, b) for a, b in zip(kept_eager, kept_static, strict=True))


@pytest.mark.parametrize("case", ["h2o_filling", "tova", "snapkv", "keydiff"])
def test_the_score_based_step_compiles_to_one_graph_with_the_eager_tokens(model, prompt, case):
    """Compiled whole (fullgraph: no data-dependent shape, no host synchronisation, what CUDA graphs need), one
    graph for the filling steps and the evicting ones alike; snapkv's and keydiff's steps are the fused one (SDPA, no
    weights), keydiff's scoring every slot afresh each step.
    (Not knorm here: a token decoded twice has two keys of one norm, RoPE rotating without scaling, and which of
    them goes is then a matter of rounding, which compiling changes.)"""
    kept_eager, kept_compiled = [], []
    eager_tokens, eager_logits = greedy(model, prompt, case, "eager", kept=kept_eager)
    graphs = counters["stats"]["unique_graphs"]
    compiled_tokens, compiled_logits = greedy(model, prompt, case, "compiled", kept=kept_compiled)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert torch.equal(compiled_tokens, eager_tokens)
    assert_within(compiled_logits, eager_logits, reorder(model, eager_logits, case))
    assert all(torch.equal(a, b) for a, b in zip(kept_eager, kept_compiled, strict=True))


@pytest.mark.parametrize("cache", ["h2o", "keydiff", "knorm"])
@torch.inference_mode()
def test_a_compiled_evicting_step_writes_its_buffer_in_place(cache):
    """Inductor's code for a full buffer's step (the weighted form, h2o; the fused one, keydiff and knorm) allocates
    nothing the size of the K/V buffer: the evicted slot is overwritten where it lies and a policy reads the keys
    where they lie. A scatter into the buffer compiles to a copy of it, scattered into and copied back, and a
    concatenation of the keys to another copy, every layer and step: a cost in the buffer's size, not the token's."""
    B, G, H, hs, L = 1, 2, 4, 16, 256
    params = KVCacheParams(B, G, H, hs, L, torch.device("cpu"), torch.float32)
    kv = create_cache(cache, params)
    kv.attn_opts.decode_form = "sdpa"
    gen = torch.Generator().manual_seed(0)
    T = L + 8  # the prompt overfills the buffer: every step evicts

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    kv(rand(B, H, T, hs), rand(B, G, T, hs), rand(B, G, T, hs), 0)
    torch._dynamo.reset()
    step = torch.compile(kv.decode_step, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(step, rand(B, H, 1, hs), rand(B, G, 1, hs), rand(B, G, 1, hs), torch.tensor(T))
    allocated = [
        math.prod(int(d) for d in shape.split(",") if d.strip())
        for src in code
        for shape in re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", src)
    ]
    assert allocated, "no allocation found in inductor's code: the pattern no longer matches it"
    assert max(allocated) < kv.buf.k.numel() // 4


@torch.inference_mode()
def test_the_int_api_is_checked_and_a_new_prefill_moves_the_device_position(model, prompt):
    model.set_kv_caches(BATCH, "dense", PROMPT + 4)
    decoder = CompiledDecode(model, compile=False)
    token = model(prompt, input_pos=0)[:, -1:].argmax(-1)
    with pytest.raises(ValueError, match="expects next_token_pos=100"):
        decoder(token, input_pos=PROMPT + 1)
    with pytest.raises(ValueError, match=r"idx \(B, 1\)"):
        decoder(torch.cat([token, token], 1), input_pos=PROMPT)
    for i in range(4):
        decoder(token, input_pos=PROMPT + i)
    assert int(decoder.pos) == PROMPT + 4 and all(c.next_token_pos == PROMPT + 4 for c in model.kv_caches)
    with pytest.raises(ValueError, match="dense cache is full"):
        decoder(token, input_pos=PROMPT + 4)
    # a shorter prompt: the device position follows the int, and the step matches the eager one
    short = prompt[:, :60]
    first = model(short, input_pos=0)[:, -1:].argmax(-1)
    logits = decoder(first, input_pos=60)
    assert int(decoder.pos) == 61
    model(short, input_pos=0)
    expected = model(first, input_pos=60)
    assert_within(logits, expected, reorder(model, expected))
    model.clear_kv_caches()


@pytest.mark.parametrize("case", ["dense", "last_recent", "dense_int8"])
@torch.inference_mode()
def test_a_step_repeated_at_its_position_changes_nothing(model, prompt, case):
    """What the manual CUDA graph relies on (its warm-up runs the real step, then the first replay runs it again at the
    same position): the step writes the same K/V to the same slot, so running it twice leaves the same caches and
    the same logits as running it once. last_recent is past its buffer here (the ring evicts on every step)."""
    cache, length, knobs = CASES[case]
    model.set_kv_caches(BATCH, cache, length, **knobs)
    token = model(prompt, input_pos=0)[:, -1:].argmax(-1)
    decoder = CompiledDecode(model, compile=False)
    for i in range(3):
        token = decoder(token, input_pos=PROMPT + i)[:, -1:].argmax(-1)
    position = PROMPT + 3
    once = decoder._step(token)
    state = [b.clone() for c in model.kv_caches for b in c.buffers()]
    assert int(decoder.pos) == position + 1
    decoder.pos.fill_(position)
    twice = decoder._step(token)
    assert torch.equal(once, twice) and int(decoder.pos) == position + 1
    assert all(torch.equal(a, b) for a, b in zip(state, (b for c in model.kv_caches for b in c.buffers())))
    model.clear_kv_caches()


def test_the_plan_of_each_cache_and_what_it_refuses(model):
    """One place decides the form and the CUDA graph; a combination that cannot run is an UnsupportedBackend (the
    harness's `unsupported` row), a misuse a ValueError."""
    model.set_kv_caches(1, "h2o", 64)
    assert plan(model) == plan(model, compile=False) == DecodePlan("grouped", None, "grouped")
    with pytest.raises(ValueError, match="evicts by attention weights, which only its 'grouped' step returns"):
        plan(model, form="sdpa")
    model.set_attention_backend("flash")  # as the eager step: no fused kernel returns the weights
    with pytest.raises(UnsupportedBackend, match="flash cannot run this call: attention weights need the eager"):
        plan(model)
    model.set_attention_backend("eager")  # what the score-based caches run anyway
    assert plan(model).form == "grouped"
    model.set_kv_caches(1, "dense", 64)
    model.set_attention_backend("eager")
    with pytest.raises(UnsupportedBackend, match="sdpa=eager: the compiled decode step runs an SDPA kernel"):
        plan(model)
    model.set_attention_backend("cudnn")  # this CPU has no cuDNN kernel for the step
    with pytest.raises(UnsupportedBackend, match="cudnn has no kernel"):
        plan(model)
    model.set_attention_backend("auto")
    assert plan(model) == DecodePlan("sdpa", None, "sdpa:flash")  # the CPU's form
    with pytest.raises(ValueError, match="form='flex' is not valid; valid choices: sdpa, sdpa_gqa, triton"):
        plan(model, form="flex")
    model.set_kv_caches(1, "dense", 64, buffer="int8")
    assert plan(model).form == "sdpa"  # the Triton form is CUDA's (compiled); its test runs it eagerly here
    model.set_kv_caches(1, "knorm", 64)  # scores by keys: the SDPA form, like dense
    assert plan(model) == DecodePlan("sdpa", None, "sdpa:flash")
    assert not any(c.idempotent_decode for c in model.kv_caches)  # it evicts: graph trees on CUDA, not the manual graph
    model.set_start_of_layer_hook(lambda x, i, pos: None)
    with pytest.raises(ValueError, match="hook"):
        plan(model)
    model.set_start_of_layer_hook(None)
    model.clear_kv_caches()
    with pytest.raises(ValueError, match="set_kv_caches"):
        plan(model)


@pytest.mark.parametrize("form", ["sdpa", "sdpa_gqa"])
@pytest.mark.parametrize(
    "backend, kernel, traced",
    [("auto", "sdpa:flash", "_scaled_dot_product_flash_attention_for_cpu"), ("math", "sdpa:math", "aten.bmm")],
)
@torch.inference_mode()
def test_the_sdpa_kernel_named_is_the_one_traced_into_the_step(model, prompt, form, backend, kernel, traced):
    """`kernel` reports what the step's SDPA runs, and the traced graph (what inductor compiles) has that kernel in
    every layer: the kernel order is applied inside the step, not only around the eager call."""
    model.set_kv_caches(BATCH, "dense", PROMPT + 8)
    token = model(prompt, input_pos=0)[:, -1:].argmax(-1)
    model.set_attention_backend(backend)
    decoder = CompiledDecode(model, compile=False, form=form)
    assert decoder.plan.kernel == kernel
    ops = call_targets(traced_step(decoder, token)[0])
    sdpa_ops = [op for op in ops if "scaled_dot_product" in op]
    if traced == "aten.bmm":  # the math path: two batched matmuls per layer, no fused kernel
        assert not sdpa_ops and ops.count("aten.bmm.default") == 2 * model.config.n_layer
    else:
        assert sdpa_ops == [f"aten.{traced}.default"] * model.config.n_layer
    model.set_attention_backend("auto")
    model.clear_kv_caches()


@pytest.mark.parametrize("cache", ["dense", "snapkv", "h2o"])
@torch.inference_mode()
def test_a_hybrid_decodes_at_fixed_shapes_or_says_why_not(prompt, cache):
    """A hybrid (windowed layers of 16 tokens around global ones): its window caches and a global cache that decodes
    through SDPA (dense, snapkv) take the fixed-shape step, with the eager step's tokens and logits; a global cache
    of the grouped step (h2o) cannot share one step with them: unsupported, saying why."""
    config = Config.from_name("tiny", n_layer=4, layer_windows=(16, None, 16, None), rope_local_base=1000.0)
    torch.manual_seed(0)
    hybrid = GPT(config).eval()
    length = 48 if cache != "dense" else PROMPT + STEPS

    def run(step: str) -> tuple[torch.Tensor, torch.Tensor]:
        hybrid.set_kv_caches(BATCH, cache, length, longest=PROMPT + STEPS)
        token = hybrid(prompt, input_pos=0)[:, -1:].argmax(-1)  # (B, 1)
        decoder = hybrid if step == "eager" else CompiledDecode(hybrid, compile=False)
        tokens, logits = [], []
        for i in range(16):
            out = decoder(token, input_pos=PROMPT + i)
            token = out[:, -1:].argmax(-1)
            tokens.append(token)
            logits.append(out)
        return torch.cat(tokens, 1), torch.cat(logits, 1)

    eager_tokens, eager_logits = run("eager")
    if cache == "h2o":
        with pytest.raises(UnsupportedBackend, match="h2o evicts by attention weights .* one compiled step runs one"):
            run("static")
        return
    static_tokens, static_logits = run("static")
    assert torch.equal(static_tokens, eager_tokens)
    assert_within(static_logits, eager_logits, bound(eager_logits, model_terms(config, PROMPT + STEPS)))
