"""Compile our Triton decode kernel (model/triton_decode.py) for sm_90 on any machine, with the specialisation
Triton's launcher applies on a GPU (pointers and strides divisible by 16), and count PTX instructions of interest,
registers and spilled bytes.

    python tests/triton_sm90.py bf16 64 4 0    # dtype, BLOCK_N, num_warps, bits (0: float K/V) -> a JSON line

Used by tests/test_triton_decode.py in a process of its own (without TRITON_INTERPRET)."""

import inspect
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.triton_decode import _split_kernel  # noqa: E402

COUNTED = ("cp.async.cg.shared.global", "cp.async.wait_group", "mma.sync", "ld.global.b16", "ld.global.v4")


def main() -> None:
    dtype, block_n, num_warps, bits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    names = list(inspect.signature(_split_kernel.fn).parameters)
    constexprs = {
        "scale_log2": 0.125 * math.log2(math.e),
        "G": 8,
        "QPK": 4,
        "HS": 64,
        "SPLITS": 9,
        "BLOCK_M": 16,
        "BLOCK_N": block_n,
        "IEEE": False,
        "BITS": bits,
        "GS": 32,
    }
    kv = f"*{dtype}" if bits == 0 else "*u8"
    pointers = {
        "Q": f"*{dtype}",
        "K": kv,
        "V": kv,
        "N_VALID": "*i64",
        "OUT": "*fp32",
        "LSE": "*fp32",
        **{name: "*fp16" for name in ("K_SCALE", "K_ZERO", "V_SCALE", "V_ZERO")},
    }
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs and n != "N_VALID"}
    source = ASTSource(
        fn=_split_kernel,
        signature=signature,
        attrs=attrs,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3}
    )
    ptx = compiled.asm["ptx"]
    print(json.dumps({**{name: ptx.count(name) for name in COUNTED}, **registers(ptx)}))


def registers(ptx: str) -> dict:
    """Registers per thread and spilled bytes, from Triton's bundled ptxas (-v) on the PTX, for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(90)  # triton >= 3.6 takes the architecture
    except TypeError:
        tool = get_ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        cmd = [getattr(tool, "path", tool), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(tmp, "k.cubin"))]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    used = re.search(r"Used (\d+) registers", report)
    return {"registers": int(used[1]), "spill_store_bytes": int(spills[1]), "spill_load_bytes": int(spills[2])}


if __name__ == "__main__":
    main()
