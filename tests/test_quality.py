"""Quality evaluations on real SmolLM2 weights (CPU, small slices of what experiment=quality runs)."""

import pytest

from bench.quality import CacheSetup, fidelity, passkey, passkey_prompt, perplexity

pytestmark = pytest.mark.slow


def test_fidelity_of_dense_against_itself_is_perfect(smollm2):
    model, tok = smollm2
    assert fidelity(model, tok, CacheSetup("dense"), ctx=256, tokens=8) == {"kl_vs_dense": 0.0, "top1_agree": 1.0}


def test_fidelity_of_last_recent_with_room_for_everything_is_perfect(smollm2):
    model, tok = smollm2
    roomy = CacheSetup("last_recent", {"sink_tokens": 4}, cache_length=300)
    assert fidelity(model, tok, roomy, ctx=256, tokens=8) == {"kl_vs_dense": 0.0, "top1_agree": 1.0}
    tight = CacheSetup("last_recent", {"sink_tokens": 4}, cache_length=36)
    result = fidelity(model, tok, tight, ctx=256, tokens=8)
    assert result["kl_vs_dense"] > 0.01  # eviction shows


def test_passkey_prompt_has_ctx_tokens_and_the_key_at_depth(smollm2):
    _, tok = smollm2
    ids, n_question = passkey_prompt(tok, 2048, 0.25, "12345")
    assert len(ids) == 2048 and tok.decode(ids[-n_question:]) == "What is the pass key? The pass key is"
    text = tok.decode(ids)
    assert text.count("12345") == 2 and 0.2 < text.index("12345") / len(text) < 0.3


def test_dense_finds_the_passkey_and_a_short_window_does_not(smollm2):
    model, tok = smollm2
    dense = passkey(model, tok, CacheSetup("dense"), ctx=2048, depths=[0.1, 0.5, 0.9], trials=1)
    assert dense["passkey_acc"] >= 0.9, dense
    window = passkey(model, tok, CacheSetup("last_recent", {}, 256), ctx=2048, depths=[0.1], trials=3)
    assert window["passkey_acc"] <= 0.2, window  # the key was evicted long before the question


def test_perplexity_is_sane_and_eviction_costs(smollm2):
    model, tok = smollm2
    dense = perplexity(model, tok, CacheSetup("dense"), ctx=512, chunk=128)["ppl"]
    window = perplexity(model, tok, CacheSetup("last_recent", {}, 64), ctx=512, chunk=32)["ppl"]
    assert 3 < dense < 60 and window > dense * 1.05
