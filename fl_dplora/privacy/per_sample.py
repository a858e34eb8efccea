"""Exact per-example gradients of LoRA parameters, for DP-SGD.

Every LoRA factor is an `nn.Linear` (lora_A: d_in -> r, lora_B: r -> d_out). For a linear layer the
gradient of example b is sum_t g[b,t]^T x[b,t] (g: gradient w.r.t. the layer output, x: its input),
so two hooks per factor give all per-example gradients at a cost of B*T*r*(d_in+d_out) multiply-adds,
small next to the base model's forward+backward. The caller must reduce the loss as a SUM over
examples (per-example mean over tokens is fine): that is the reduction these gradients are exact for.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRAGradSampler:
    """Hooks on the LoRA Linear modules that own `params`; collects per-example gradients.

    Usage: with LoRAGradSampler(model, params) as gs: loss_sum.backward(); g = gs.per_example()
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        wanted = {id(p) for p in params}
        self.modules: list[nn.Linear] = []
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in wanted:
                if module.bias is not None and module.bias.requires_grad:
                    raise ValueError("LoRA factors with a trainable bias are not supported")
                self.modules.append(module)
        found = {id(m.weight) for m in self.modules}
        if found != wanted:
            raise ValueError("every DP-trained parameter must be the weight of an nn.Linear LoRA factor")
        self._inputs: dict[int, torch.Tensor] = {}
        self._pending: dict[int, torch.Tensor] = {}  # output gradients that arrived before the recomputation
        self._per_example: dict[int, torch.Tensor] = {}
        self._handles: list = []
        # Activation checkpointing (transformers' checkpointed decoder blocks) runs each such block again
        # inside the backward pass: a factor in one keeps nothing from the first forward (that is what
        # checkpointing frees); its input is taken from the recomputation. The output gradient of a
        # block's last factors (o_proj, down_proj, c_proj: nothing after them saves a tensor) arrives
        # BEFORE that recomputation starts, so it waits in `_pending` until the input is there.
        # Non-reentrant checkpointing backpropagates the first forward's graph (the hook on its output
        # fires); reentrant checkpointing backpropagates the recomputed graph (the hook on that fires).
        self._recomputed = _checkpointed_modules(model, self.modules)
        self.recompute = bool(self._recomputed)

    def __enter__(self) -> "LoRAGradSampler":
        for module in self.modules:
            # the pre-hook runs before the factor's own ops: non-reentrant checkpointing may stop the
            # recomputation early (at the last saved tensor), inside the factor's forward
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self._inputs.clear()
        self._pending.clear()
        self._per_example.clear()

    @staticmethod
    def _in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1  # a checkpointed block recomputed in the backward pass

    def _pre_hook(self, module: nn.Module, inputs: tuple) -> None:
        if not (torch.is_grad_enabled() and self._in_backward()):
            return
        key = id(module)
        grad = self._pending.pop(key, None)
        if grad is not None:  # its output gradient came first (non-reentrant checkpointing)
            self._compute(key, grad, inputs[0].detach())
        else:
            self._inputs[key] = inputs[0].detach()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        key = id(module)
        if not self._in_backward() and not (key in self._recomputed and module.training):
            self._inputs[key] = inputs[0].detach()
        # in the backward pass this is the recomputed output: backpropagated under reentrant
        # checkpointing only (non-reentrant discards that graph, and the hook never fires)
        output.register_hook(lambda grad, key=key: self._on_grad(key, grad))

    def _on_grad(self, key: int, grad: torch.Tensor) -> None:
        """The factor's per-example gradient as soon as its output gradient and input both exist; the
        input is released right away ([B, T, d_in] -> [B, out, in], r of the two dimensions)."""
        x = self._inputs.pop(key, None)
        if x is None:  # a checkpointed block not recomputed yet: its recomputation computes it
            self._pending[key] = grad.detach()
            return
        self._compute(key, grad, x)

    def _compute(self, key: int, grad: torch.Tensor, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        g = grad.detach().reshape(grad.shape[0], -1, grad.shape[-1])
        self._per_example[key] = torch.einsum("bto,bti->boi", g, x)

    def per_example(self) -> list[torch.Tensor]:
        """Per-example gradients, one (B, out, in) tensor per module, in `self.modules` order."""
        if self._pending or any(id(m) not in self._per_example for m in self.modules):
            raise RuntimeError("LoRA gradient sampler: a factor's input was not recorded (checkpointing "
                               "without recomputation?)")
        return [self._per_example[id(module)] for module in self.modules]

    def clipped_sum(self, max_grad_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sum over examples of per-example gradients clipped to `max_grad_norm` (joint L2 over all factors).

        Returns (one summed tensor per module, per-example norms before clipping).
        """
        grads = self.per_example()
        sq = torch.zeros(grads[0].shape[0], dtype=torch.float64, device=grads[0].device)
        for g in grads:
            sq += g.double().pow(2).sum(dim=(1, 2))
        norms = sq.sqrt()
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0).to(grads[0].dtype)
        summed = [torch.einsum("b,boi->oi", factor, g) for g in grads]
        self.clear()
        return summed, norms


def _checkpointed_modules(model: nn.Module, factors: list[nn.Linear]) -> set[int]:
    """ids of the factors inside a block that transformers checkpoints (recomputed in the backward)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the flag sits on the decoder, whose blocks all checkpoint
        GradientCheckpointingLayer = nn.Module
    wanted = {id(f) for f in factors}
    found: set[int] = set()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False) is True:
            found |= {id(m) for m in module.modules() if id(m) in wanted}
    return found
