"""`frozen-dtype = "int8"`: the frozen blocks below the LoRA layers with int8 weights and activations.

The frozen prefix (blocks 0..start-1, frozen_prefix.py) is most of a run's arithmetic: the prefix-cache
build of every training example, and the server's evaluation features. With int8 each nn.Linear
of those blocks (GPT-2's Conv1D too) runs in an `Int8Linear` of a copy of the block that shares
every other tensor with the original:

- weights: int8, symmetric, one scale per output channel (max |w| / 127), quantized once;
- activations: int8, symmetric, one scale per token (max |x| / 127 over that token's features),
  computed on the fly; layers that read the same input (q/k/v, gate/up) quantize it once and run
  as one matmul over their concatenated weights;
- outlier channels, where a layer reads the residual stream (q/k/v, gate/up of LLaMA-style blocks):
  the prefix's residual stream is rotated by a fixed orthogonal matrix R (QuaRot, Ashkboos et al.
  2024; seeded, public, the same on every node): the state entering block 0 is multiplied by R,
  every weight that reads the stream (after its RMSNorm gain is folded into it) by R on its input
  side, every weight that writes it (o_proj, down_proj) by R^T on its output side, and the state
  leaving the last prefix block by R^T. RMSNorm is invariant under R, so in float this is the same
  function; but R spreads a few outlier channels (SmolLM2's massive activations) over all of
  them, so the per-token int8 scale no longer comes from one channel;
- outlier channels elsewhere (o_proj, down_proj inputs; every layer of other blocks, e.g. GPT-2):
  SmoothQuant (Xiao et al. 2023) moves them into the weights, x / s and w * s with
  s = max|x|^a / max|w|^(1 - a) per input channel (a power of two; a = 0.5, 0.3 for down_proj, the
  best of 0.2-0.5 measured on SmolLM2, docs/performance.md), max|x| measured once on fixed random
  token ids (seed 0): public, the same on every node; in a rotated block down_proj's x / s is done
  by up_proj's output rows (the same int8 weights, powers of two), not by an extra pass;
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


class FusedLinears:
    """Linear layers that read the same input (q/k/v, gate/up): one quantization of the input and one
    int8 matmul over their concatenated weights; each layer's call returns its own columns. Every
    output column is the same number a separate layer computes (int32 sums are exact).
    `input_max` (per input channel, from calibration) turns on the SmoothQuant factors.
    Shared by the Int8Linear layers of one group (their `fused`)."""

    def __init__(self, layers: Sequence[nn.Module], input_max: torch.Tensor | None = None,
                 weights: Sequence[torch.Tensor] | None = None, alpha: float | None = None,
                 smoothed_upstream: torch.Tensor | None = None):
        if weights is None:  # `weights`: the layers' [out, in] weights as this copy computes them (rotated)
            weights = [linear_weight(m).detach().float() for m in layers]
        else:
            weights = [w.detach().float() for w in weights]
        self.inv_smooth = None
        alpha = SMOOTH_ALPHA if alpha is None else alpha
        if smoothed_upstream is not None:  # the input arrives divided by these factors already (see int8_copy)
            weights = [w * smoothed_upstream for w in weights]
        elif input_max is not None and alpha is not None:
            s = smoothing(input_max.to(weights[0].device), weights, alpha)
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


SMOOTH_ALPHA: float | None = 0.5  # SmoothQuant's migration strength (see smoothing); None = off
SMOOTH_ALPHA_BY_LAYER: dict[str, float] = {"down_proj": 0.3}  # layer name (e.g. "down_proj") -> its own alpha
ROTATE: bool = True  # rotate the residual stream of LLaMA-style prefixes (see rotation); False = smoothing only
ROTATION_SEED = 0
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


# LLaMA-style block: (norm, the layers that read its output) and the layers that write the residual stream
READS_STREAM = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
WRITES_STREAM = ("self_attn.o_proj", "mlp.down_proj")
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x / rms(x) (not Gemma's (1 + weight))


def rotation(n: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """A fixed random orthogonal [n, n] float64 matrix (QR of a seeded Gaussian, signs fixed): public,
    the same on every node."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotatable(block: nn.Module) -> bool:
    """A LLaMA-style block (RMSNorm gains, q/k/v and gate/up read the normed stream, o_proj and down_proj
    write it without a bias): rotating its residual stream is exact in float."""
    modules = dict(block.named_modules())
    for norm, readers in READS_STREAM:
        n = modules.get(norm)
        if type(n).__name__ not in RMS_NORMS or not isinstance(getattr(n, "weight", None), torch.Tensor):
            return False
        if any(not isinstance(modules.get(r), nn.Linear) for r in readers):
            return False
    return all(isinstance(m := modules.get(w), nn.Linear) and m.bias is None for w in WRITES_STREAM)


class UnitRMSNorm(nn.Module):
    """RMSNorm without its gain (folded into the layers that read it): x / rms(x), as the original computes it.
    What a rotated int8 copy (int8_copy with `rot`) has in place of each RMSNorm that feeds the stream's readers."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotated_weights(block: nn.Module, rot: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer name: its [out, in] weight in the rotated stream}: readers W diag(gain) R, writers R^T W.
    The weights int8_copy quantizes for a rotatable block (QuaRot's folding, exact in float)."""
    modules = dict(block.named_modules())
    out = {}
    for norm, readers in READS_STREAM:
        gain = modules[norm].weight.detach().double()
        for name in readers:
            out[name] = (modules[name].weight.detach().double() * gain) @ rot
    for name in WRITES_STREAM:
        out[name] = rot.t() @ modules[name].weight.detach().double()
    return {k: v.float() for k, v in out.items()}


def int8_copy(block: nn.Module, input_max: dict[nn.Module, torch.Tensor] | None = None,
              rot: torch.Tensor | None = None) -> nn.Module:
    """`block` with each Linear replaced by an Int8Linear; every other tensor is the original's (shared).
    `input_max`: per-input-channel maxima of each original Linear's input (calibrate), for smoothing.
    `rot` (rotatable blocks only): the copy reads and writes the residual stream rotated by `rot` (its
    norms lose their gains, folded into the readers' weights); the caller rotates the stream in and out."""
    keep = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    twin = copy.deepcopy(block, keep)
    originals = dict(block.named_modules())
    rotated: dict[str, torch.Tensor] = {}
    upstream: dict[str, torch.Tensor] = {}
    if rot is not None:
        rotated = rotated_weights(block, rot)
        down_max = (input_max or {}).get(originals["mlp.down_proj"])
        alpha = SMOOTH_ALPHA_BY_LAYER.get("down_proj", SMOOTH_ALPHA)
        if down_max is not None and alpha is not None:
            # down_proj's smoothing, x / s, done by up_proj: its output rows divided by s (powers of two:
            # the same int8 weights, the same products), so down_proj's input needs no extra pass
            s = smoothing(down_max.to(rotated["mlp.down_proj"].device), [rotated["mlp.down_proj"]], alpha)
            rotated["mlp.up_proj"] = rotated["mlp.up_proj"] / s[:, None]
            upstream["mlp.down_proj"] = s
        for norm, _ in READS_STREAM:  # the gain is in the readers' weights now
            setattr(twin, norm, UnitRMSNorm(getattr(block, norm)))
    for prefix, parent in list(twin.named_modules()):
        children = {name: child for name, child in parent.named_children() if linear_weight(child) is not None}

        def full(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        def fused(names: Sequence[str]) -> FusedLinears:
            layers = [children[n] for n in names]
            stats = (input_max or {}).get(originals.get(full(names[0])))
            alpha = SMOOTH_ALPHA_BY_LAYER.get(names[0])
            if full(names[0]) in rotated:  # readers of the rotated stream: R has spread the outliers, no smoothing
                reads = full(names[0]) not in WRITES_STREAM
                return FusedLinears(layers, None if reads else stats, [rotated[full(n)] for n in names], alpha,
                              upstream.get(full(names[0])))
            return FusedLinears(layers, stats, alpha=alpha)

        for group in FUSED_GROUPS:
            if all(name in children for name in group):
                shared = fused(group)
                for i, name in enumerate(group):
                    setattr(parent, name, Int8Linear(children.pop(name), shared, i))
        for name, child in children.items():
            setattr(parent, name, Int8Linear(child, fused([name])))
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
    key = (start, fingerprint, SMOOTH_ALPHA, tuple(sorted(SMOOTH_ALPHA_BY_LAYER.items())), ROTATE)
    hit = _COPIES.get(blocks)
    if hit is not None and hit[0] == key:
        return hit[1]
    prefix = list(blocks)[:start]
    maxima = calibrate(decoder, blocks, start) if SMOOTH_ALPHA is not None else None
    rot = None
    if ROTATE and all(rotatable(b) for b in prefix):
        q_proj = prefix[0].self_attn.q_proj
        rot = rotation(q_proj.in_features).to(q_proj.weight.device)
    copies = [int8_copy(b, maxima, rot) for b in prefix]
    if rot is not None:
        _rotate_stream(copies[0], copies[-1], rot)
    _COPIES[blocks] = (key, copies)
    return copies


def _rotate_stream(first: nn.Module, last: nn.Module, rot: torch.Tensor) -> None:
    """The state entering `first` times R, the state leaving `last` times R^T (float32 matmuls)."""
    into, back = rot.float(), rot.t().float().contiguous()

    def times(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return x @ (m if m.dtype == x.dtype else m.to(x.dtype))

    def enter(module, args, kwargs):
        if args:
            return (times(args[0], into), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": times(kwargs["hidden_states"], into)}

    def leave(module, args, kwargs, output):
        return times(output, back) if isinstance(output, torch.Tensor) else (times(output[0], back), *output[1:])

    first.register_forward_pre_hook(enter, with_kwargs=True)
    last.register_forward_hook(leave, with_kwargs=True)
