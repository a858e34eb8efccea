"""The proxy grid behind the label head's settings (issue 16; docs/label-head.md has its numbers).

Stage 1 (`--features`, ~2 min with the epsilon-sweep's disk prefix cache): SmolLM2's hidden states
at the first answer position (blocks 26-29 and the final norm) for the 5 seed-42 client shards of
make run, the server's 300 scored tweets and 400 Dolly instructions in the TFNS prompt (public text).
Stage 2 (`--grid "python"`): a federated DP linear probe on those features simulated in plain torch
(5 clients, R rounds x K local full-batch DP-SGD steps, per-example clip 1, PRV-calibrated sigma,
FedAvg of the client deltas). `proxy=True` scores on client 4's shard and trains on clients 0-3,
so that settings are chosen without the server's validation tweets.

    python experiments/label_head_proxy.py --features
    python experiments/label_head_proxy.py --grid 'print(run("final", "eval", eps=8, lr=0.2, opt="adam", local=16, proxy=True))'
"""
import math
import sys
import time

import torch

FEATURES = "label_head_features.pt"

def build_features():
    from fl_dplora.config import resolve
    from fl_dplora.data import Example, client_examples, collate, encode_all, eval_examples, load_task
    from fl_dplora.forward import top_blocks_only, label_first_tokens
    from fl_dplora.frozen_prefix import attach_prefix, decoder_and_head, decoder_blocks
    from fl_dplora.model_loading import load_tokenizer
    from fl_dplora.models import get_peft_model
    cfg = resolve({"prefix-cache": "disk", "secure-rng": False})
    model = get_peft_model(cfg); tok = load_tokenizer(cfg["model"]); model.eval()
    dec, name, blocks = decoder_blocks(model)
    inner, decoder, head = decoder_and_head(model)
    LAYERS = [26, 27, 28, 29]
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
        enc = attach_prefix(model, encode_all(tok, ex, 96, ""), "disk")
        res[f"c{pid}"] = (feats(enc), torch.tensor([e.label for e in ex]))
        print(pid, len(ex), time.time() - t, flush=True)
    ev = eval_examples(cfg)
    enc = attach_prefix(model, encode_all(tok, ev, 96, ""), "disk")
    res["eval"] = (feats(enc), torch.tensor([e.label for e in ev])); print("eval", time.time() - t, flush=True)
    dolly = load_task("general-instruct").train[:400]
    pub = [Example(prompt=f"{load_task('fin-sentiment').instruction}\n\n{d.prompt[:280]}", answer="neutral", label=2) for d in dolly]
    enc = attach_prefix(model, encode_all(tok, pub, 96, ""), "disk")
    res["dolly"] = (feats(enc), torch.zeros(len(pub))); print("dolly", time.time() - t, flush=True)
    task = load_task("fin-sentiment")
    # label-word head rows
    ids = label_first_tokens(tok, task.label_words)
    res["head"] = head.weight[ids].detach().clone()
    torch.save(res, FEATURES)


R = {}


def prep(layer, stats, pca, rownorm=True):
    tr = [R[f"c{i}"][0][layer].float() for i in range(5)]
    ytr = [R[f"c{i}"][1] for i in range(5)]
    ev, yev = R["eval"][0][layer].float(), R["eval"][1]
    src = {"dolly": R["dolly"][0][layer].float(), "eval": ev, "train": torch.cat(tr)}[stats]
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
    return [norm(x) for x in tr], ytr, norm(ev), yev
def run(layer="final", stats="dolly", pca=0, eps=8.0, rounds=4, local=16, batch=400, lr=1.0, C=1.0, seed=0, opt="sgd", rownorm=True, base=False, proxy=False):
    tr, ytr, ev, yev = prep(layer, stats, pca, rownorm)
    Hd = R["head"].float()
    btr = [R[f"c{i}"][0]["final"].float() @ Hd.T for i in range(5)] if base else [0]*5
    bev = R["eval"][0]["final"].float() @ Hd.T if base else 0
    if proxy:
        ev, yev = tr[4], ytr[4]; tr, ytr = tr[:4] + [tr[0]], ytr[:4] + [ytr[0]]
    d = ev.shape[1]; k = 3
    NC = 4 if proxy else 5
    W = torch.zeros(k, d)
    gen = torch.Generator().manual_seed(seed)
    n = len(tr[0]); q = min(1.0, batch / n); T = rounds * local
    sigma = calibrate_noise_multiplier(eps, 1e-5, q, T, "prv") if eps < 1e9 else 0.0
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

if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["--features"]:
        build_features()
    elif sys.argv[1:2] == ["--grid"]:
        from fl_dplora.privacy.accounting import calibrate_noise_multiplier

        R = torch.load(FEATURES)
        exec(sys.argv[2])
    else:
        print(__doc__)
