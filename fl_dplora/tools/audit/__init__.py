"""Empirical privacy audit: `fl-dplora audit`.

Trains one federated run through the same apps with canaries planted, then gives a lower bound on ε
with the one-run audit of Steinke, Nasr and Jagielski 2023 ("Privacy Auditing with One (1) Training
Run"). A lower bound above the claimed epsilon means the claim is false: the audit flags it.

- canaries.py: the canaries (gradient: Dirac gradients on the LoRA factors; text: passphrases or
  mislabelled texts), where the protected unit puts them, the canary file the clients read;
- bound.py: the statistics: the one-run ε lower bound, membership inference, exposure;
- run.py: `run_audit`: plant, train, score, write audit.json / audit.md / audit.png;
- report.py: audit.md and audit.png.
"""

from fl_dplora.tools.audit.bound import auc, epsilon_lower_bound, exposure, one_run_audit, p_value_dp, tpr_at_fpr
from fl_dplora.tools.audit.canaries import (CANARY_NORM, QUESTION, GradientPlan, Plan, candidate_space_bits,
                                            gradient_scores, make_gradient_plan, make_label_flip_plan, make_plan,
                                            random_secret)
from fl_dplora.tools.audit.run import CANARY_KINDS, TrainFn, run_audit, sequence_nll

__all__ = ["CANARY_KINDS", "CANARY_NORM", "QUESTION", "GradientPlan", "Plan", "TrainFn", "auc", "candidate_space_bits",
           "epsilon_lower_bound", "exposure", "gradient_scores", "make_gradient_plan", "make_label_flip_plan",
           "make_plan", "one_run_audit", "p_value_dp", "random_secret", "run_audit", "sequence_nll", "tpr_at_fpr"]
