"""Is the machine busy? One matmul of SmolLM2's MLP shape, 1 vs N torch threads (wall and CPU s).

    .venv/bin/python experiments/bench/thread_contention.py [N]

On an idle machine N threads are faster; when other processes occupy the cores, each parallel
op waits for descheduled sibling threads and N threads can be several times slower than one.
"""

import os
import sys
import time

import torch

a, w = torch.randn(512, 576), torch.randn(1536, 576)
for threads in (1, int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()):
    torch.set_num_threads(threads)
    for _ in range(3):
        a @ w.T
    runs = []
    for _ in range(5):
        c, t = time.process_time(), time.perf_counter()
        for _ in range(100):
            a @ w.T
        runs.append((time.perf_counter() - t, time.process_time() - c))
    runs.sort()
    print(f"{threads} thread(s): 100 matmuls median {runs[2][0]:.3f} s wall, {runs[2][1]:.3f} s CPU "
          f"(load average {os.getloadavg()[0]:.1f})")
