"""How does a CPU multiply a decode step's small batch at the machine's peak?

`packed_linears(model)`: while open, the model's plain linear layers multiply with their weights
reordered once into oneDNN's blocked layout (torch's private mkldnn ops, what torch.compile's CPU
freezing uses). The own greedy loop (generation.py) opens it around a call's batches.
"""
import contextlib

import torch


class _PackedLinear:
    """A linear layer's forward on its weight in oneDNN's blocked layout, reordered at the first
    call: a layer the loop never runs (the output layer under best_allowed, 262,144 x 640 in
    Gemma 3) costs neither the reorder nor the memory."""

    def __init__(self, module):
        self.module, self.packed = module, None

    def __call__(self, x):
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.module.weight.detach())
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.module.bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model):
    """While open, every plain nn.Linear of `model` held in CPU memory in float32 (or bfloat16
    where oneDNN computes it natively) multiplies with its weight reordered once into oneDNN's
    blocked layout (what torch.compile's CPU freezing does). A decode step is a small-batch
    matmul whose weights stream from memory; in the plain row-major layout MKL reaches about
    half the machine's peak there, in the blocked one nearly all of it (BENCHMARKS.md, "Measured
    by hand"). The packed copies exist only while the block
    runs, so training and later weight changes never see stale ones. Yields how many layers
    multiply packed (0 on a GPU, for quantised layers, or with a torch without oneDNN)."""
    mkldnn = torch.ops.mkldnn
    usable = torch.backends.mkldnn.is_available() and all(
        hasattr(mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported"))
    dtypes = {torch.float32, torch.bfloat16} if usable and mkldnn._is_mkldnn_bf16_supported() else {torch.float32}
    patched = []
    if usable:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            # An instance-level forward (accelerate's offload hooks, another wrapper) is left alone.
            if type(module) is not torch.nn.Linear or "forward" in vars(module) or hasattr(module, "_hf_hook") \
                    or weight.device.type != "cpu" or weight.dtype not in dtypes:
                continue
            module.forward = _PackedLinear(module)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward

