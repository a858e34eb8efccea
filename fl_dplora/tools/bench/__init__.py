"""`fl-dplora bench NAME`: performance measurements, variants side by side in one process.

    fl-dplora bench dp-overhead    [--quick] [--json FILE]   DP-SGD step vs plain step (vs Opacus)
    fl-dplora bench round-overhead [--quick] [--json FILE]   round wall time / client compute time
    fl-dplora bench comm           [--quick] [--json FILE]   bytes per client per round on the wire
    fl-dplora bench throughput     [--quick] [--json FILE]   examples/s of a local step, client peak RSS
    fl-dplora bench prefix-cache   [--quick] [--json FILE]   DP step with/without the frozen-prefix cache
                                                             (prefix_cache.py), its build rate, client RSS
    fl-dplora bench secagg         [--quick] [--json FILE]   one round's upload/download bytes and time,
                                                             plain vs SecAgg+, LoRA and FFA (secagg.py)

Timing method (dp-overhead, throughput): every variant runs `--warmup` times, then `--reps`
repetitions interleaved round-robin (the starting variant rotates each repetition), so a load spike
on a shared machine hits all variants alike. We report the median wall time (and the median process
CPU time, which a busy neighbour disturbs less) and the ratios of the medians.

The JSON (`--json FILE`) always has `median_seconds` {variant: seconds}; ratio benchmarks also have
`ratio` {"a/b": value}. `--quick` swaps in the tiny random model and small sizes: a smoke run.
"""

# One module per benchmark (its NAME, `add_parser`, `main`), listed in cli.py's BENCHMARKS; common.py
# holds the timing and the shared flags, local_step.py the local step the step benchmarks time, and
# client_rss.py the client process whose memory throughput and prefix-cache measure.

