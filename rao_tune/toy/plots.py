"""The study's figures, with matplotlib (non-interactive backend): every axis labelled, legends, 95% bands."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def results_plot(path: Path, main_rows: Sequence[Mapping[str, Any]], ablation_rows: Sequence[Mapping[str, Any]]) -> None:
    """Test true reward of each method (chosen on validation) with 95% intervals, next to its ablations."""
    methods = [row["method"] for row in main_rows]
    conditions = ["main"] + sorted({row["condition"] for row in ablation_rows})
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(methods) + 2.2))
    offsets = {c: (i - (len(conditions) - 1) / 2) * 0.22 for i, c in enumerate(conditions)}
    for condition in conditions:
        ys, xs, errors = [], [], []
        for index, row in enumerate(main_rows):
            if condition == "main":
                mean, half = row["test"]
            else:
                match = [r for r in ablation_rows if r["method"] == row["method"] and r["condition"] == condition]
                if not match:
                    continue
                mean, half = match[0]["changed"]
            ys.append(index + offsets[condition])
            xs.append(mean)
            errors.append(_finite(half))
        label = "chosen setting (main condition)" if condition == "main" else condition
        ax.errorbar(xs, ys, xerr=errors, fmt="o", capsize=3, label=label)
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("test true reward (mean over seeds, 95% interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(conditions), fontsize=8)
    ax.set_title("Greedy answers to test prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _band(ax, x: Sequence[float], rows: Sequence[tuple[float, float]], label: str) -> None:
    means = [mean for mean, _ in rows]
    halves = [_finite(half) for _, half in rows]
    line, = ax.plot(x, means, marker="o", label=label)
    ax.fill_between(x, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                    color=line.get_color(), alpha=0.2)


def sweep_plot(path: Path, sweep_rows: Sequence[Mapping[str, Any]], beta_key: str = "loss.beta",
               z0_key: str = "loss.z0") -> None:
    """The paper's Fig. 2 analogues from an RAO sweep over beta x z0: final mean implicit reward, the chosen
    (best) response's implicit reward beta * log-ratio, and the best - worst log-ratio gap, against z0."""
    rows = [row for row in sweep_rows if beta_key in row and z0_key in row]
    if not rows:
        return
    betas = sorted({row[beta_key] for row in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for beta in betas:
        points = sorted((row for row in rows if row[beta_key] == beta), key=lambda row: row[z0_key])
        z0s = [row[z0_key] for row in points]
        _band(axes[0], z0s, [row["implicit_reward"] for row in points], f"beta {beta}")
        axes[0].plot(z0s, [beta * z0 for z0 in z0s], linestyle=":", color="grey")
        chosen = [(beta * row["logratio_best"][0], beta * _finite(row["logratio_best"][1])) for row in points]
        _band(axes[1], z0s, chosen, f"beta {beta}")
        _band(axes[2], z0s, [row["logratio_gap"] for row in points], f"beta {beta}")
    _finish(fig, axes, path, "z0 (log Z_0)", [
        ("mean implicit reward (end of training)", "level vs z0 (dotted: beta * z0)"),
        ("beta * log-ratio of best response", "chosen reward vs z0"),
        ("log-ratio gap, best - worst", "gap vs z0"),
    ])


def curves_plot(path: Path, curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]], window: int = 8) -> None:
    """Per method (one line per seed averaged, band: spread over seeds), over training steps: the implicit reward
    of the best and worst responses, and the normaliser (prompt log-ratio after t0)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for method, per_seed in curves.items():
        for key, style, ax in (("implicit_reward_best", "-", axes[0]), ("implicit_reward_worst", "--", axes[0]),
                               ("prompt_logratio", "-", axes[1])):
            series = [_smooth([v for v in seed_curves[key] if v is not None], window) for seed_curves in per_seed
                      if seed_curves.get(key) and None not in seed_curves[key]]
            if not series:
                continue
            length = min(len(s) for s in series)
            steps = list(range(1, length + 1))
            means = [statistics.fmean(s[i] for s in series) for i in range(length)]
            low = [min(s[i] for s in series) for i in range(length)]
            high = [max(s[i] for s in series) for i in range(length)]
            suffix = {"implicit_reward_best": " best", "implicit_reward_worst": " worst", "prompt_logratio": ""}[key]
            line, = ax.plot(steps, means, linestyle=style, label=f"{method}{suffix}")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    _finish(fig, axes, path, "training step", [
        ("implicit reward", "best / worst response (moving average; band: seeds' range)"),
        ("log pi/pi_ref (x - t0 | t0)", "normaliser: prompt log-ratio after t0"),
    ])


def _finish(fig, axes, path: Path, x_label: str, labels: Sequence[tuple[str, str]]) -> None:
    """Label every panel (y label, title; shared x label), grid, legend, and write the PNG."""
    for ax, (y_label, title) in zip(axes, labels):
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
