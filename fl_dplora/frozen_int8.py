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

from fl_dplora.int8_matmul import (  # noqa: F401 - the int8 layers, re-exported for callers of this module
    FusedLinears, Int8Linear, int8_matmul, keep_freed_memory, linear_weight, matmul_path, quantize_rows, smoothing,
)

SMOOTH_ALPHA: float | None = 0.5  # SmoothQuant's migration strength (see smoothing); None = off
SMOOTH_ALPHA_BY_LAYER: dict[str, float] = {"down_proj": 0.3}  # layer name (e.g. "down_proj") -> its own alpha
ROTATE: bool = True  # rotate the residual stream of LLaMA-style prefixes (see rotation); False = smoothing only
ROTATION_SEED = 0
MASSIVE_CHANNELS = 4  # stream channels kept out of R and of the int8 products (rotated prefixes; 0 = none)
TWO_TERMS: tuple[str, ...] = ("mlp.down_proj",)  # layers whose activations take two int8 terms (every prefix block)
CALIBRATION_TOKENS = (8, 64)  # fixed random token ids (seed 0) the activation maxima come from: public

# Layers of one module that read the same input, by name (LLaMA-style blocks); others run alone.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))



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
            alpha = SMOOTH_ALPHA_BY_LAYER.get(names[0], SMOOTH_ALPHA)
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
def calibrate(decoder: nn.Module, blocks: nn.ModuleList, start: int, first: int = 0) -> dict[nn.Module, torch.Tensor]:
    """Per-input-channel max |x| of every Linear in blocks[first:start] on fixed random token ids (seed 0):
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

    handles = [m.register_forward_pre_hook(record) for b in list(blocks)[first:start] for m in b.modules()
               if linear_weight(m) is not None or type(m).__name__ in RMS_NORMS]
    if start < len(blocks):  # the top blocks (start = len) run to the decoder's end
        handles.append(blocks[start].register_forward_pre_hook(stop, with_kwargs=True, prepend=True))
    try:
        decoder(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _Calibrated:
        pass
    finally:
        for h in handles:
            h.remove()
    return maxima


def without_lora(block: nn.Module) -> nn.Module:
    """`block` with each PEFT LoRA wrapper replaced by its base layer (the original module object, so
    calibrate's maxima still find it): what the block computes while every lora_B is 0. A block without
    LoRA comes back as it is."""
    wrapped = [(name, m) for name, m in block.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    if not wrapped:
        return block
    keep = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    keep.update({id(m.base_layer): m.base_layer for _, m in wrapped})
    twin = copy.deepcopy(block, keep)
    for name, m in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, m.base_layer)
    return twin


def release(blocks: Sequence[nn.Module]) -> None:
    """Drop the inputs and outputs the quantized copies keep between calls."""
    for block in blocks:
        for m in block.modules():
            if isinstance(m, Int8Linear):
                m.fused.clear()


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder's blocks -> {(first, start): (key, copies)}


def int8_blocks(decoder: nn.Module, blocks: nn.ModuleList, start: int, fingerprint: str,
                first: int = 0) -> list[nn.Module]:
    """int8 copies of blocks[first:start], made once per process and per weights (`fingerprint`).
    first = 0: the frozen prefix. first > 0: the blocks that hold LoRA, as their base layers
    (without_lora: only while every lora_B is 0), with their own calibration and rotation."""
    key = (first, start, fingerprint, SMOOTH_ALPHA, *sorted(SMOOTH_ALPHA_BY_LAYER.items()), ROTATE, MASSIVE_CHANNELS,
           TWO_TERMS)
    made = _COPIES.setdefault(blocks, {})
    hit = made.get((first, start))
    if hit is not None and hit[0] == key:
        return hit[1]
    keep_freed_memory()
    originals = list(blocks)[first:start]
    span = [without_lora(b) for b in originals]
    rotate = ROTATE and all(rotatable(b) for b in span)
    kept = MASSIVE_CHANNELS if rotate else 0
    maxima = calibrate(decoder, blocks, start, first) if SMOOTH_ALPHA is not None or kept else None
    rot = None
    if rotate:  # R leaves out the `kept` channels with the most energy, summed over the span's norms
        norms = [m for b in originals for m in (b.input_layernorm, b.post_attention_layernorm)]
        keep = sorted(sum(maxima[m] for m in norms).argsort(descending=True)[:kept].tolist()) if kept else []
        q_proj = span[0].self_attn.q_proj
        rot = rotation(q_proj.in_features, keep=keep).to(q_proj.weight.device)
    copies = [int8_copy(b, maxima if SMOOTH_ALPHA is not None else None, rot, kept, TWO_TERMS) for b in span]
    if rot is not None:
        _rotate_stream(copies[0], copies[-1], rot)
    made[(first, start)] = (key, copies)
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
