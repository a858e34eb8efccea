"""FFA-LoRA (lora-variant = ffa): A is the seed-shared random init everywhere, forever, and never travels.

If A drifted on one party, or were rebuilt differently in another process, mean(B_k)·A would no
longer be the average of the clients' B_k·A; if A were sent, the traffic would not halve.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: harness
from harness import InProcessGrid, run_in_process  # noqa: E402

from fl_dplora.config import RunConfig
from fl_dplora.write_ahead import read_operator
from fl_dplora import models  # noqa: E402
from fl_dplora.models import get_peft_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# q_proj and o_proj are 64x64 in the tiny LLaMA: A (r x 64) and B (64 x r) have the same size,
# so sending only B must halve the upload.
COMMON = dict(max_train_samples=60, batch_size=4, micro_batch_size=4, max_seq_len=48, local_steps=1,
              max_eval_samples=4, eval_every=0, secure_rng=False, num_server_rounds=2, fraction_train=1.0,
              dp_mode="sample", noise_multiplier=1.0, target_epsilon=50.0, accountant="rdp",
              lora_targets="q_proj,o_proj", lora_rank=16)
NUM_CLIENTS = 3


def _lora_A(model) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): p.detach().clone() for k, p in model.named_parameters() if "lora_A" in k}


def _run(variant: str, out: Path):
    grid = InProcessGrid(NUM_CLIENTS, seed=42)
    summary, out_dir = run_in_process(NUM_CLIENTS, grid=grid, output_dir=out, lora_variant=variant, **COMMON)
    # the process-wide model the in-process clients trained (and the server evaluated) with
    a_after = _lora_A(get_peft_model(RunConfig.from_record(summary["config"])))
    return summary, out_dir, grid, a_after


@pytest.fixture(scope="module")
def ffa_run(tmp_path_factory):
    return _run("ffa", tmp_path_factory.mktemp("ffa"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _run("lora", tmp_path_factory.mktemp("lora"))


def _fresh_A(cfg: RunConfig) -> dict[str, torch.Tensor]:
    models.forget_cached_model()
    try:
        return _lora_A(get_peft_model(cfg))
    finally:
        models.forget_cached_model()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_ffa_A_stays_bitwise_at_the_seed_shared_init(ffa_run):
    summary, out_dir, _, a_after = ffa_run
    cfg = RunConfig.from_record(summary["config"])
    assert len(a_after) == 2 * 2  # 2 layers x (q_proj, o_proj)
    init = _fresh_A(cfg)
    assert set(init) == set(a_after)
    for k in init:
        assert torch.equal(a_after[k], init[k]), f"{k} changed during FFA training"
    # what the server saved: A is the init, B was trained (so the run did something)
    saved = load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))
    saved_a = {k: v for k, v in saved.items() if "lora_A" in k}
    assert set(saved_a) == set(init)
    for k in init:
        assert torch.equal(saved_a[k], init[k])
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    # and another process (a SuperNode, a Ray worker) builds the very same A from the seed
    code = (
        "import hashlib, json, sys, torch\n"
        "from fl_dplora.config import RunConfig\n"
        "from fl_dplora.models import get_peft_model\n"
        "cfg = RunConfig.from_record(json.loads(sys.stdin.read()))\n"
        "m = get_peft_model(cfg)\n"
        "a = {k.replace('.default', ''): p.detach() for k, p in m.named_parameters() if 'lora_A' in k}\n"
        "h = hashlib.sha256()\n"
        "for k in sorted(a):\n"
        "    h.update(k.encode()); h.update(a[k].contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(cfg.to_record()), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == _digest(init)


def _array_keys(msg) -> list[str]:
    return [k for rec in msg.content.array_records.values() for k in rec.keys()]


def test_ffa_never_sends_A(ffa_run, lora_run):
    for run, variant in ((ffa_run, "ffa"), (lora_run, "lora")):
        grid = run[2]
        assert grid.exchanges
        for ex in grid.exchanges:
            for msg in (ex.instruction, ex.reply):
                assert msg is not None and not msg.has_error()
                keys = _array_keys(msg)
                assert any("lora_B" in k for k in keys)
                has_a = any("lora_A" in k for k in keys)
                assert has_a == (variant == "lora"), (variant, keys[:4])  # the check can see A when it is there


def _round_bytes(out_dir: Path, key: str) -> list[int]:
    return [r[key] for r in read_operator(out_dir)[0]]


def test_ffa_halves_upload_and_trainable_params(ffa_run, lora_run):
    ffa, lora = ffa_run[0], lora_run[0]
    assert ffa["trainable_params"] * 2 == lora["trainable_params"]
    ffa, lora = {**ffa, **read_operator(ffa_run[1])[1]}, {**lora, **read_operator(lora_run[1])[1]}
    up = ffa["bytes_up_total"] / lora["bytes_up_total"]
    print(f"ffa/lora upload bytes: {up:.4f} ({ffa['bytes_up_total']}/{lora['bytes_up_total']})")
    assert up == pytest.approx(0.5, abs=0.03)
    # Download too, from round 2 on: in round 1 every B is still zero and Flower's content-addressed
    # wire format ships identical arrays once, which skews that round's ratio.
    for f, l in list(zip(_round_bytes(ffa_run[1], "bytes_down"), _round_bytes(lora_run[1], "bytes_down")))[1:]:
        print(f"ffa/lora download bytes: {f / l:.4f} ({f}/{l})")
        assert f / l == pytest.approx(0.5, abs=0.03)
