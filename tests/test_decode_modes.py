"""cache.decode: a prompt compressed once with the decoded tokens appended after it (`append`, what kvpress runs),
beside eviction at every decoded token (`evict`), checked against an explicit-mask reference and by what each mode
keeps."""

import pytest
import torch
from bounds import assert_within, attention_terms, bound, model_terms
from hydra import compose, initialize_config_dir
from reference import naive_forward, window_allowed

from bench.config.spec import resolve
from bench.run import CONF_DIR
from bench.systems.kvbench import KvbenchSystem
from caches.frozen import FrozenPrefixCache
from model.config import Config

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

VOCAB = 4096
P, STEPS, SINKS, SLOTS = 48, 6, 4, 20  # prompt, decoded tokens, last_recent's sinks and slots (a window of 16)


def _ids(T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))


def _decode_logits(system: KvbenchSystem, ids: torch.Tensor) -> torch.Tensor:
    """The prompt's last logits, then each forced decoded token's: (STEPS + 1, vocab)."""
    system.open(1, P + STEPS)
    with torch.inference_mode():
        out = [system.forward(ids[:, :P], 0)]
        out += [system.forward(ids[:, p : p + 1], p) for p in range(P, P + STEPS)]
    return torch.cat(out)


def _allowed(mode: str) -> torch.Tensor:
    """(T, T): the prompt's rows see its sliding window with sinks; a decoded row sees, with `evict`, the window
    sliding on, with `append`, the sinks and the window the prompt left, and every decoded token up to itself."""
    T, W = P + STEPS, SLOTS - SINKS
    allowed = window_allowed(T, window=W, sinks=SINKS)
    if mode == "append":
        j = torch.arange(T)
        for i in range(P, T):
            allowed[i] = (j < SINKS) | ((j >= P - W) & (j <= i))
    return allowed


@pytest.mark.parametrize("mode", ["evict", "append"])
def test_each_decode_mode_attends_what_its_definition_says(tiny, mode):
    ids = _ids(P + STEPS)
    system = KvbenchSystem.around(tiny, None, "last_recent", SLOTS, P, decode=mode, sink_tokens=SINKS)
    got = _decode_logits(system, ids)
    with torch.inference_mode():
        expected = {m: naive_forward(tiny, ids, _allowed(m))[0, P - 1 :] for m in ("evict", "append")}
    tolerance = bound(expected[mode], model_terms(tiny.config, P))
    assert_within(got, expected[mode], tolerance)
    other = "append" if mode == "evict" else "evict"
    assert (got[-1] - expected[other][-1]).abs().max() > tolerance  # the two modes differ by more than rounding


def test_append_keeps_the_compressed_prompt_and_every_decoded_token(tiny):
    """knorm at 16 of 48 prompt tokens: with `append` the prompt's kept positions stay as the prefill left them and
    the cache grows by each decoded token (the bytes of a full-precision K/V slot each); with `evict` it stays at 16."""
    ids = _ids(P + STEPS)
    kept = {}
    for mode in ("evict", "append"):
        system = KvbenchSystem.around(tiny, None, "knorm", 16, P, decode=mode)
        system.open(1, P + STEPS)
        with torch.inference_mode():
            system.forward(ids[:, :P], 0)
            after_prompt = [c.token_positions().clone() for c in tiny.kv_caches]
            prompt_bytes = system.cache_bytes()
            for p in range(P, P + STEPS):
                system.forward(ids[:, p : p + 1], p)
        kept[mode] = [c.token_positions() for c in tiny.kv_caches]
        if mode == "append":
            assert all(isinstance(c, FrozenPrefixCache) for c in tiny.kv_caches)
            decoded = torch.arange(P, P + STEPS).expand(1, tiny.config.n_query_groups, STEPS)
            for before, now in zip(after_prompt, kept[mode]):
                assert torch.equal(now, torch.cat([before, decoded], dim=-1))
            c = tiny.config  # K and V, float32, of one slot in every layer
            slot = c.n_layer * 2 * c.n_query_groups * c.head_size * 4
            # the prompt's buffer (16 slots and the evicting step's spare one) grown to 16 + STEPS, in place
            assert system.cache_bytes() == prompt_bytes + (16 + STEPS - 17) * slot
        else:
            assert all(now.shape[-1] == 16 for now in kept[mode])
    # a new prompt starts from the prompt's own caches again, not the appending ones
    with torch.inference_mode():
        system.forward(ids[:, :P], 0)
    assert not any(isinstance(c, FrozenPrefixCache) for c in tiny.kv_caches)


def _spec(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return resolve(compose(config_name="config", overrides=list(overrides)), cuda_available=False)


def test_the_mode_is_the_systems_own_unless_asked_and_hashes_apart_only_where_it_changes_something():
    from bench.harness.job import configuration
    from bench.results.rows import config_hash as hash_of

    def config_hash(spec) -> str:
        return hash_of(spec.identity())

    evict, append = _spec("cache=knorm"), _spec("cache=knorm", "cache.decode=append")
    assert (evict.cache.decode, append.cache.decode) == ("evict", "append")
    assert config_hash(evict) != config_hash(append)
    assert config_hash(evict) == config_hash(_spec("cache=knorm", "cache.decode=evict"))
    assert "decode" not in evict.identity()["cache"]  # a row of the system's own mode hashes as it always did
    assert (configuration(evict).label, configuration(append).label) == ("knorm", "knorm+append")
    assert configuration(append).decode == "append" and configuration(append).peer == "knorm"
    assert configuration(append).method == "knorm+append"
    # dense evicts nothing: both modes are one configuration
    assert config_hash(_spec("cache.decode=append")) == config_hash(_spec())
    # another library's caches grow by each decoded token; a dense one takes either mode's name, as kvbench's dense
    assert _spec("system=hf_dynamic").cache.decode == "append"
    assert _spec("system=hf_dynamic", "cache.decode=evict").cache.decode == "append"


def test_a_job_in_each_mode_is_a_row_that_says_which_ran():
    """The timed path (a warm-up, two rounds of prefill and decode, the tracked pass) in both modes: `append` holds
    the decoded tokens on top of the prompt's budget (the bytes of their K/V slots), `evict` the budget and a spare
    slot, and neither the warm-up's nor an earlier round's appended tokens are held through a prefill: its exact
    tracked peak is evict's. compile=true is refused in `append`, and so is the multiturn protocol."""
    import torch as torch_

    from bench.harness.job import run_job
    from bench.systems.kvbench import KvbenchSystem as cls

    small = ["cache=knorm", "ctx=256", "new_tokens=4", "repeats=2", "prefill_chunk=128"]
    rows = {m: run_job(_spec(*small, f"cache.decode={m}"), "test", m, progress=False) for m in ("evict", "append")}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    assert (rows["evict"]["decode"], rows["append"]["decode"]) == ("evict", "append")
    shape = Config.from_name(_spec(*small).model)  # tiny, the CPU's default
    slot = shape.n_layer * 2 * shape.n_query_groups * shape.head_size * 4  # K and V, float32, in every layer
    # the budget's buffer and its spare slot (evict), grown to the budget and the 4 decoded tokens (append)
    assert rows["append"]["cache_bytes"] == rows["evict"]["cache_bytes"] + 3 * slot
    assert rows["append"]["peak_alloc_prefill_bytes"] == rows["evict"]["peak_alloc_prefill_bytes"]
    refused = run_job(_spec(*small, "cache.decode=append", "compile=true"), "test", "compiled", progress=False)
    assert refused["status"] == "unsupported" and "cache.decode=append decodes eagerly" in refused["error"]
    multiturn = _spec(*small, "cache.decode=append", "eval=tasks", "eval.protocol=multiturn", "weights=pretrained",
                      "model=smollm2-135m")  # fmt: skip
    assert "eval.protocol=multiturn keeps evicting" in cls.refuse(multiturn, torch_.device("cpu"))


@pytest.mark.parametrize("name", ["adakv", "knorm", "last_recent", "dense"])
def test_appended_tokens_attend_only_what_each_head_keeps(name, monkeypatch):
    """What is appended after a compressed cache (the agnostic protocol's question, cache.decode=append's answer)
    attends, per head, that head's kept tokens and the new ones causally: a question of Q tokens, then two decode
    steps, against a naive per-head softmax over the kept tokens alone. adakv keeps another number of tokens per KV
    head, read back padded (position -1), never attended, through two segments; the others keep theirs in slots
    0 .. n-1 of a float buffer, and the new tokens go after them in that buffer, attended in one call."""
    from caches import KVCacheParams, create_cache
    from model import attention as attention_module

    B, G, H, hs, L, T, Q = 2, 2, 4, 16, 8, 40, 3
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T + Q + 2, hs, generator=gen) for n in (H, G, G))
    k[:, 0] *= 4  # head 0's attention is focused, head 1's spread: Ada-KV gives them different shares
    knobs = {"adakv": {"window": 4}, "last_recent": {"sink_tokens": 2}}.get(name, {})
    length = T if name == "dense" else L
    base = create_cache(name, KVCacheParams(B, G, H, hs, length, torch.device("cpu"), torch.float32), **knobs)
    base(q[:, :, :T], k[:, :, :T], v[:, :, :T], 0)
    if name == "adakv":
        assert (base.head_lengths() != L).any()  # the heads really keep different numbers: padding is read back
    kept_k, kept_v, kept_pos = (x.clone() for x in base.kept_kv(B))
    calls = []
    real_grouped = attention_module.grouped_attention
    monkeypatch.setattr("caches.frozen.grouped_attention", lambda *a, **kw: calls.append(1) or real_grouped(*a, **kw))
    frozen = FrozenPrefixCache(base, Q + 2)
    assert frozen.contiguous == (name != "adakv")
    got = [frozen(q[:, :, T : T + Q], k[:, :, T : T + Q], v[:, :, T : T + Q], T)]  # (B, Q, H * hs)
    got += [frozen(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], t) for t in (T + Q, T + Q + 1)]
    got = torch.cat(got, dim=1)  # (B, Q + 2, H * hs)
    assert len(calls) == (3 if name == "adakv" else 0)
    # bytes: the base's buffer grown in place to hold the new tokens after its own; or the new tokens' buffer and
    # adakv's heads read once, padded to the longest (K, V float32 and int64 positions)
    n = kept_pos.shape[-1]
    if name == "adakv":
        held = B * G * (Q + 2) * hs * 4 * 2 + B * G * n * (hs * 4 * 2 + 8)
        assert frozen.size_estimate() == base.size_estimate() + held
    else:
        assert frozen.size_estimate() == base.size_estimate()
        assert base.buf.k.shape[2] == max(n + Q + 2, length + (name == "knorm"))  # knorm's spare slot
    assert torch.equal(base.kept_kv(B)[2], kept_pos)  # the base keeps what it kept
    N = Q + 2
    expected = torch.empty(B, N, H, hs)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            real = kept_pos[b, g] >= 0
            keys = torch.cat([kept_k[b, g, real], k[b, g, T:]])  # (kept + N, hs)
            values = torch.cat([kept_v[b, g, real], v[b, g, T:]])
            scores = q[b, h, T:] @ keys.T / hs**0.5  # (N, kept + N)
            n = int(real.sum())
            scores[:, n:] = scores[:, n:].masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
            expected[b, :, h] = torch.softmax(scores, dim=-1) @ values
    expected = expected.reshape(B, N, H * hs)
    assert_within(got, expected, bound(expected, attention_terms(hs, length * G + N)))
