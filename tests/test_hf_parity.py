"""Parity with HF transformers (a test reference only): same weights, same logits."""

import functools

import pytest
import torch
from bounds import assert_within, bound, model_terms

from model.generate import generate
from model.load import SMOLLM2_GGUF, load_hf_checkpoint, smollm2_gguf_path

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

transformers = pytest.importorskip("transformers")


def test_random_tiny_llama_checkpoint(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = load_hf_checkpoint(tmp_path)
    idx = torch.randint(0, 512, (2, 40))
    with torch.inference_mode():
        expected = hf(idx).logits
        tolerance = bound(expected, model_terms(ours.config, 40))
        assert_within(ours(idx), expected, tolerance)
        ours.set_kv_caches(batch_size=2, cache="dense", cache_length=40)
        chunked = torch.cat(
            [ours(idx[:, :30], input_pos=0)] + [ours(idx[:, i : i + 1], input_pos=i) for i in range(30, 40)], dim=1
        )
    assert_within(chunked, expected, tolerance)


@pytest.fixture(scope="module")
def hf_smollm2():
    """HF's own GGUF loader and tokenizer. It parses the file once for the config, once for the weights and once for
    the tokenizer, and rebuilds gguf's tensor-name map for each of the model's 397 modules, most of its load time:
    both are pure functions of their arguments, memoized for the fixture's loads, which compute the same thing."""
    gguf = pytest.importorskip("gguf")
    readers: dict[str, object] = {}
    parse = gguf.GGUFReader

    def reader(path, *args, **kwargs):
        if str(path) not in readers:
            readers[str(path)] = parse(path, *args, **kwargs)
        return readers[str(path)]

    path = smollm2_gguf_path()
    with pytest.MonkeyPatch.context() as patch:  # transformers imports both from gguf at call time
        patch.setattr(gguf, "GGUFReader", reader)
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=SMOLLM2_GGUF)
    return model.eval(), tok


def test_smollm2_logits_match_hf_gguf_loader(smollm2, hf_smollm2):
    ours, tok = smollm2
    hf, _ = hf_smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 12
    idx = torch.tensor([tok.encode(text)[:64]])
    assert idx.shape == (1, 64)
    with torch.inference_mode():
        expected = hf(idx).logits
        assert_within(ours(idx), expected, bound(expected, model_terms(ours.config, 64)))


def test_tokenizer_matches_hf(smollm2, hf_smollm2):
    _, tok = smollm2
    _, hf_tok = hf_smollm2
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in 3 words, 1999 ünïcödé."}]
    for text in ["Hello world 12345  x", "  leading spaces\nand\ttabs", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
    assert (
        tok.encode_chat(msgs)
        == hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    ids = tok.encode("round trip: ünïcödé 42")
    assert tok.decode(ids) == "round trip: ünïcödé 42"


def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, torch.tensor([ids]), max_new_tokens=24, eos_id=tok.eos_id)
    answer = tok.decode(out[0, len(ids) :], skip_special=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_gemma3_file_matches_hf_gguf_loader_and_reads_sentencepiece_bpe():
    """The real Gemma 3 270M file read by us and by HF's own GGUF loader (each dequantizes; HF subtracts the 1
    llama.cpp adds to every norm): the same logits over 560 tokens, past the 512-token window of the local layers.
    Its tokenizer: pieces as SentencePiece merges them (best-scored pair first), whole words with their leading "▁",
    digits one by one, bytes for characters the vocabulary lacks, control tokens whole; the file (the pretrained
    model) carries no chat template, so prompts are plain text after <bos>. In a process of its own (tests/
    gemma3_real.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "gemma3_real.py")], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["hf_layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert got["delta"] <= got["bound"], got
    assert got["pieces"] == ["What", "▁is", "▁the", "▁capital", "▁of", "▁France", "?", "▁", "4", "8", "0", "0", "1"]
    assert got["round_trip"] and got["chat_template"] is None and got["bos"] == ["<bos>", [2], 2]
    assert got["eos_is_end_of_turn"] and got["start_of_turn_tokens"] == 1
