"""The graph torch.compile hands inductor for a decode step, traced through AOT autograd without compiling it."""

import torch
from torch._dynamo.backends.common import aot_autograd


def traced_step(decoder, token: torch.Tensor) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """(the forward graph of `decoder._forward` at its device position, the logits it gave when run)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    logits = torch.compile(decoder._forward, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(token)
    return graphs[-1], logits


def call_targets(graph: torch.fx.GraphModule) -> list[str]:
    """The ops the graph calls, in order, e.g. "aten.bmm.default"."""
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
