"""Weights stored (out, in) and multiplied through F.linear (`GPT.set_weight_layout("out_in")`) against the model as
built, (in, out): the same logits as the naive reference on the original weights, tied embedding included, and the
same greedy tokens through the compiled decode step."""

import copy

import pytest
import torch
from reference import naive_forward

from model.compiled_decode import CompiledDecode
from model.gpt import GPT, Linear


@pytest.mark.parametrize("tied", [True, False])
@torch.inference_mode()
def test_out_in_storage_gives_the_reference_logits(tied):
    model = GPT.from_name("tiny", tie_embeddings=tied).eval()
    original = copy.deepcopy(model)
    model.set_weight_layout("out_in")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.layout == "out_in" and m.weight.shape == (m.out_features, m.in_features) for m in linears)
    assert all(m.weight.is_contiguous() for m in linears)
    idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    allowed = torch.ones(40, 40, dtype=torch.bool).tril()
    expected = naive_forward(original, idx, allowed)
    assert (model(idx) - expected).abs().max() <= 1e-4
    model.set_weight_layout("in_out")  # and back: the storage the loaders write
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))
    with pytest.raises(ValueError, match="weight layout 'col' is not valid; valid choices: in_out, out_in"):
        model.set_weight_layout("col")


@torch.inference_mode()
def test_the_compiled_step_on_out_in_weights_gives_the_eager_tokens():
    model = GPT.from_name("tiny").eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    runs = []
    for layout, compiled in (("in_out", None), ("out_in", True)):
        model.set_weight_layout(layout)
        model.set_kv_caches(2, "dense", 140)
        token = model(prompt, input_pos=0)[:, -1:].argmax(-1)  # (B, 1)
        step = model if compiled is None else CompiledDecode(model)
        tokens = []
        for i in range(32):
            token = step(token, input_pos=100 + i)[:, -1:].argmax(-1)
            tokens.append(token)
        runs.append(torch.cat(tokens, 1))
    assert torch.equal(runs[0], runs[1])
    model.clear_kv_caches()
