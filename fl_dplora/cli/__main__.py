"""`python -m fl_dplora.cli`: the `fl-dplora` command (the experiments and benchmarks start runs this way)."""

import sys

from fl_dplora.cli import main

sys.exit(main())
