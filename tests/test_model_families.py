"""Qwen3 and Gemma 3 (text) against HF transformers on the same random weights: logits of a whole forward, and of a
prefill and decode steps through the caches (a hybrid's windowed layers through window caches of their own). Each
feature the families add is shown to matter: the same weights read without it miss HF's logits."""

from dataclasses import replace

import pytest
import torch
from bounds import assert_within, bound, model_terms
from safetensors.torch import load_file

from model.load import from_hf_state_dict, load_hf_checkpoint

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

transformers = pytest.importorskip("transformers")

T = 40  # tokens: longer than the Gemma windows below, so that the windows matter


def _qwen3():
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=256,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        )
    )


def _gemma3():
    """Six layers: 0-4 windowed (12 tokens), layer 5 global, as Gemma 3's 5:1 pattern; a
    softmax scale (query_pre_attn_scalar 24) other than 1/sqrt(head_dim); local and global rotary bases apart."""
    return transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=256,
            sliding_window=12,
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            attn_implementation="eager",
        )
    )


FAMILIES = {"qwen3": _qwen3, "gemma3": _gemma3}


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(family, HF model, folder it was saved to): random weights, norms included (HF starts them at identity)."""
    torch.manual_seed(0)
    hf = FAMILIES[request.param]().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)  # norms that do something: a dropped one shows
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return request.param, hf, path


def test_logits_match_hf_whole_and_through_the_caches(checkpoint):
    family, hf, path = checkpoint
    ours, _ = load_hf_checkpoint(path)
    if family == "gemma3":
        assert ours.config.layer_windows == (12,) * 5 + (None,) and ours.config.global_layers == [5]
    torch.manual_seed(1)
    idx = torch.randint(0, 512, (2, T))
    with torch.inference_mode():
        expected = hf(idx).logits
        tolerance = bound(expected, model_terms(ours.config, T))
        assert_within(ours(idx), expected, tolerance, "whole forward")
        ours.set_kv_caches(batch_size=2, cache="dense", cache_length=T)
        kinds = {type(c).__name__ for c in ours.kv_caches}
        assert kinds == ({"DenseCache", "LastRecentCache"} if family == "gemma3" else {"DenseCache"})
        chunked = torch.cat(
            [ours(idx[:, :30], input_pos=0)] + [ours(idx[:, i : i + 1], input_pos=i) for i in range(30, T)], dim=1
        )
    assert_within(chunked, expected, tolerance, "prefill and decode through the caches")


BROKEN = {
    "qwen3": [{"qk_norm": False}],
    "gemma3": [
        {"qk_norm": False},
        {"sandwich_norms": False},
        {"norm_offset": False},
        {"embed_scale": False},
        {"attn_scale": None},
        {"mlp_act": "silu"},
        {"layer_windows": None},
        {"rope_local_base": None},
    ],
}


def test_each_feature_of_the_family_matters(checkpoint):
    """The checkpoint read with one feature of its family left out misses HF's logits by far more than the bound."""
    family, hf, path = checkpoint
    right, _ = load_hf_checkpoint(path)
    state = load_file(str(path / "model.safetensors"))
    idx = torch.randint(0, 512, (1, T))
    with torch.inference_mode():
        expected = hf(idx).logits
        tolerance = bound(expected, model_terms(right.config, T))
        for change in BROKEN[family]:
            wrong = from_hf_state_dict(state, replace(right.config, **change), "cpu", torch.float32)
            delta = float((wrong(idx) - expected).abs().max())
            assert delta > 100 * tolerance, f"{change}: {delta:.3g} within {100 * tolerance:.3g}"


def test_a_hybrid_gives_its_windowed_layers_window_caches_and_the_budget_to_its_global_ones():
    """Windowed layers: a sink-free last_recent of their window (of the sequence, when that is shorter); global layers:
    the cache asked for at the budget asked for. The K/V bytes they hold are the analytic hybrid figure: windows x
    windowed layers + tokens x global layers (Config.kv_bytes; snapkv one slot more per layer, for its fused decode
    step), less than the same shape with every layer global."""
    from model.config import Config
    from model.gpt import GPT

    config = Config.from_name("tiny", n_layer=6, layer_windows=(8, 8, None, 8, 8, None), rope_local_base=1000.0)
    model = GPT(config)
    B, G, hs = 2, config.n_query_groups, config.head_size
    for cache, budget, longest in [("dense", 40, 40), ("snapkv", 10, 40), ("dense", 6, 6)]:
        model.set_kv_caches(B, cache, budget, longest=longest)
        slots = [c.cache_length for c in model.kv_caches]
        local = min(8, longest)
        assert slots == [local, local, budget, local, local, budget]
        w = "last_recent"
        assert [c.name for c in model.kv_caches] == [w, w, cache, w, w, cache]
        assert all(c.sink_tokens == 0 for c in model.kv_caches if c.name == w)
        payload = sum(c.buf.k.numel() * 4 + c.buf.v.numel() * 4 for c in model.kv_caches)  # float32 K and V
        fused = cache == "snapkv"  # a slot more per layer for its fused decode step (caches/scored.py)
        assert payload == 2 * B * G * hs * 4 * (4 * local + 2 * (budget + fused))
    assert config.kv_bytes(B, 40, 4) == 2 * B * G * hs * 4 * (4 * 8 + 2 * 40)
    assert config.kv_bytes(B, 40, 4) < Config.from_name("tiny", n_layer=6).kv_bytes(B, 40, 4)
