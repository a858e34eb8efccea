#!/usr/bin/env bash
# GPU smoke test: three short fl-dplora simulate runs (bf16, 4bit, shared-gpu), one line each and
# gpu-smoke/summary.json. See docs/models.md#gpu-smoke-test. Options: --output DIR, --only LIST,
# --timeout S, --dry-run (prints the commands; no GPU needed). Relative paths: from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/python scripts/gpu_smoke.py "$@"
