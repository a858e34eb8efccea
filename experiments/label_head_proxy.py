"""The grid behind the label head's settings (issues 16 and 26; docs/label-head.md has its numbers).

Stage 1 (`--features`, a few minutes with the disk prefix cache): SmolLM2's hidden states at the first
answer position (blocks 26-29 and the final norm) for the 5 seed-42 client shards of the TFNS recipe
with max-train-samples = 2000 (400 tweets per client), the whole public dev part of fin-sentiment
(`load_task("fin-sentiment").eval`, 788 tweets of sent_valid.csv; the 1,600-tweet test part is never
read) and 400 Dolly instructions in the TFNS prompt (public text). Written to $LABEL_HEAD_FEATURES
(default label_head_features.pt in the cwd, gitignored; never commit it).
Stage 2 (`--grid "python"`, or `--table OUT.json` for the docs' table): a federated DP linear probe on
those features simulated in plain torch (5 clients, R rounds x K local DP-SGD steps, per-example
clip 1, PRV-calibrated sigma, FedAvg of the client deltas), as the app's head-only rounds.

Scoring (`score`):
- "dev" (default): train on all 5 clients, score on the 788 dev tweets. The choice is made on public
  data, outside every client's shard.
- "client4" (= `proxy=True`): train on clients 0-3, score on client 4's training shard. Kept only to
  reproduce the earlier table: a choice made on a client's private data, which no epsilon covers
  (issue 26). Do not choose settings with it.

Feature statistics (`stats`; labels never read): "dev" = the app's own (data.head_stat_examples of the
recipe: the first 256 dev prompts outside the 300 the server scores each round), "dev-all" = all 788
dev prompts, "dolly" = the Dolly instructions, "v1-eval" = the 300 tweets the earlier protocol
(fin-sentiment-v1) scored, "train" = the clients' own prompts (not public: comparison only).

    python experiments/label_head_proxy.py --features
    python experiments/label_head_proxy.py --table experiments/results/label-head-proxy/grid.json
    python experiments/label_head_proxy.py --grid 'print(run(eps=8, lr=0.2, opt="adam", local=16))'
"""
import functools
import json
import math
import os
import sys
import time

import torch

FEATURES = os.environ.get("LABEL_HEAD_FEATURES", "label_head_features.pt")
TRAIN_SAMPLES = 2000  # 400 tweets per client over 5 clients, as the original grid


def feature_config():
    from fl_dplora.config import resolve, tfns_recipe_defaults
    return resolve({**tfns_recipe_defaults(), "task": "fin-sentiment", "prefix-cache": "disk", "secure-rng": False,
                    "max-train-samples": TRAIN_SAMPLES, "seed": 42})


def build_features():
    from fl_dplora.data import Example, client_examples, collate, encode_all, eval_examples, head_stat_examples, load_task
    from fl_dplora.forward import top_blocks_only, label_first_tokens
    from fl_dplora.frozen_prefix import attach_prefix, decoder_and_head, decoder_blocks, prefix_start
    from fl_dplora.model_loading import load_tokenizer
    from fl_dplora.models import get_peft_model
    cfg = feature_config()
    model = get_peft_model(cfg); tok = load_tokenizer(cfg.model.name); model.eval()
    dec, name, blocks = decoder_blocks(model)
    inner, decoder, head = decoder_and_head(model)
    LAYERS = [26, 27, 28, 29]
    assert prefix_start(model) == 26, prefix_start(model)
    seq, sysp = cfg.data.max_seq_len, cfg.data.system_prompt
    def feats(enc):
        out = {l: [] for l in LAYERS + ["in26", "final"]}
        grabbed = {}
        hs = [blocks[l].register_forward_hook(lambda m, a, o, l=l: grabbed.__setitem__(l, o[0] if isinstance(o, tuple) else o)) for l in LAYERS]
        try:
            for s in range(0, len(enc), 32):
                part = enc[s:s+32]
                b = collate(part, tok.pad_token_id)
                pos = (b["labels"][:, 1:] != -100).int().argmax(1)  # first answer position (predicting)
                with torch.no_grad():
                    with top_blocks_only(dec, name, blocks, 26, b["prefix_hidden"]):
                        h = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                r = torch.arange(len(part))
                out["final"].append(h[r, pos]); out["in26"].append(b["prefix_hidden"][r, pos])
                for l in LAYERS: out[l].append(grabbed[l][r, pos])
        finally:
            for x in hs: x.remove()
        return {k: torch.cat(v) for k, v in out.items()}
    res = {}
    t = time.time()
    for pid in range(5):
        ex = client_examples(cfg, pid, 5)
        enc = attach_prefix(model, encode_all(tok, ex, seq, sysp), "disk")
        res[f"c{pid}"] = (feats(enc), torch.tensor([e.label for e in ex]))
        print(pid, len(ex), time.time() - t, flush=True)
    task = load_task("fin-sentiment", 42)
    dev = task.eval  # the public dev part (788 tweets); task.test is never read here
    enc = attach_prefix(model, encode_all(tok, dev, seq, sysp), "disk")
    res["dev"] = (feats(enc), torch.tensor([e.label for e in dev])); print("dev", len(dev), time.time() - t, flush=True)
    where = {}
    for i, e in enumerate(dev):
        where.setdefault(e.prompt, i)
    res["dev_stat_idx"] = torch.tensor([where[e.prompt] for e in head_stat_examples(cfg)])  # the app's statistic prompts
    res["dev_scored_idx"] = torch.tensor([where[e.prompt] for e in eval_examples(cfg)])  # the app's per-round scored subset
    res["v1_scored_idx"] = torch.tensor([where[e.prompt] for e in eval_examples(cfg.with_values({"task": "fin-sentiment-v1"}))])
    assert not set(res["dev_stat_idx"].tolist()) & set(res["dev_scored_idx"].tolist())
    dolly = load_task("general-instruct").train[:400]
    pub = [Example(prompt=f"{task.instruction}\n\n{d.prompt[:280]}", answer="neutral", label=2) for d in dolly]
    enc = attach_prefix(model, encode_all(tok, pub, seq, sysp), "disk")
    res["dolly"] = (feats(enc), torch.zeros(len(pub))); print("dolly", time.time() - t, flush=True)
    # label-word head rows
    ids = label_first_tokens(tok, task.label_words)
    res["head"] = head.weight[ids].detach().clone()
    torch.save(res, FEATURES)


R = {}


def prep(layer, stats, pca, rownorm=True):
    tr = [R[f"c{i}"][0][layer].float() for i in range(5)]
    ytr = [R[f"c{i}"][1] for i in range(5)]
    dv, ydv = R["dev"][0][layer].float(), R["dev"][1]
    src = {"dolly": lambda: R["dolly"][0][layer].float(), "dev": lambda: dv[R["dev_stat_idx"]], "dev-all": lambda: dv,
           "v1-eval": lambda: dv[R["v1_scored_idx"]], "train": lambda: torch.cat(tr)}[stats]()
    mu, sd = src.mean(0), src.std(0) + 1e-3
    f = lambda x: (x - mu) / sd
    P = None
    if pca:
        _, _, V = torch.pca_lowrank(f(src), q=pca, center=False); P = V[:, :pca]
    g = lambda x: (f(x) @ P if P is not None else f(x))
    def norm(x):
        x = g(x)
        if rownorm: x = x / x.norm(dim=1, keepdim=True)
        return torch.cat([x, torch.ones(len(x), 1)], 1) / (math.sqrt(2) if rownorm else 1)
    return [norm(x) for x in tr], ytr, norm(dv), ydv


@functools.lru_cache(maxsize=None)
def sigma_for(eps, q, T):
    from fl_dplora.privacy.accounting import calibrate_noise_multiplier
    return calibrate_noise_multiplier(eps, 1e-5, q, T, "prv") if eps < 1e9 else 0.0


def run(layer="final", stats="dev", pca=0, eps=8.0, rounds=4, local=16, batch=400, lr=1.0, C=1.0, seed=0, opt="sgd",
        rownorm=True, base=False, proxy=False, score="dev"):
    """(accuracy, macro-F1, sigma) of one simulated federated DP probe. score="dev": 5 clients, scored on
    the dev part; score="client4" or proxy=True: clients 0-3, scored on client 4's shard (not covered by
    any epsilon: only to reproduce the earlier table). q = min(1, batch / n)."""
    if proxy:
        score = "client4"
    assert score in ("dev", "client4"), score
    tr, ytr, ev, yev = prep(layer, stats, pca, rownorm)
    Hd = R["head"].float()
    btr = [R[f"c{i}"][0]["final"].float() @ Hd.T for i in range(5)] if base else [0]*5
    bev = R["dev"][0]["final"].float() @ Hd.T if base else 0
    if score == "client4":
        ev, yev = tr[4], ytr[4]; tr, ytr = tr[:4], ytr[:4]
        bev = btr[4] if base else 0
    d = ev.shape[1]; k = 3
    NC = len(tr)
    W = torch.zeros(k, d)
    gen = torch.Generator().manual_seed(seed)
    n = len(tr[0]); assert all(len(x) == n for x in tr)
    q = min(1.0, batch / n); T = rounds * local
    sigma = sigma_for(float(eps), q, T)
    for r in range(rounds):
        deltas = []
        for c in range(NC):
            Wc = W.clone(); m = torch.zeros_like(W); v = torch.zeros_like(W)
            for s in range(local):
                mask = torch.rand(n, generator=gen) < q
                x, y = tr[c][mask], ytr[c][mask]
                p = torch.softmax(x @ Wc.T + (btr[c][mask] if base else 0), 1); p[torch.arange(len(y)), y] -= 1
                gn = p.norm(dim=1) * x.norm(dim=1)
                f = (C / (gn + 1e-9)).clamp(max=1)
                G = (p * f[:, None]).T @ x + sigma * C * torch.randn(k, d, generator=gen)
                G = G / (q * n)
                if opt == "adam":
                    m = 0.9 * m + 0.1 * G; v = 0.999 * v + 0.001 * G * G
                    t = r * local + s + 1
                    Wc -= lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
                else:
                    Wc -= lr * G
            deltas.append(Wc - W)
        W = W + torch.stack(deltas).mean(0)
    pred = (ev @ W.T + bev).argmax(1)
    acc = (pred == yev).float().mean().item()
    f1 = sum(((pred == c) & (yev == c)).sum().item() * 2 / max(1, ((pred == c).sum() + (yev == c).sum()).item()) for c in range(3)) / 3
    return acc, f1, sigma


# The docs table's settings (AdamW, 4 rounds): name -> (head-learning-rate, head-local-steps, q)
SETTINGS = {"lr 0.1, 16 steps, q=1": (0.1, 16, 1.0), "lr 0.2, 16 steps, q=1": (0.2, 16, 1.0),
            "lr 0.05, 32 steps": (0.05, 32, 1.0), "lr 0.2, 8 steps": (0.2, 8, 1.0),
            "lr 0.2, 16 steps, q=0.5": (0.2, 16, 0.5)}
EPSILONS = (math.inf, 8.0, 4.0, 2.0)
SEEDS = (0, 1, 2)


def table(score="dev", stats="dev"):
    """Every setting x epsilon x seed: per-seed and mean accuracy / macro-F1 (the docs' table)."""
    n_scored = len(R["dev"][1]) if score == "dev" else len(R["c4"][1])
    cells = []
    for eps in EPSILONS:
        for name, (lr, local, q) in SETTINGS.items():
            out = [run(eps=eps, lr=lr, local=local, batch=q * len(R["c0"][1]), opt="adam", rounds=4, seed=s,
                       stats=stats, score=score) for s in SEEDS]
            acc = [a for a, _, _ in out]; f1 = [b for _, b, _ in out]
            cells.append({"epsilon": "inf" if math.isinf(eps) else eps, "setting": name, "head-learning-rate": lr,
                          "head-local-steps": local, "q": q, "sigma": out[0][2], "seeds": list(SEEDS),
                          "accuracy": acc, "macro_f1": f1, "accuracy_mean": sum(acc) / len(acc),
                          "macro_f1_mean": sum(f1) / len(f1)})
            print(f"eps {eps:>4} {name:<24} acc {100 * cells[-1]['accuracy_mean']:.1f} % F1 {cells[-1]['macro_f1_mean']:.3f}"
                  f"  sigma {out[0][2]:.3f}", flush=True)
    return {"score": score, "stats": stats, "scored_examples": n_scored, "optimizer": "adamw", "rounds": 4,
            "clients": 5 if score == "dev" else 4, "examples_per_client": len(R["c0"][1]), "delta": 1e-5,
            "accountant": "prv", "clip": 1.0, "cells": cells}


def markdown(t):
    names = list(SETTINGS)
    rows = ["| ε | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for eps in EPSILONS:
        e = "inf" if math.isinf(eps) else eps
        by = {c["setting"]: c for c in t["cells"] if c["epsilon"] == e}
        rows.append(f"| {'∞' if math.isinf(eps) else f'{eps:g}'} | " + " | ".join(
            f"{100 * by[n]['accuracy_mean']:.1f} % / {by[n]['macro_f1_mean']:.3f}" for n in names) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["--features"]:
        build_features()
    elif sys.argv[1:2] in (["--grid"], ["--table"]):
        R.update(torch.load(FEATURES))
        if sys.argv[1] == "--grid":
            exec(sys.argv[2])
        else:
            t0 = time.time()
            out = {"dev": table("dev", "dev"), "dev_stats_all_788_dev_prompts": table("dev", "dev-all"),
                   "client4_not_covered_by_epsilon": table("client4", "dev")}
            out["features"] = {"config": "tfns_recipe_defaults() + task fin-sentiment, max-train-samples 2000, seed 42",
                               "dev_examples": len(R["dev"][1]), "dev_stat_prompts": len(R["dev_stat_idx"]),
                               "dev_majority_rate": (R["dev"][1] == R["dev"][1].mode().values).float().mean().item(),
                               "dev_label_counts": torch.bincount(R["dev"][1], minlength=3).tolist()}
            if len(sys.argv) > 2:
                os.makedirs(os.path.dirname(sys.argv[2]) or ".", exist_ok=True)
                with open(sys.argv[2], "w") as fh:
                    json.dump(out, fh, indent=1)
            for k in ("dev", "dev_stats_all_788_dev_prompts", "client4_not_covered_by_epsilon"):
                print(k); print(markdown(out[k])); print()
            print(f"{time.time() - t0:.0f} s")
    else:
        print(__doc__)
