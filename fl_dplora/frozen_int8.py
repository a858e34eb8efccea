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
  function; but R spreads outlier channels over all of them, so the per-token int8 scale no longer
  comes from one channel. Massive channels (SmolLM2's 507, 247, 308, 230: ~40 % of every normed
  token's energy, gains near 0 in many readers) stay out of R and of the int8 products: the
  MASSIVE_CHANNELS with the largest mean |x / rms(x)| on the calibration tokens, R's last columns,
  multiplied in float32 by the readers (rotated, they took half of each token's int8 range and
  added the weights' rounding noise that their small gains suppress);
- outlier channels elsewhere (o_proj, down_proj inputs; every layer of other blocks, e.g. GPT-2):
  SmoothQuant (Xiao et al. 2023), x / s and w * s with s = max|x|^a / max|w|^(1 - a) per input channel
  (a power of two; a = 0.5, 0.3 for down_proj, measured on SmolLM2, docs/performance.md), max|x| from
  fixed random token ids (seed 0): public, the same on every node; in a rotated block up_proj's
  output rows do down_proj's x / s (the same int8 weights, powers of two), not an extra pass;
- TWO_TERMS (down_proj, whose SiLU-gated inputs are heavy-tailed): two int8 terms per activation,
  x ~ s (q + r / 254) with r the rounding residue, both in one matmul;
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
                 weights: Sequence[torch.Tensor] | None = None, alpha: float | None = None,
                 smoothed_upstream: torch.Tensor | None = None, float_tail: int = 0, terms: int = 1):
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


SMOOTH_ALPHA: float | None = 0.5  # SmoothQuant's migration strength (see smoothing); None = off
SMOOTH_ALPHA_BY_LAYER: dict[str, float] = {"down_proj": 0.3}  # layer name (e.g. "down_proj") -> its own alpha
ROTATE: bool = True  # rotate the residual stream of LLaMA-style prefixes (see rotation); False = smoothing only
ROTATION_SEED = 0
MASSIVE_CHANNELS = 4  # stream channels kept out of R and of the int8 products (rotated prefixes; 0 = none)
TWO_TERMS: tuple[str, ...] = ("mlp.down_proj",)  # layers whose activations take two int8 terms (every prefix block)
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


def rotation(n: int, seed: int = ROTATION_SEED, keep: Sequence[int] = ()) -> torch.Tensor:
    """A fixed random orthogonal [n, n] float64 matrix (QR of a seeded Gaussian, signs fixed): public,
    the same on every node. Channels in `keep` are not rotated: x R = [x_others Q | x_keep]."""
    m = n - len(keep)
    q, r = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    out = torch.zeros(n, n, dtype=torch.float64)
    out[[c for c in range(n) if c not in set(keep)], :m] = q
    out[list(keep), torch.arange(m, n)] = 1.0
    return out


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
              rot: torch.Tensor | None = None, kept: int = 0, two_terms: Sequence[str] = ()) -> nn.Module:
    """`block` with each Linear replaced by an Int8Linear; every other tensor is the original's (shared).
    `input_max`: per-input-channel maxima of each original Linear's input (calibrate), for smoothing.
    `rot` (rotatable blocks only): the copy reads and writes the residual stream rotated by `rot` (its
    norms lose their gains, folded into the readers' weights); the caller rotates the stream in and out.
    `kept`: the stream's last columns (unrotated), in float32 in the readers; `two_terms`: layer names."""
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
            terms = 2 if full(names[0]) in two_terms else 1
            if full(names[0]) in rotated:  # readers of the rotated stream: R has spread the outliers, no smoothing
                reads = full(names[0]) not in WRITES_STREAM
                return FusedLinears(layers, None if reads else stats, [rotated[full(n)] for n in names], alpha,
                                    upstream.get(full(names[0])), kept if reads else 0, terms)
            return FusedLinears(layers, stats, alpha=alpha, terms=terms)

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
    public inputs, the same on every node, never a node's data; for each RMSNorm, the mean |x / rms(x)|."""
    device = next(iter(decoder.parameters())).device
    vocab = decoder.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, CALIBRATION_TOKENS, generator=torch.Generator().manual_seed(0)).to(device)
    maxima: dict[nn.Module, torch.Tensor] = {}

    def record(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        if type(module).__name__ in RMS_NORMS:  # one call per norm: each channel's energy
            maxima[module] = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-30)).abs().mean(dim=0)
            return
        seen = x.abs().amax(dim=0)
        maxima[module] = torch.maximum(maxima[module], seen) if module in maxima else seen

    def stop(module, args, kwargs):
        raise _Calibrated

    handles = [m.register_forward_pre_hook(record) for b in list(blocks)[:start] for m in b.modules()
               if linear_weight(m) is not None or type(m).__name__ in RMS_NORMS]
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


def int8_blocks(decoder: nn.Module, blocks: nn.ModuleList, start: int, fingerprint: str) -> list[nn.Module]:
    """int8 copies of blocks[:start], made once per process and per prefix weights (`fingerprint`)."""
    key = (start, fingerprint, SMOOTH_ALPHA, *sorted(SMOOTH_ALPHA_BY_LAYER.items()), ROTATE, MASSIVE_CHANNELS, TWO_TERMS)
    hit = _COPIES.get(blocks)
    if hit is not None and hit[0] == key:
        return hit[1]
    keep_freed_memory()
    prefix = list(blocks)[:start]
    rotate = ROTATE and all(rotatable(b) for b in prefix)
    kept = MASSIVE_CHANNELS if rotate else 0
    maxima = calibrate(decoder, blocks, start) if SMOOTH_ALPHA is not None or kept else None
    rot = None
    if rotate:  # R leaves out the `kept` channels with the most energy, summed over the prefix's norms
        norms = [m for b in prefix for m in (b.input_layernorm, b.post_attention_layernorm)]
        keep = sorted(sum(maxima[m] for m in norms).argsort(descending=True)[:kept].tolist()) if kept else []
        q_proj = prefix[0].self_attn.q_proj
        rot = rotation(q_proj.in_features, keep=keep).to(q_proj.weight.device)
    copies = [int8_copy(b, maxima if SMOOTH_ALPHA is not None else None, rot, kept, TWO_TERMS) for b in prefix]
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
