"""dp-mode `paper`: the noise placement of DP-LoRA (arXiv 2312.17493) on top of client-level DP."""

from __future__ import annotations

import math
from fl_dplora.config import RunConfig
from fl_dplora.privacy.mechanisms import clip_to_norm
from fl_dplora.privacy.modes.base import Update
from fl_dplora.privacy.modes.client import ClientDP
from fl_dplora.privacy.modes.placement import LOCAL, NoisePlacement


class PaperDP(ClientDP):
    """DP-LoRA (Liu et al.): each client clips ΔA and ΔB to C separately and adds N(0, σ²C²) to each
    before upload. The pair has sensitivity √2·C (C with FFA, where only ΔB travels)."""

    name = "paper"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.trusted = "nobody for each update (local DP per client); the server for participation"

    def _placement(self, cfg: RunConfig) -> NoisePlacement:
        return LOCAL  # whatever client-noise says: the paper's clients noise their own ΔA and ΔB

    def _sensitivity(self) -> float:
        return 1.0 if self.cfg.lora.variant == "ffa" else math.sqrt(2.0)

    def _clip_norm(self) -> float:
        return self.max_grad_norm * self._sensitivity()

    def reference_note(self) -> str:
        from fl_dplora.privacy.accounting import paper_noise_multiplier

        sigma = paper_noise_multiplier(self.cfg.privacy.target_epsilon, self.cfg.privacy.delta)
        return f"paper's per-step formula (no composition, for reference only): sigma >= {sigma:.3f}"

    def _clip(self, delta: Update) -> Update:
        out: Update = {}
        for part in ("lora_A", "lora_B"):
            keys = [k for k in delta if part in k]
            if keys:
                out.update(zip(keys, clip_to_norm([delta[k] for k in keys], self.max_grad_norm)[0]))
        if len(out) != len(delta):  # a third part would add to the sensitivity the accountant assumed
            raise ValueError(f"dp-mode paper: update holds values outside lora_A/lora_B: {sorted(set(delta) - set(out))[:2]}")
        return out
