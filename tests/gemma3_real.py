"""The real Gemma 3 270M file read by us and by HF's own GGUF loader, in a process of its own (two 1 GB models and
two 560 x 262144 logit tensors: the pytest process keeps its memory figures clean). Prints one JSON line."""

import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from bounds import bound, model_terms  # noqa: E402

from model.load import gemma3_gguf_path, load_pretrained  # noqa: E402

ours, tok = load_pretrained("gemma-3-270m")
path = gemma3_gguf_path()
hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
idx = torch.tensor([[tok.bos_id] + tok.encode("The quick brown fox jumps over the lazy dog. " * 60)[:559]])
with torch.inference_mode():
    expected = hf.eval()(idx).logits
    delta = float((ours(idx).double() - expected.double()).abs().max())
text = "round trip: ünïcödé 42 \U0001f98e"
out = {
    "hf_layer_types": hf.config.layer_types[:6],
    "delta": delta,
    "bound": bound(expected, model_terms(ours.config, 560)),
    "pieces": tok.backend.encode("What is the capital of France? 48001", add_special_tokens=False).tokens,
    "round_trip": tok.decode(tok.encode(text)) == text,
    "chat_template": tok.chat_template,
    "bos": [tok.bos_text, tok.encode("<bos>"), tok.bos_id],
    "eos_is_end_of_turn": tok.eos_id == tok.encode("<end_of_turn>")[0],
    "start_of_turn_tokens": len(tok.encode("<start_of_turn>")),
}
print(json.dumps(out))
