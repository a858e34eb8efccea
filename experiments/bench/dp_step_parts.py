"""Where the DP-SGD step's extra time goes, piece by piece (CPU seconds, median of repeats).

    .venv/bin/python experiments/bench/dp_step_parts.py [THREADS]

SmolLM2-135M, LoRA r=8 on q_proj,v_proj, the 8 x 64-token batch of `fl-dplora bench dp-overhead`:
forward+backward with and without the per-example hooks, LoRAGradSampler.per_example(),
.clipped_sum() (per-example gradients + norms + clipped sum), and the Gaussian noise for all
LoRA tensors (OS CSPRNG as the client uses by default, and a seeded generator).
"""

import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")
import torch  # noqa: E402

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)

from fl_dplora.tools.bench.local_step import fixed_batch  # noqa: E402
from fl_dplora.config import resolve  # noqa: E402
from fl_dplora.data import collate  # noqa: E402
from fl_dplora.models import adapter_parameters, get_peft_model  # noqa: E402
from fl_dplora.privacy.mechanisms import gaussian_like  # noqa: E402
from fl_dplora.privacy.per_sample import LoRAGradSampler  # noqa: E402
from fl_dplora.train import per_example_loss  # noqa: E402

cfg = resolve({"model": "smollm2-135m", "batch-size": 8, "micro-batch-size": 8, "max-seq-len": 64,
               "local-steps": 1, "dp-mode": "none"})
model = get_peft_model(cfg)
data, tok = fixed_batch(cfg, 8)
params = [p for p in adapter_parameters(model, cfg).values() if p.requires_grad]
with torch.no_grad():
    for p in params:
        p.normal_(0, 0.01)
batch = collate(data, tok.pad_token_id)
model.train()


def cpu_median(f, n=5):
    ts = []
    for _ in range(n):
        c = time.process_time()
        f()
        ts.append(time.process_time() - c)
    return statistics.median(ts)


def fwd_bwd():
    per_example_loss(model, batch).sum().backward()
    for p in params:
        p.grad = None


print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
print(f"forward+backward, no hooks      {cpu_median(fwd_bwd):.4f} s")
sampler = LoRAGradSampler(model, params).__enter__()
print(f"forward+backward, with hooks    {cpu_median(fwd_bwd):.4f} s")
fwd_bwd()
saved = (dict(sampler._inputs), dict(sampler._grads))
print(f"per_example()                   {cpu_median(sampler.per_example, 10):.4f} s")


def clipped():
    sampler._inputs.update(saved[0])
    sampler._grads.update(saved[1])
    sampler.clipped_sum(1.0)


print(f"clipped_sum() incl. per_example {cpu_median(clipped, 10):.4f} s")
print(f"noise, OS CSPRNG                {cpu_median(lambda: [gaussian_like(p, 1.0, None) for p in params], 10):.4f} s")
gen = torch.Generator().manual_seed(0)
print(f"noise, seeded generator         {cpu_median(lambda: [gaussian_like(p, 1.0, gen) for p in params], 10):.4f} s")
sampler.__exit__(None, None, None)
model.eval()
