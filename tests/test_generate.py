import pytest
import torch
from bounds import assert_within, bound, model_terms

from model.generate import generate, prefill_chunks, sample

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)


def _greedy_reference(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the uncached forward over the whole sequence at every step."""
    seq = prompt
    with torch.inference_mode():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_greedy_generate_matches_uncached_reference_batched(tiny):
    prompt = torch.randint(0, 4096, (3, 21), generator=torch.Generator().manual_seed(3))
    out = generate(tiny, prompt, max_new_tokens=12, prefill_chunk=8)
    assert out.shape == (3, 33)
    assert torch.equal(out, _greedy_reference(tiny, prompt, 12))
    assert not tiny.kv_caches  # the dense caches it made for itself are gone


def test_generate_uses_assigned_caches_and_respects_their_limits(tiny):
    tiny.set_kv_caches(batch_size=1, cache="last_recent", cache_length=12, sink_tokens=2)
    assert prefill_chunks(tiny, 40, prefill_chunk=64) == [(0, 40)]  # last_recent: prefill of any length
    tiny.set_kv_caches(batch_size=1, cache="dense", cache_length=30)
    assert prefill_chunks(tiny, 40, prefill_chunk=64) == [(0, 30), (30, 40)]  # then the dense cache is full
    assert prefill_chunks(tiny, 25, prefill_chunk=10) == [(0, 10), (10, 20), (20, 25)]
    prompt = torch.randint(0, 4096, (1, 25))
    with pytest.raises(ValueError, match="dense cache is full"):
        generate(tiny, prompt, max_new_tokens=8)
    tiny.set_kv_caches(batch_size=1, cache="dense", cache_length=33)
    out = generate(tiny, prompt, max_new_tokens=8, prefill_chunk=10)
    assert torch.equal(out, _greedy_reference(tiny, prompt, 8))
    assert tiny.blocks[0].attn.kv_cache.next_token_pos == 32  # the caches assigned were used


def test_eos_pads_finished_sequences(tiny):
    prompt = torch.randint(0, 4096, (2, 10), generator=torch.Generator().manual_seed(5))
    free = generate(tiny, prompt, max_new_tokens=8)
    eos = int(free[0, 12])  # make the third new token of sequence 0 the end-of-sequence token
    out = generate(tiny, prompt, max_new_tokens=8, eos_id=eos)
    for b in range(2):
        hits = (free[b, 10:] == eos).nonzero()
        stop = 10 + int(hits[0]) if len(hits) else free.shape[1] - 1  # index of the first eos
        assert torch.equal(out[b, : stop + 1], free[b, : stop + 1])
        assert (out[b, stop + 1 :] == eos).all()
    assert int(out[0, 12]) == eos and (out[0, 12:] == eos).all()


def test_sample_top_k_and_greedy():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    assert sample(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}


def test_hook_and_skip_lm_head(tiny):
    calls = []
    tiny.set_start_of_layer_hook(lambda x, i, pos: calls.append((i, pos, tuple(x.shape))))
    tiny.set_kv_caches(batch_size=1, cache="dense", cache_length=16)
    with torch.inference_mode():
        h = tiny(torch.zeros(1, 5, dtype=torch.long), input_pos=0, skip_lm_head=True)
        logits = tiny(torch.zeros(1, 1, dtype=torch.long), input_pos=5)
    assert h.shape == (1, 5, 128) and logits.shape == (1, 1, 4096)
    assert calls[:3] == [(0, 0, (1, 5, 128)), (1, 0, (1, 5, 128)), (2, 0, (1, 5, 128))]
    assert calls[3:] == [(0, 5, (1, 1, 128)), (1, 5, (1, 1, 128)), (2, 5, (1, 1, 128))]
    with torch.inference_mode():  # the cached prefill's hidden states through the head: the uncached forward's logits
        expected = tiny(torch.zeros(1, 5, dtype=torch.long))
        assert_within(tiny.lm_head(h), expected, bound(expected, model_terms(tiny.config, 5)))
