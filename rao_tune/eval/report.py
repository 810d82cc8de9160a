"""A Markdown table of lm-eval results, one row per checkpoint and one column per task, like the paper's Table 3."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

# The metric reported for a task: the first of these it has (accuracy for multiple choice, exact match for
# generation, the flexible answer extraction of GSM8K chain-of-thought before the strict one).
METRIC_PREFERENCE = (
    "acc,none",
    "exact_match,flexible-extract",
    "exact_match,strict-match",
    "exact_match,none",
    "acc_norm,none",
)


def main_metric(task_results: Mapping[str, object]) -> Optional[tuple[str, float]]:
    for name in METRIC_PREFERENCE:
        value = task_results.get(name)
        if isinstance(value, (int, float)):
            return name, float(value)
    return None


def results_table(results: Mapping[str, Mapping[str, Mapping[str, object]]], tasks: Sequence[str]) -> str:
    """``results``: checkpoint name -> lm-eval's ``results`` dict (task -> metrics). Values in percent, with the
    mean over the tasks a checkpoint has; a task without a known metric shows ``-``."""
    header = ["checkpoint", *tasks, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_task in results.items():
        cells, values = [name], []
        for task in tasks:
            metric = main_metric(by_task.get(task, {}))
            if metric is None or math.isnan(metric[1]):
                cells.append("-")
            else:
                values.append(100 * metric[1])
                cells.append(f"{100 * metric[1]:.1f}")
        cells.append(f"{sum(values) / len(values):.1f}" if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
