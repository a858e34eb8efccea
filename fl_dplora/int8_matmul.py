"""int8 products for the frozen prefix (frozen_int8.py builds the copies that use them): per-token
int8 activations x per-output-channel int8 weights, exact int32 sums by `torch._int_mm` (oneDNN's int8
matmul, AVX-512 VNNI here; the kernel torchao's int8 dynamic quantization calls on CPU), rescaled to
float32; the linear layers that read one input as one matmul; glibc's allocator kept from returning
each layer's output to the OS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_ALPHA = 0.5  # SmoothQuant's migration strength where a caller gives none (see smoothing)

# torch._int_mm refused a shape or device once: from then on float32 products of the same integers
_INT_MM_OK = [True]


def matmul_path() -> str:
    """The int8 matmul this process uses now."""
    return "torch._int_mm" if _INT_MM_OK[0] else "float32 mm of the int8 values"


def quantize_rows(x: torch.Tensor, residue: bool = False, tail: int = 0) -> tuple[torch.Tensor, ...]:
    """[M, K] float -> (int8 [M, K], float32 scale [M, 1]): symmetric, one scale per row. With `residue`,
    a third item: the rounding residue in int8 steps of 1 / 254 of the first's (x ~ scale (q + r / 254)).
    The last `tail` columns neither set the scale nor enter the int8 values (zeros there)."""
    body = x[:, : x.shape[1] - tail] if tail else x
    amax = body.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # torch.aminmax(dim=-1): 15x as long here
    t = torch.mul(x, 127.0 / amax)
    if tail:
        t[:, t.shape[1] - tail :] = 0.0
    q = t.round() if residue else t.round_()
    out = (q.to(torch.int8), amax.div_(127.0))
    return (*out, t.sub_(q).mul_(254.0).round_().to(torch.int8)) if residue else out


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


class FusedLinears:
    """Linear layers that read the same input (q/k/v, gate/up): one quantization of the input and one
    int8 matmul over their concatenated weights; each layer's call returns its own columns. Every
    output column is the same number a separate layer computes (int32 sums are exact).
    `input_max` (per input channel, from calibration) turns on the SmoothQuant factors. Shared by the
    Int8Linear layers of one group (their `fused`). `float_tail`, `terms`: see int8_copy, TWO_TERMS."""

    def __init__(self, layers: Sequence[nn.Module], input_max: torch.Tensor | None = None,
                 weights: Sequence[torch.Tensor] | None = None, alpha: float | None = DEFAULT_ALPHA,
                 smoothed_upstream: torch.Tensor | None = None, float_tail: int = 0, terms: int = 1):
        if weights is None:  # `weights`: the layers' [out, in] weights as this copy computes them (rotated)
            weights = [linear_weight(m).detach().float() for m in layers]
        else:
            weights = [w.detach().float() for w in weights]
        self.inv_smooth = None
        if smoothed_upstream is not None:  # the input arrives divided by these factors already (see int8_copy)
            weights = [w * smoothed_upstream for w in weights]
        elif input_max is not None and alpha is not None:
            s = smoothing(input_max.to(weights[0].device), weights, alpha)
            weights = [w * s for w in weights]
            self.inv_smooth = 1.0 / s
        self.tail, self.terms = float_tail, terms  # the last `float_tail` input columns: float32 products
        self.tail_weight = torch.cat([w[:, w.shape[1] - float_tail:] for w in weights]).t().contiguous()
        # The int8 weights keep all K rows, zero in the tail: oneDNN's int8 GEMM ran ~10x slower at
        # K = 572 than at 576 here (and its int32 output converted ~10x slower too).
        parts = [_quantize_weight(torch.cat([w[:, : w.shape[1] - float_tail], torch.zeros_like(w[:, :float_tail])], 1))
                 for w in weights]
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
            q, scale, *residue = quantize_rows(rows, self.terms == 2, self.tail)
            y = int8_matmul(torch.cat([q, *residue]) if residue else q, self.weight_t).to(torch.float32)
            if residue:  # the rounding residue's rows, a second int8 term from the same matmul
                y = y[len(q) :].mul_(1.0 / 254.0).add_(y[: len(q)])
            y.mul_(scale).mul_(self.weight_scale)
            for k in range(self.tail):  # massive channels in float32 (addcmul: addmm_ with K = 4 was 3x slower)
                y.addcmul_(rows[:, rows.shape[1] - self.tail + k, None], self.tail_weight[k])
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
    `fused`, one of several layers that read the same input (see FusedLinears)."""

    def __init__(self, layer: nn.Module, fused: FusedLinears | None = None, index: int = 0):
        super().__init__()
        weight = linear_weight(layer)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.fused = fused if fused is not None else FusedLinears([layer])
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel x int8 per token"


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """A Linear layer's [out, in] weight (GPT-2's Conv1D stores [in, out]), else None."""
    if isinstance(module, nn.Linear):
        return module.weight
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return None
    return module.weight.t() if isinstance(module, Conv1D) else None


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30  # heap a process keeps after int8 copies exist (see keep_freed_memory)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks up to KEEP_FREED_BYTES instead of returning them to the OS.
    The int8 build allocates and frees an output of several MB per layer call; with glibc's defaults
    each such block is a fresh mmap whose pages fault in on first write (measured here: int8 build of
    160 examples 4.01 s -> 2.87 s, float32 8.82 -> 8.40 s; the same as MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ in the environment, or jemalloc/tcmalloc by LD_PRELOAD, which Intel's PyTorch
    CPU guide recommends for the same reason). Process-wide: the process's RSS stays near its peak.
    False where there is no glibc (nothing changes then)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # glibc refuses an mmap threshold above 32 MiB (64-bit): blocks larger than that are still mmap'd
        mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) and mmap_ok)
    except (OSError, AttributeError):
        return False
