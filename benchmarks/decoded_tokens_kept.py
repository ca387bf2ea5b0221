"""How many of the tokens a cache decodes it still holds after the answer, per layer and KV head, under
`cache.decode=evict`: whether a policy evicts the answer it is writing.

    python benchmarks/decoded_tokens_kept.py                       # knorm, 512 slots, the pass key at 2k
    python benchmarks/decoded_tokens_kept.py --cache snapkv --steps 16

SmolLM2-135M (real weights), sample 0 of `--task`, greedy. Prints the answer, then the mean number of decoded tokens
kept per (layer, KV head) and how many (layer, KV head) caches kept them all.
"""

from __future__ import annotations

import argparse

import torch

from bench.eval.tasks import build
from bench.systems.kvbench import KvbenchSystem
from model.load import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="knorm")
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    model, tokenizer = load_pretrained("smollm2-135m")
    sample = build(args.task, tokenizer, args.ctx, 0, 0)
    ids = torch.tensor([sample.context + sample.questions[0]])  # (1, P): the aware protocol's prompt
    P = ids.shape[1]
    system = KvbenchSystem.around(model, tokenizer, args.cache, args.slots, P)
    system.open(1, P + args.steps)
    tokens = []
    with torch.inference_mode():
        logits = system.forward(ids, 0)
        for i in range(args.steps):
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
            tokens.append(token.item())
            logits = system.forward(token, P + i)
    kept = torch.stack([c.token_positions()[0] for c in model.kv_caches])  # (n_layer, G, slots)
    decoded = (kept >= P).sum(-1)  # (n_layer, G): decoded tokens still held
    print(f"answer {tokenizer.decode(tokens)!r}, expected {sample.answers[0]}")
    print(
        f"{args.cache} at {args.slots} slots: {decoded.float().mean():.2f} of {args.steps} decoded tokens kept per "
        f"(layer, KV head); {int((decoded == args.steps).sum())} of {decoded.numel()} caches kept them all"
    )


if __name__ == "__main__":
    main()
