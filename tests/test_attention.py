import pytest
import torch
from bounds import assert_within, attention_terms, bound
from reference import naive_attention, window_allowed
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import TorchDispatchMode

from model import attention as A
from model.attention import (
    AttentionOptions,
    UnsupportedBackend,
    Visibility,
    attention,
    mask_rows,
    record_backends,
    visible_mask,
)
from model.decode_attention import static_decode_attention

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)


def _qkv(B=2, H=8, G=2, T=12, S=12, hs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, hs, generator=g),
        torch.randn(B, G, S, hs, generator=g),
        torch.randn(B, G, S, hs, generator=g),
    )


def close(out: torch.Tensor, expected: torch.Tensor, k: torch.Tensor) -> None:
    """Attention computed another way: within the rounding of its sums (a score, then the mean over the keys)."""
    assert_within(out, expected, bound(expected, attention_terms(k.shape[-1], k.shape[-2])))


def _lower_right(T: int, S: int) -> torch.Tensor:
    return torch.ones(T, S, dtype=torch.bool).tril(S - T)


CASES = {  # name: (T, S, Visibility, allowed mask for the naive reference)
    "prefill": (12, 12, Visibility(q_start=0), _lower_right(12, 12)),
    "chunk": (5, 17, Visibility(q_start=12), _lower_right(5, 17)),
    "decode": (1, 17, Visibility(q_start=16), _lower_right(1, 17)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["auto", "flash", "math", "eager"])
def test_backends_match_naive(case, backend):
    T, S, vis, allowed = CASES[case]
    q, k, v = _qkv(T=T, S=S)
    out, used, _ = attention(q, k, v, vis, AttentionOptions(backend=backend))
    close(out, naive_attention(q, k, v, allowed), k)
    assert used == ("flash" if backend == "auto" else backend)  # on CPU, auto picks flash


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_backend_without_cpu_kernel_raises(backend):
    q, k, v = _qkv()
    with pytest.raises(UnsupportedBackend, match=backend):
        attention(q, k, v, Visibility(q_start=0), AttentionOptions(backend=backend))


def test_efficient_refuses_gqa_when_query_shorter_than_keys():
    q, k, v = _qkv(T=1, S=9)
    with pytest.raises(UnsupportedBackend, match="no enable_gqa"):
        attention(q, k, v, Visibility(q_start=8), AttentionOptions(backend="efficient"))


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="auto, flash, efficient, cudnn, math, eager"):
        AttentionOptions(backend="fast")


@pytest.mark.parametrize("block_size", [1, 3, 256])
def test_eager_weights_are_summed_softmax(block_size):
    T, S, vis, allowed = CASES["chunk"]
    q, k, v = _qkv(T=T, S=S)
    out, used, weights = attention(q, k, v, vis, AttentionOptions(block_size=block_size), need_weights=True)
    assert used == "eager"
    close(out, naive_attention(q, k, v, allowed), k)
    # reference: full (B, H, T, S) softmax, summed over the queries and heads of each group
    scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(4, dim=1)) / 4.0
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    expected = probs.view(2, 2, 4, T, S).sum(dim=(2, 3))
    # each weight: a score, its share of the softmax over the keys, summed over the group's queries and heads
    assert_within(weights, expected, bound(expected, attention_terms(16, S) + 4 * T))


def test_softcap_goes_eager_and_matches():
    q, k, v = _qkv()
    out, used, _ = attention(q * 5, k, v, Visibility(q_start=0), AttentionOptions(softcap=2.0))
    assert used == "eager"
    close(out, naive_attention(q * 5, k, v, window_allowed(12), softcap=2.0), k)
    with pytest.raises(UnsupportedBackend, match="softcapping"):
        attention(q, k, v, Visibility(q_start=0), AttentionOptions(backend="flash", softcap=2.0))


def test_model_sliding_window_goes_eager():
    q, k, v = _qkv()
    out, used, _ = attention(q, k, v, Visibility(q_start=0), AttentionOptions(sliding_window=4))
    assert used == "eager"
    close(out, naive_attention(q, k, v, window_allowed(12, window=4)), k)


def test_visible_mask_with_sinks_and_empty_slots():
    k_pos = torch.tensor([0, 1, 7, 8, 9, -1])
    mask = visible_mask(torch.tensor([9, 10]), k_pos, window=3, sinks=1)
    assert mask.tolist() == [[True, False, True, True, True, False], [True, False, False, True, True, False]]


class _Spy(TorchDispatchMode):
    """Records every aten op and the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out


@pytest.mark.parametrize("backend", ["auto", "flash", "eager"])
def test_gqa_never_expands_kv_when_query_is_shorter(backend):
    q, k, v = _qkv(B=1, H=8, G=2, T=3, S=64, hs=16)
    with _Spy() as spy:
        attention(q, k, v, Visibility(q_start=61), AttentionOptions(backend=backend))
    expanded = [c for c in spy.calls if any(s[-2:] == (64, 16) and s[1] == 8 for s in c[1] if len(s) == 4)]
    assert not expanded, expanded
    assert spy.calls  # the spy did see the ops


def test_causal_prefill_passes_is_causal_and_builds_no_mask(monkeypatch):
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(T=128, S=128)
    attention(q, k, v, Visibility(q_start=0), AttentionOptions())
    assert seen == [(None, True)]


def _masked_chunk(k_pos_dims: int):
    """A chunk of 11 queries at positions 30..40 over 23 keys in scrambled slots (two empty, -1), k_pos (S,) or
    the same positions for every (sequence, group), (B, G, S). Returns q, k, v, Visibility, naive allowed mask."""
    B, G, S = 2, 2, 23
    k_pos = torch.cat([torch.randperm(21, generator=torch.Generator().manual_seed(1)) * 2, torch.tensor([-1, -1])])
    q, k, v = _qkv(B=B, G=G, T=11, S=S)
    allowed = (k_pos.view(1, -1) <= torch.arange(30, 41).view(-1, 1)) & (k_pos.view(1, -1) >= 0)  # (T, S)
    pos = k_pos if k_pos_dims == 1 else k_pos.expand(B, G, S)
    return q, k, v, Visibility(q_start=30, k_pos=pos), allowed


@pytest.mark.parametrize("k_pos_dims", [1, 3])
@pytest.mark.parametrize("backend", ["auto", "math"])
def test_long_masked_chunk_runs_in_query_blocks(monkeypatch, k_pos_dims, backend):
    """A mask larger than MASK_ELEMENTS is never built whole: SDPA runs on query blocks, each with its own rows."""
    q, k, v, vis, allowed = _masked_chunk(k_pos_dims)
    planes = 1 if k_pos_dims == 1 else 2 * 8  # B * n_head
    monkeypatch.setattr(A, "MASK_ELEMENTS", 4 * planes * 23)  # 4 query rows per call
    masks = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    out, used, _ = attention(q, k, v, vis, AttentionOptions(backend=backend))
    close(out, naive_attention(q, k, v, allowed), k)
    assert [m.shape[-2] for m in masks] == [4, 4, 3]  # 11 queries
    assert all(m.numel() <= A.MASK_ELEMENTS for m in masks)
    assert used == ("flash" if backend == "auto" else backend)


def test_unmasked_long_chunk_is_one_call(monkeypatch):
    """Queries that see every key need no mask and no blocks, however long the call."""
    monkeypatch.setattr(A, "MASK_ELEMENTS", 16)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(T=8, S=20)
    out, _, _ = attention(q, k, v, Visibility(q_start=0, all_visible=True), AttentionOptions())
    close(out, naive_attention(q, k, v, torch.ones(8, 20, dtype=torch.bool)), k)
    assert calls == [1]


BOTTOM_RIGHT_CASES = {  # name: (T, S, Visibility, allowed mask, whether the chunk is bottom-right causal)
    "chunk": (5, 17, Visibility(q_start=12), _lower_right(5, 17), True),
    "long chunk": (40, 64, Visibility(q_start=24), _lower_right(40, 64), True),
    "keys past the chunk": (5, 17, Visibility(q_start=10), torch.ones(5, 17, dtype=torch.bool).tril(10), False),
    "window": (5, 17, Visibility(q_start=12, window=4), window_allowed(17, 4)[12:], False),
    "scrambled slots": (
        5,
        17,
        Visibility(q_start=12, k_pos=torch.arange(17).flip(0)),
        _lower_right(5, 17).flip(1),
        False,
    ),
}


@pytest.mark.parametrize("case", list(BOTTOM_RIGHT_CASES))
def test_flash_runs_a_chunk_over_every_earlier_key_without_a_mask(monkeypatch, case):
    """A chunk whose keys are every earlier token and itself, in order, is causal aligned bottom-right: forced flash
    passes it as `causal_lower_right` (CUDA's flash kernel runs that from its causal flag, where a (T, S) mask has no
    flash kernel), no mask built. Any other chunk keeps its mask. CUDA's check is faked here; on the CPU torch then
    runs the bias through a mask of its own, so the output is checked against naive attention either way."""
    T, S, vis, allowed, bottom_right = BOTTOM_RIGHT_CASES[case]
    monkeypatch.setattr(A, "_flash_runs_bottom_right", lambda *args: True)
    biases, masks = [], []
    monkeypatch.setattr(A, "_lower_right_bias", lambda *size: biases.append(size) or causal_lower_right(*size))
    monkeypatch.setattr(A, "mask_rows", lambda *args: masks.append(1) or mask_rows(*args))
    q, k, v = _qkv(B=2, H=8, G=2, T=T, S=S)
    out, used, _ = attention(q, k, v, vis, AttentionOptions(backend="flash"))
    close(out, naive_attention(q, k, v, allowed), k)
    assert used == "flash"
    assert (biases, bool(masks)) == (([(T, S)], False) if bottom_right else ([], True))


def test_flash_chunks_on_the_cpu_keep_their_mask():
    """The CPU's flash kernel aligns its causal flag top-left: a chunk there is masked, never the bias."""
    q, k, v = _qkv(T=5, S=17)
    assert not A._flash_runs_bottom_right(q, k, v, True)


@pytest.mark.parametrize("form", ["sdpa", "sdpa_gqa"])
@pytest.mark.parametrize("H,G,S,n_valid", [(8, 2, 300, 201), (8, 4, 256, 256), (8, 8, 130, 1), (4, 1, 129, 128)])
def test_static_decode_attention_matches_naive_over_filled_slots(form, H, G, S, n_valid):
    """One query per sequence over a fixed buffer whose first n_valid slots are filled (the rest hold garbage that
    must not count): each SDPA form against naive attention over the filled slots, for GQA ratios 1-8."""
    q, k, v = _qkv(B=2, H=H, G=G, T=1, S=S, hs=16, seed=n_valid)
    k[:, :, n_valid:] = 1e4  # empty slots: anything read from them would dominate the softmax
    opts = AttentionOptions(decode_form=form)
    out = static_decode_attention(q, k, v, torch.tensor(n_valid), opts)  # (B, 1, H * hs)
    expected = naive_attention(q, k[:, :, :n_valid], v[:, :, :n_valid], torch.ones(1, n_valid, dtype=torch.bool))
    close(out, expected.transpose(1, 2).reshape(2, 1, H * 16), k[:, :, :n_valid])


def test_grouped_sdpa_decode_never_expands_kv():
    q, k, v = _qkv(B=1, H=8, G=2, T=1, S=64, hs=16)
    with _Spy() as spy:
        static_decode_attention(q, k, v, torch.tensor(40), AttentionOptions(decode_form="sdpa"))
    expanded = [c for c in spy.calls if any(s[-2:] == (64, 16) and s[1] == 8 for s in c[1] if len(s) == 4)]
    assert not expanded, expanded
    assert spy.calls


def test_backends_are_recorded_by_the_open_blocks_only():
    """`record_backends()` collects what ran inside it (the harness's sdpa_used columns); nothing is kept after."""
    q, k, v = _qkv()
    with record_backends() as outer:
        attention(q, k, v, Visibility(q_start=0), AttentionOptions(backend="math"))
        with record_backends() as inner:
            attention(q, k, v, Visibility(q_start=0), AttentionOptions(backend="eager"))
    attention(q, k, v, Visibility(q_start=0), AttentionOptions(backend="flash"))
    assert (outer, inner) == ({"math", "eager"}, {"eager"})
