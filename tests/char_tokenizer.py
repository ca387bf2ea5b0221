"""A tokenizer of characters for tests on random weights."""


class CharTokenizer:
    """A tokenizer of characters (ids below the tiny model's vocabulary), no chat template: enough to build every
    task and run the protocols on random weights."""

    chat_template = None
    eos_id = 3

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) % 4000 for c in text]

    def decode(self, ids, skip_special: bool = False) -> str:
        return "".join(chr(i - 4) if i >= 4 else "" for i in ids)
