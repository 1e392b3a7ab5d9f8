"""Evaluation: does a mixture serve every objective? (``mpo eval``; docs/evaluation.md).

Rows (mixtures, soups, the reference, stored profiles) are decoded through the engine
with shared seeds, every reply is scored by one reward per objective
(``mpo_core.rewards``), and the report gives per-objective means with bootstrap
intervals, win rates against a baseline row, the worst objective, reply lengths and
``KL(row || reference)``; optionally the Pareto fronts of two objectives for the
log-linear mixture and the soup.
"""

from .decode import sample_seed
from .inputs import load_prompts
from .render import markdown, plot_pareto, plot_rewards, write_report
from .rows import ROW_GRAMMAR, Row, RowParser, split_specs, sweep_rows
from .run import EvalOptions, EvalReport, RowResult, run_evaluation
from .stats import Estimate, bootstrap_mean, win_rate, win_scores, worst_gap

__all__ = [
    "ROW_GRAMMAR",
    "Estimate",
    "EvalOptions",
    "EvalReport",
    "Row",
    "RowParser",
    "RowResult",
    "bootstrap_mean",
    "load_prompts",
    "markdown",
    "plot_pareto",
    "plot_rewards",
    "run_evaluation",
    "sample_seed",
    "split_specs",
    "sweep_rows",
    "win_rate",
    "win_scores",
    "worst_gap",
    "write_report",
]
