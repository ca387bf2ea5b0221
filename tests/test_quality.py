"""Quality evaluations on real SmolLM2 weights (CPU, small slices of what experiment=quality runs); the task suite:
tests/test_tasks.py."""

import pytest

from bench.eval.quality import CacheSetup, fidelity, perplexity

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


def test_perplexity_is_sane_and_eviction_costs(smollm2):
    model, tok = smollm2
    dense = perplexity(model, tok, CacheSetup("dense"), ctx=512, chunk=128)["ppl"]
    window = perplexity(model, tok, CacheSetup("last_recent", {}, 64), ctx=512, chunk=32)["ppl"]
    assert 3 < dense < 60 and window > dense * 1.05
