"""Split one chunk's backward into an input-gradient pass (B) and a weight-gradient pass (W).

During F, forward hooks record the output of every module that directly owns
trainable parameters. B runs `torch.autograd.grad` for the chunk's input and
those recorded outputs only (autograd then skips every weight-gradient
kernel); W runs, per owner module, `backward(output, its gradient,
inputs=its own parameters)`, which executes only that module's local
weight-gradient work. The sum equals one ordinary backward.

Assumption (checked where it can be): each parameter is used only inside the
forward of the module that owns it, which runs once per forward. Where a
module runs twice, returns a non-tensor, shares a parameter with another
module, or says it reads another module's parameters (`uses_foreign_parameters`,
e.g. a tied head on the embedding's stage), that microbatch falls back to a full
backward in B and a no-op W. Owner modules must be called as modules
(`module(x)`, not `module.forward(x)`): the record comes from forward hooks.
"""
from __future__ import annotations

import contextlib

import torch


class WeightGradSplit:
    """Input/weight gradient split for one chunk module."""

    def __init__(self, module: torch.nn.Module):
        self.owners = []  # (module, its directly owned trainable parameters)
        seen: set[int] = set()
        self.supported = True
        for mod in module.modules():
            if getattr(mod, "uses_foreign_parameters", False):
                self.supported = False
            params = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            if any(id(p) in seen for p in params):
                self.supported = False
            seen.update(id(p) for p in params)
            self.owners.append((mod, params))

    @contextlib.contextmanager
    def record(self):
        """Run a forward inside: yields a Record of every owner module's output (or None)."""
        if not self.supported:
            yield None
            return
        record = Record(len(self.owners))
        handles = [mod.register_forward_hook(record.hook(n)) for n, (mod, _) in enumerate(self.owners)]
        try:
            yield record
        finally:
            for h in handles:
                h.remove()

    def input_grads(self, root, grad, x, record):
        """B: gradient of `x` (None if x needs none); keeps what W needs in the returned state.

        Without a usable record this runs the full backward (weights included) and W does nothing.
        """
        want_x = x is not None and x.requires_grad
        if record is None or not record.usable():
            torch.autograd.backward(root, grad)
            return (x.grad if want_x else None), None
        outs = record.outputs
        inputs = ([x] if want_x else []) + outs
        grads = torch.autograd.grad(root, inputs, grad_outputs=grad, retain_graph=True, allow_unused=True)
        dx = grads[0] if want_x else None
        out_grads = grads[1:] if want_x else grads
        pending = [(o, g, self.owners[n][1]) for n, o, g in zip(record.index, outs, out_grads) if g is not None]
        return dx, pending

    @staticmethod
    def weight_grads(pending) -> None:
        """W: accumulate the parameter gradients left by `input_grads`."""
        for out, grad, params in pending or ():
            torch.autograd.backward(out, grad, inputs=params, retain_graph=True)


class Record:
    """Outputs of the owner modules seen during one forward."""

    def __init__(self, num_owners: int):
        self.calls = [0] * num_owners
        self.index: list[int] = []
        self.outputs: list[torch.Tensor] = []
        self.bad = False

    def hook(self, n: int):
        def _hook(module, args, output):
            self.calls[n] += 1
            if not isinstance(output, torch.Tensor):
                self.bad = True
            elif output.requires_grad:
                self.index.append(n)
                self.outputs.append(output)
        return _hook

    def usable(self) -> bool:
        # every owner exactly once: an owner never called through __call__ (e.g. a layer run via
        # forward_unchecked) records no output, and its weight gradients would be lost in W
        return not self.bad and all(c == 1 for c in self.calls)
