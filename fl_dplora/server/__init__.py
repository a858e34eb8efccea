"""The Flower ServerApp as a package: rounds of (sample → train → validate/aggregate → account → evaluate → log).

- `app.py`: the ServerApp; validates the run config once and hands it to the loop
- `start.py`: everything before round 1 (checks, output dir, model, label head, strategy, resume)
- `loop.py`: the round loop: sample → send → aggregate → record, and the run's end
- `ledgers.py`: the server's privacy bookkeeping: its own ledger, its copy of each node's, the run's ε
- `run_state.py`: what changes from round to round, what a checkpoint holds, resume
- `evaluation.py`: what the server computes on its own public data: label-head statistics, scores
- `outputs.py`: the released files and the operator log's per-round and summary rows

Writes into the output dir (docs/privacy.md, "Threat model"). Released: metrics.jsonl (one line per round: ε and the
evaluation on the server's public set), summary.json, adapter/. The operator's, not for release
(write_ahead.py): operator.jsonl (who took part, drops, bytes, timings) and rounds.wal.
"""
