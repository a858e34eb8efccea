"""`frozen-dtype = "int8"`: the frozen blocks below the LoRA layers with int8 weights and activations.

The frozen prefix (blocks 0..start-1, forward.py) is most of a run's arithmetic: the prefix-cache
build of every training example, and the server's evaluation features. With int8 each nn.Linear
of those blocks (GPT-2's Conv1D too) runs in an `Int8Linear` of a copy of the block that shares
every other tensor with the original:

- weights: int8, symmetric, one scale per output channel (max |w| / 127), quantized once;
- activations: int8, symmetric, one scale per token (max |x| / 127 over that token's features),
  computed on the fly; layers that read the same input (q/k/v, gate/up) quantize it once and run
  as one matmul over their concatenated weights;
- outlier channels: SmoothQuant (Xiao et al. 2023) moves them into the weights, x / s and w * s with
  s = max|x|^0.5 / max|w|^0.5 per input channel (a power of two), max|x| measured once on fixed
  random token ids (seed 0): public, the same on every node;
- products: exact int32 sums by `torch._int_mm` (oneDNN's int8 matmul, AVX-512 VNNI here; the
  kernel torchao's int8 dynamic quantization calls on CPU), then rescaled to float32.

Attention, norms, rotary embeddings and the residual stream stay float32.

Why per token rather than `torch.ao.quantization.quantize_dynamic` (deprecated in torch 2.13 and
scheduled for removal; its activation scale is one number per tensor): a per-tensor scale is the
max over the whole batch, so one example's states would depend on which examples (and how much
padding) shared its batch. DP-SGD's per-example clipping bounds an example's influence only if each
example's loss is a function of that example alone; per token, every row's numbers depend on that
token's own features and the public weights, so batching, padding and the shared-token shortcut
(shared_prefix.py) change nothing but float rounding. The int8 prefix is a fixed public function
applied per example, like the float32 one: it costs no privacy (docs/performance.md).
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Sequence

import torch
from torch import nn

# torch._int_mm refused a shape or device once: from then on float32 products of the same integers
_INT_MM_OK = [True]


def matmul_path() -> str:
    """The int8 matmul this process uses now."""
    return "torch._int_mm" if _INT_MM_OK[0] else "float32 mm of the int8 values"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], float32 scale [M, 1]): symmetric, one scale per row."""
    low, high = torch.aminmax(x, dim=-1, keepdim=True)  # one pass (torch.linalg.vector_norm(inf) is ~10x slower here)
    amax = torch.maximum(high, low.neg_()).clamp_min_(1e-30)
    q = torch.mul(x, 127.0 / amax).round_().to(torch.int8)
    return q, amax.div_(127.0)


def int8_matmul(q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N], exact."""
    if _INT_MM_OK[0]:
        try:
            return torch._int_mm(q, weight_t)
        except RuntimeError:  # a shape or device its kernels refuse
            _INT_MM_OK[0] = False
    return torch.mm(q.float(), weight_t.float()).round_().to(torch.int32)


def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [K, N], float32 scale [N]): symmetric, one scale per output channel."""
    scale = w.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    return torch.round(w / scale[:, None]).to(torch.int8).t().contiguous(), scale


def smoothing(input_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s = max|x|^alpha / max|w|^(1 - alpha) (Xiao et al. 2023),
    rounded to powers of two (exact in float; a last-bit difference in the calibration cannot move
    them): x / s and w * s give the same products, with the activations' outlier channels tamed
    before the per-token int8 scale sees them."""
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = input_max.float().clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1.0 - alpha)
    return torch.exp2(torch.log2(s.clamp(1e-4, 1e4)).round())


class _Fused:
    """Linear layers that read the same input (q/k/v, gate/up): one quantization of the input and one
    int8 matmul over their concatenated weights; each layer's call returns its own columns. Every
    output column is the same number a separate layer computes (int32 sums are exact).
    `input_max` (per input channel, from calibration) turns on the SmoothQuant factors."""

    def __init__(self, layers: Sequence[nn.Module], input_max: torch.Tensor | None = None):
        weights = [linear_weight(m).detach().float() for m in layers]
        self.inv_smooth = None
        if input_max is not None and SMOOTH_ALPHA is not None:
            s = smoothing(input_max.to(weights[0].device), weights, SMOOTH_ALPHA)
            weights = [w * s for w in weights]
            self.inv_smooth = 1.0 / s
        parts = [_quantize_weight(w) for w in weights]
        self.weight_t = torch.cat([w for w, _ in parts], dim=1).contiguous()
        self.weight_scale = torch.cat([s for _, s in parts])
        sizes = [s.numel() for _, s in parts]
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        biases = [getattr(m, "bias", None) for m in layers]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(n, device=self.weight_t.device) if b is None else b.detach().float() for b, n in zip(biases, sizes)])
        self.key: tuple | None = None
        self.outputs: list[torch.Tensor | None] = []

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.key is None or self.key[0] is not x or self.key[1] != x._version or self.outputs[index] is None:
            rows = x.reshape(-1, x.shape[-1]).float()
            if self.inv_smooth is not None:
                rows = rows * self.inv_smooth
            q, scale = quantize_rows(rows)
            y = int8_matmul(q, self.weight_t).to(torch.float32)
            y.mul_(scale).mul_(self.weight_scale)
            if self.bias is not None:
                y.add_(self.bias)
            # each layer's columns (a strided view when several layers share the matmul)
            self.outputs = [y[:, a:b] if len(self.bounds) > 1 else y for a, b in self.bounds]
            self.key = (x, x._version)
        out, self.outputs[index] = self.outputs[index], None  # each layer takes its own columns once
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    def clear(self) -> None:
        self.key, self.outputs = None, []


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x int8 per token (int32 accumulation); with
    `fused`, one of several layers that read the same input (see _Fused)."""

    def __init__(self, layer: nn.Module, fused: _Fused | None = None, index: int = 0):
        super().__init__()
        weight = linear_weight(layer)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.fused = fused if fused is not None else _Fused([layer])
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel x int8 per token"


SMOOTH_ALPHA: float | None = 0.5  # SmoothQuant's migration strength (see smoothing); None = off
CALIBRATION_TOKENS = (8, 64)  # fixed random token ids (seed 0) the activation maxima come from: public

# Layers of one module that read the same input, by name (LLaMA-style blocks); others run alone.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """A Linear layer's [out, in] weight (GPT-2's Conv1D stores [in, out]), else None."""
    if isinstance(module, nn.Linear):
        return module.weight
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return None
    return module.weight.t() if isinstance(module, Conv1D) else None


def int8_copy(block: nn.Module, input_max: dict[nn.Module, torch.Tensor] | None = None) -> nn.Module:
    """`block` with each Linear replaced by an Int8Linear; every other tensor is the original's (shared).
    `input_max`: per-input-channel maxima of each original Linear's input (calibrate), for smoothing."""
    keep = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    twin = copy.deepcopy(block, keep)
    originals = dict(block.named_modules())
    for prefix, parent in list(twin.named_modules()):
        children = {name: child for name, child in parent.named_children() if linear_weight(child) is not None}

        def stats(name: str) -> torch.Tensor | None:
            return (input_max or {}).get(originals.get(f"{prefix}.{name}" if prefix else name))

        for group in FUSED_GROUPS:
            if all(name in children for name in group):
                fused = _Fused([children[name] for name in group], stats(group[0]))
                for i, name in enumerate(group):
                    setattr(parent, name, Int8Linear(children.pop(name), fused, i))
        for name, child in children.items():
            setattr(parent, name, Int8Linear(child, _Fused([child], stats(name))))
    return twin.eval().requires_grad_(False)


class _Calibrated(Exception):
    """Raised before blocks[start] once the prefix's Linear inputs have been seen."""


@torch.no_grad()
def calibrate(decoder: nn.Module, blocks: nn.ModuleList, start: int) -> dict[nn.Module, torch.Tensor]:
    """Per-input-channel max |x| of every Linear in blocks[:start] on fixed random token ids (seed 0):
    public inputs, the same on every node, never a node's data."""
    device = next(iter(decoder.parameters())).device
    vocab = decoder.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, CALIBRATION_TOKENS, generator=torch.Generator().manual_seed(0)).to(device)
    maxima: dict[nn.Module, torch.Tensor] = {}

    def record(module, args):
        seen = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
        maxima[module] = torch.maximum(maxima[module], seen) if module in maxima else seen

    def stop(module, args, kwargs):
        raise _Calibrated

    handles = [m.register_forward_pre_hook(record) for b in list(blocks)[:start] for m in b.modules()
               if linear_weight(m) is not None]
    handles.append(blocks[start].register_forward_pre_hook(stop, with_kwargs=True, prepend=True))
    try:
        decoder(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _Calibrated:
        pass
    finally:
        for h in handles:
            h.remove()
    return maxima


def release(blocks: Sequence[nn.Module]) -> None:
    """Drop the inputs and outputs the quantized copies keep between calls."""
    for block in blocks:
        for m in block.modules():
            if isinstance(m, Int8Linear):
                m.fused.clear()


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder's blocks -> (key, int8 copies)


def int8_blocks(decoder: nn.Module, blocks: nn.ModuleList, start: int, fingerprint: str) -> list[nn.Module]:
    """int8 copies of blocks[:start], made once per process and per prefix weights (`fingerprint`)."""
    hit = _COPIES.get(blocks)
    if hit is not None and hit[0] == (start, fingerprint, SMOOTH_ALPHA):
        return hit[1]
    maxima = calibrate(decoder, blocks, start) if SMOOTH_ALPHA is not None else None
    copies = [int8_copy(b, maxima) for b in list(blocks)[:start]]
    _COPIES[blocks] = ((start, fingerprint, SMOOTH_ALPHA), copies)
    return copies
