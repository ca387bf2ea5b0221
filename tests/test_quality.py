"""Quality evaluations on real SmolLM2 weights (CPU, small slices of what experiment=quality runs); the task suite:
tests/test_tasks.py."""

import pytest

from bench.eval.quality import fidelity, perplexity
from bench.systems.kvbench import KvbenchSystem

pytestmark = [pytest.mark.slow, pytest.mark.numeric]


def test_fidelity_of_dense_against_itself_is_perfect(smollm2):
    assert fidelity(KvbenchSystem.around(*smollm2), ctx=256, tokens=8) == (0.0, 1.0)


def test_fidelity_of_last_recent_with_room_for_everything_is_perfect(smollm2):
    roomy = KvbenchSystem.around(*smollm2, "last_recent", 300, sink_tokens=4)
    assert fidelity(roomy, ctx=256, tokens=8) == (0.0, 1.0)
    tight = KvbenchSystem.around(*smollm2, "last_recent", 36, sink_tokens=4)
    kl, _ = fidelity(tight, ctx=256, tokens=8)
    assert kl > 0.01  # eviction shows


def test_perplexity_is_sane_and_eviction_costs(smollm2):
    dense = perplexity(KvbenchSystem.around(*smollm2), ctx=512, chunk=128)
    window = perplexity(KvbenchSystem.around(*smollm2, "last_recent", 64), ctx=512, chunk=32)
    assert 3 < dense < 60 and window > dense * 1.05
