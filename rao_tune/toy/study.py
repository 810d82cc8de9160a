"""A fair study at toy scale: methods x hyperparameter grids x seeds, selected on validation, reported on test.

Protocol (one design choice changed at a time, as the RPO framework asks):

1. Per seed, the shared stages once (:func:`rao_tune.toy.pipeline.prepare_seed`).
2. **Main condition** (``main``: responses per prompt, annotations): every method x every grid setting x every
   seed is trained and answers the validation and test prompts greedily.
3. **Selection**: per method, the setting with the highest mean *validation* true reward over seeds
   (:func:`select_setting` sees validation figures only). Test figures of the chosen setting are reported as
   mean and 95% t-interval over seeds.
4. **Ablations**, each at the method's chosen setting with one thing changed: responses per prompt, and
   annotations by the true reward instead of the reward model.
5. **Fig. 2 sweeps**: named settings (e.g. RAO over beta x z0, DPO over beta) in the main condition, for the
   paper's claims.

A run's result lands in ``<out>/runs/<condition>/<method>/<setting>/seed<N>/result.json`` as it finishes; a
re-run skips every run whose result exists, so a stopped study continues where it was.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rao_tune.files import write_atomically
from rao_tune.toy.pipeline import SPLITS, align_and_evaluate, prepare_seed

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = _T_975[len(values) - 2] if len(values) - 1 <= len(_T_975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Condition:
    responses_per_prompt: int
    annotations: str  # "reward_model" or "true_reward"

    @property
    def name(self) -> str:
        return f"k{self.responses_per_prompt}_{self.annotations}"


@dataclass(frozen=True)
class Run:
    method: str
    setting: tuple[tuple[str, Any], ...]  # (override key, value) pairs, in the grid's key order
    condition: Condition
    seed: int

    @property
    def setting_name(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.setting) or "defaults"

    def directory(self, out: Path) -> Path:
        # No "=" in a path: torchtune splits command-line overrides at it.
        folder = ",".join(f"{key}_{value}" for key, value in self.setting) or "defaults"
        return Path(out) / "runs" / self.condition.name / self.method / folder / f"seed{self.seed}"


def grid_settings(grid: Optional[Mapping[str, Sequence[Any]]]) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of a ``{override key: [values]}`` grid, in order (one empty setting for no grid)."""
    grid = dict(grid or {})
    return [tuple(zip(grid, values)) for values in product(*grid.values())]


def sweep_point(chosen: tuple, sweep_setting: tuple) -> tuple:
    """The chosen setting with the sweep's keys replacing its own, in the chosen setting's key order (new keys
    after), so a sweep point equal to a grid point is the same run."""
    return tuple({**dict(chosen), **dict(sweep_setting)}.items())


def select_setting(validation: Mapping[str, Sequence[float]]) -> str:
    """The setting with the highest mean validation true reward over seeds; ties go to the first listed. Only
    validation figures come in, so a test figure cannot influence the choice."""
    return max(validation, key=lambda setting: statistics.fmean(validation[setting]))


@dataclass
class Study:
    cfg: DictConfig
    log: Callable[[str], None] = print
    results: dict[Run, dict] = field(default_factory=dict)
    prepared: dict[int, dict] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def main(self) -> Condition:
        return Condition(int(self.cfg.main.responses_per_prompt), str(self.cfg.main.annotations))

    # ------------------------------------------------------------------ plan
    def main_runs(self) -> list[Run]:
        return [Run(method, setting, self.main, seed)
                for method, spec in self.cfg.methods.items()
                for setting in grid_settings(spec.get("grid"))
                for seed in self.cfg.seeds]

    def chosen(self) -> dict[str, tuple]:
        """Per method, the setting chosen on validation in the main condition (needs the main runs' results)."""
        chosen = {}
        for method, spec in self.cfg.methods.items():
            settings = grid_settings(spec.get("grid"))
            validation = {setting: [self.results[Run(method, setting, self.main, seed)]["validation"]["true_reward"]
                                    for seed in self.cfg.seeds] for setting in settings}
            chosen[method] = select_setting(validation)
        return chosen

    def later_runs(self, chosen: Mapping[str, tuple]) -> list[Run]:
        """Ablations at the chosen settings, then the Fig. 2 sweeps (in the main condition, the sweep's keys
        replacing the chosen setting's)."""
        ablations = self.cfg.get("ablations") or {}
        conditions = [Condition(int(k), self.main.annotations) for k in ablations.get("responses_per_prompt", [])]
        conditions += [Condition(self.main.responses_per_prompt, str(a)) for a in ablations.get("annotations", [])]
        # A method runs in the conditions it can (PPO scores its own samples online: no true_reward condition).
        runs = [Run(method, chosen[method], condition, seed)
                for condition in conditions for method, spec in self.cfg.methods.items()
                if condition.annotations in spec.get("annotations", ["reward_model", "true_reward"])
                for seed in self.cfg.seeds]
        for sweep in (self.cfg.get("sweeps") or {}).values():
            for sweep_setting in grid_settings(sweep.grid):
                setting = sweep_point(chosen[sweep.method], sweep_setting)
                runs += [Run(sweep.method, setting, self.main, seed) for seed in self.cfg.seeds]
        return list(dict.fromkeys(runs))  # a sweep point may be a grid point already

    # ------------------------------------------------------------------ run
    def run_all(self, runs: Sequence[Run], description: str) -> None:
        pending = [run for run in runs if run not in self.results and not self._load(run)]
        self.log(f"{description}: {len(runs)} runs, {len(runs) - len(pending)} done before")
        for run in tqdm(pending, desc=description, unit="run"):
            started = time.perf_counter()
            prepared = self.prepare(run.seed)
            spec = self.cfg.methods[run.method]
            result = align_and_evaluate(
                run.directory(self.out), prepared, config=spec.config, overrides=dict(run.setting),
                responses_per_prompt=run.condition.responses_per_prompt, annotations=run.condition.annotations,
                epochs=int(self.cfg.scale.align_epochs), seed=run.seed, recipe=spec.get("recipe", "rao_distributed"),
            )
            result.update(method=run.method, setting=run.setting_name, condition=run.condition.name, seed=run.seed,
                          seconds=time.perf_counter() - started, made_with=self._made_with(run))
            write_atomically(run.directory(self.out) / "result.json", json.dumps(result, indent=1) + "\n")
            self.results[run] = result
            self.log(f"{run.method} {run.setting_name} {run.condition.name} seed {run.seed}: validation "
                     f"{result['validation']['true_reward']:.3f}, {result['seconds']:.0f} s")

    def _made_with(self, run: Run) -> dict:
        """What a run's result depends on beyond its folder name: the scale (hence the seed's SFT model and data)
        and the method's config."""
        return {"scale": OmegaConf.to_container(self.cfg.scale), "config": str(self.cfg.methods[run.method].config),
                "splits": SPLITS}

    def _load(self, run: Run) -> bool:
        """A finished run's result, unless it was made with another scale or config (then it is run again)."""
        path = run.directory(self.out) / "result.json"
        if not path.exists():
            return False
        result = json.loads(path.read_text())
        if result.get("made_with") != self._made_with(run):
            self.log(f"{path}: made with other settings than this study's; running it again")
            return False
        self.results[run] = result
        return True

    def prepare(self, seed: int) -> dict:
        if seed not in self.prepared:
            self.log(f"seed {seed}: SFT, samples, true rewards, reward model, annotations (kept from a previous run "
                     "with the same scale)")
            self.prepared[seed] = prepare_seed(self.out / "seeds" / f"seed{seed}", seed, OmegaConf.to_container(self.cfg.scale))
        return self.prepared[seed]

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        for seed in self.cfg.seeds:
            self.prepare(seed)
        self.run_all(self.main_runs(), "main grid")
        chosen = self.chosen()
        self.run_all(self.later_runs(chosen), "ablations and sweeps")
        report = build_report(self, chosen)
        report["wall_seconds"] = time.perf_counter() - started
        write_report(self, report, chosen)
        return report


# ---------------------------------------------------------------------------------------------------- report
def _setting_text(setting: tuple) -> str:
    return ", ".join(f"{key.split('.')[-1]}={value}" for key, value in setting) or "config defaults"


def _fmt(mean_and_half: tuple[float, float], digits: int = 3) -> str:
    mean, half = mean_and_half
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def build_report(study: Study, chosen: Mapping[str, tuple]) -> dict[str, Any]:
    """The tables (as data) of a finished study: main results, the grid's validation figures, ablations and the
    Fig. 2 sweeps. Test figures are read only here, after the selection."""
    cfg, seeds, results = study.cfg, list(study.cfg.seeds), study.results

    def figures(method: str, setting: tuple, condition: Condition, split: str, key: str) -> list[float]:
        return [results[Run(method, setting, condition, seed)][split][key] for seed in seeds]

    sft = {split: {key: [study.prepared[s]["sft"][split][key] for s in seeds] for key in ("true_reward", "accuracy")}
           for split in ("validation", "test")}
    main_rows = [{"method": "SFT", "kind": "start", "setting": "-",
                  "validation": mean_interval(sft["validation"]["true_reward"]),
                  "test": mean_interval(sft["test"]["true_reward"]), "accuracy": mean_interval(sft["test"]["accuracy"])}]
    grid_rows = []
    for method, spec in cfg.methods.items():
        for setting in grid_settings(spec.get("grid")):
            grid_rows.append({"method": method, "setting": _setting_text(setting), "chosen": setting == chosen[method],
                              "validation": mean_interval(figures(method, setting, study.main, "validation", "true_reward"))})
        test = figures(method, chosen[method], study.main, "test", "true_reward")
        main_rows.append({
            "method": method, "kind": spec.get("reward", ""), "setting": _setting_text(chosen[method]),
            "validation": mean_interval(figures(method, chosen[method], study.main, "validation", "true_reward")),
            "test": mean_interval(test),
            "accuracy": mean_interval(figures(method, chosen[method], study.main, "test", "accuracy")),
            # Paired by seed: each seed's SFT model is this run's start, so seed-to-seed spread cancels.
            "vs_sft": mean_interval([t - s for t, s in zip(test, sft["test"]["true_reward"])]),
        })

    ablation_rows = []
    ablation_conditions = sorted({run.condition for run in results if run.condition != study.main
                                  and run.setting == chosen.get(run.method)}, key=lambda c: c.name)
    for condition in ablation_conditions:
        for method in cfg.methods:
            if Run(method, chosen[method], condition, seeds[0]) not in results:
                continue
            main_test = figures(method, chosen[method], study.main, "test", "true_reward")
            changed = figures(method, chosen[method], condition, "test", "true_reward")
            ablation_rows.append({"condition": condition.name, "method": method,
                                  "kind": cfg.methods[method].get("reward", ""),
                                  "main": mean_interval(main_test), "changed": mean_interval(changed),
                                  "difference": mean_interval([c - m for c, m in zip(changed, main_test)])})

    sweep_rows = []
    for name, sweep in (cfg.get("sweeps") or {}).items():
        for sweep_setting in grid_settings(sweep.grid):
            setting = sweep_point(chosen[sweep.method], sweep_setting)
            runs = [results[Run(sweep.method, setting, study.main, seed)] for seed in seeds]
            row = {"sweep": name, "method": sweep.method, "setting": _setting_text(setting), **dict(setting),
                   "test": mean_interval([r["test"]["true_reward"] for r in runs])}
            for key in ("implicit_reward", "implicit_reward_best", "implicit_reward_worst", "logratio_best",
                        "logratio_worst", "prompt_logratio", "kl_estimate", "target_reward"):
                row[key] = mean_interval([r["training"]["final"][key] for r in runs])
            row["logratio_gap"] = mean_interval([r["training"]["final"]["logratio_best"]
                                                 - r["training"]["final"]["logratio_worst"] for r in runs])
            sweep_rows.append(row)

    prepared = [study.prepared[s] for s in seeds]
    return {
        "seeds": seeds,
        "main_condition": study.main.name,
        "chosen": {method: _setting_text(setting) for method, setting in chosen.items()},
        "main": main_rows,
        "grid": grid_rows,
        "ablations": ablation_rows,
        "sweeps": sweep_rows,
        "reward_model": {
            "heldout_accuracy": mean_interval([p["reward_model"]["heldout_accuracy"] for p in prepared]),
            "pair_agreement": mean_interval([p["reward_model"]["annotation_agreement"]["pair_agreement"] for p in prepared]),
            "reward_model_std": mean_interval([p["reward_model"]["annotation_agreement"]["annotated_std"] for p in prepared]),
            "true_reward_std": mean_interval([p["reward_model"]["annotation_agreement"]["reference_std"] for p in prepared]),
        },
        "run_seconds": statistics.fmean(r["seconds"] for r in results.values()) if results else 0.0,
        "num_runs": len(results),
    }


def load_study_config(path: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """A study config (YAML) with ``key=value`` overrides, as torchtune's CLI takes them."""
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    missing = {"out", "seeds", "scale", "main", "methods"} - set(cfg)
    if missing:
        raise ValueError(f"{path}: study config lacks {sorted(missing)}")
    for method, spec in cfg.methods.items():
        if "config" not in spec:
            raise ValueError(f"{path}: methods.{method} needs a config (a name under configs/)")
        if cfg.main.annotations not in spec.get("annotations", ["reward_model", "true_reward"]):
            raise ValueError(f"{path}: methods.{method} cannot run with main.annotations={cfg.main.annotations} "
                             f"(it takes {list(spec.annotations)})")
    for name, sweep in (cfg.get("sweeps") or {}).items():
        if sweep.get("method") not in cfg.methods:
            raise ValueError(f"{path}: sweeps.{name}.method must be one of the methods {list(cfg.methods)}")
    return cfg


# ---------------------------------------------------------------------------------------------------- claims
def fig2_claims(sweep_rows: Sequence[Mapping[str, Any]], beta_key: str = "loss.beta", z0_key: str = "loss.z0") -> list[str]:
    """The paper's Fig. 2 claims, each with the sweep's numbers and whether they bear it out here."""
    claims = []
    rao = [row for row in sweep_rows if beta_key in row and z0_key in row]
    if rao:
        betas = sorted({row[beta_key] for row in rao})
        by_beta = {beta: sorted((r for r in rao if r[beta_key] == beta), key=lambda r: r[z0_key]) for beta in betas}

        def series(beta: float, value) -> str:
            return ", ".join(f"z0={r[z0_key]}: {value(r)}" for r in by_beta[beta])

        levels_rise = all(all(a["implicit_reward"][0] < b["implicit_reward"][0] for a, b in zip(rows, rows[1:]))
                          for rows in by_beta.values())
        claims.append(
            f"**RAO's mean implicit reward stays near a level set by z0**: {'holds' if levels_rise else 'does not hold'} "
            "here (final mean implicit reward, rising with z0 means the level follows z0; beta * z0 is its start): "
            + "; ".join(f"beta {b}: " + series(b, lambda r, b=b: f"{r['implicit_reward'][0]:.2f} (start {b * r[z0_key]:.2f})")
                        for b in betas) + "."
        )
        chosen_falls = all(all(a["logratio_best"][0] > b["logratio_best"][0] for a, b in zip(rows, rows[1:]))
                           for rows in by_beta.values())
        claims.append(
            f"**A larger z0 lowers the final chosen reward**: {'holds' if chosen_falls else 'does not hold'} here "
            "(beta * log-ratio of each prompt's best response at the end): "
            + "; ".join(f"beta {b}: " + series(b, lambda r, b=b: f"{b * r['logratio_best'][0]:.2f}") for b in betas) + "."
        )
        z0s = sorted({r[z0_key] for r in rao})
        gap = {(r[beta_key], r[z0_key]): r["logratio_gap"][0] for r in rao}
        widens = len(betas) > 1 and all(
            all(gap[(small, z0)] > gap[(large, z0)] for small, large in zip(betas, betas[1:])) for z0 in z0s)
        claims.append(
            f"**A smaller beta widens the chosen-rejected gap**: {'holds' if widens else 'does not hold'} here "
            "(best - worst log-ratio at the end): "
            + "; ".join(f"z0={z0}: " + ", ".join(f"beta {b}: {gap[(b, z0)]:.2f}" for b in betas) for z0 in z0s) + "."
        )
        spread_z0 = max(max(gap[(b, z0)] for z0 in z0s) - min(gap[(b, z0)] for z0 in z0s) for b in betas)
        spread_beta = min(max(gap[(b, z0)] for b in betas) - min(gap[(b, z0)] for b in betas) for z0 in z0s)
        barely = len(betas) > 1 and spread_z0 < 0.5 * spread_beta
        claims.append(
            f"**z0 barely changes the gap**: {'holds' if barely else 'does not hold'} here (largest change of the gap "
            f"across z0 at one beta {spread_z0:.2f} nats, against a smallest change across beta at one z0 of "
            f"{spread_beta:.2f}; 'barely' = under half)."
        )
    dpo = sorted((row for row in sweep_rows if row["method"] == "DPO" and beta_key in row and z0_key not in row),
                 key=lambda r: r[beta_key])
    if dpo:
        weakest = dpo[0]
        lowered = weakest["logratio_best"][0] < 0
        claims.append(
            f"**DPO at weak KL lowers the chosen response's log-probability**: {'holds' if lowered else 'does not hold'} "
            "here (final log-ratio of each prompt's best response): "
            + ", ".join(f"beta {r[beta_key]}: {_fmt(r['logratio_best'], 2)}" for r in dpo) + "."
        )
    return claims


def verdict(main_rows: Sequence[Mapping[str, Any]]) -> str:
    """One plain sentence: which methods beat their SFT start on test, by how much, and how sure that is."""
    rows = [r for r in main_rows if "vs_sft" in r]
    if not rows:
        return "No method was run."
    if any(math.isnan(r["vs_sft"][1]) for r in rows):  # one seed: differences without intervals
        above = sorted((r for r in rows if r["vs_sft"][0] > 0), key=lambda r: -r["vs_sft"][0])
        named = ", ".join(f"{r['method']} {r['vs_sft'][0]:+.3f}" for r in above) or "none"
        return (f"One seed, so no intervals: test true reward above SFT's for {len(above)} of {len(rows)} methods "
                f"({named}); differences of one seed are not evidence that a method beats SFT (run the study).")
    better = [r for r in rows if r["vs_sft"][0] - r["vs_sft"][1] > 0]
    worse = [r for r in rows if r["vs_sft"][0] + r["vs_sft"][1] < 0]

    def listed(group):
        return ", ".join(f"{r['method']} ({_fmt(r['vs_sft'])})" for r in group) or "none"

    return (f"Beat SFT on test with a 95% interval above zero: {listed(better)}. Below SFT with an interval below "
            f"zero: {listed(worse)}. The other {len(rows) - len(better) - len(worse)} methods are within their "
            "intervals of SFT.")


def write_report(study: Study, report: Mapping[str, Any], chosen: Mapping[str, tuple]) -> Path:
    """``<out>/study.md``, ``<out>/study.json`` and the PNG figures."""
    from rao_tune.toy.plots import curves_plot, results_plot, sweep_plot

    out = study.out
    seeds = report["seeds"]
    rm = report["reward_model"]
    lines = [
        f"# Toy study: {len(report['main']) - 1} methods, seeds {seeds}",
        "",
        f"{report['num_runs']} alignment runs ({report['run_seconds']:.0f} s each on average). Main condition "
        f"`{report['main_condition']}`: rewards standardized over the training set. Per method the setting with the "
        "best mean **validation** true reward is chosen; the **test** prompts (disjoint from the training and "
        "validation prompts, none of them demonstrated in SFT) are only reported. "
        "Intervals: 95% t-intervals over seeds.",
        "",
        f"Reward model (per seed, Bradley-Terry on SFT samples ordered by the true reward): held-out pair accuracy "
        f"{_fmt(rm['heldout_accuracy'])}; on the training samples it orders {_fmt(rm['pair_agreement'])} of the pairs "
        f"the true reward orders; its annotations' std {_fmt(rm['reward_model_std'], 2)} against the true reward's "
        f"{_fmt(rm['true_reward_std'], 2)}.",
        "",
        "## Main results (test prompts, setting chosen on validation)",
        "",
        "| method | reward | chosen setting | validation true reward | test true reward | test minus SFT (paired) | "
        "test accuracy |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['method']} | {r['kind']} | {r['setting']} | {_fmt(r['validation'])} | {_fmt(r['test'])} | "
          f"{_fmt(r['vs_sft']) if 'vs_sft' in r else '-'} | {_fmt(r['accuracy'])} |" for r in report["main"]],
        "",
        f"**{verdict(report['main'])}**",
        "",
        "## Ablations (each method at its chosen setting, one thing changed; test true reward)",
        "",
        "| changed to | method | reward | main condition | changed | difference |",
        "|---|---|---|---|---|---|",
        *[f"| {r['condition']} | {r['method']} | {r['kind']} | {_fmt(r['main'])} | {_fmt(r['changed'])} | "
          f"{_fmt(r['difference'])} |" for r in report["ablations"]],
        "",
        "## The paper's Fig. 2 claims",
        "",
        *[f"- {claim}" for claim in fig2_claims(report["sweeps"])],
        "",
        "| sweep | setting | test true reward | mean implicit reward | best log-ratio | worst log-ratio | gap | "
        "prompt log-ratio | KL estimate |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['sweep']} | {r['setting']} | {_fmt(r['test'])} | {_fmt(r['implicit_reward'], 2)} | "
          f"{_fmt(r['logratio_best'], 2)} | {_fmt(r['logratio_worst'], 2)} | {_fmt(r['logratio_gap'], 2)} | "
          f"{_fmt(r['prompt_logratio'], 2)} | {_fmt(r['kl_estimate'], 2)} |" for r in report["sweeps"]],
        "",
        "## Every grid setting (validation true reward only)",
        "",
        "| method | setting | validation true reward | chosen |",
        "|---|---|---|---|",
        *[f"| {r['method']} | {r['setting']} | {_fmt(r['validation'])} | {'yes' if r['chosen'] else ''} |"
          for r in report["grid"]],
        "",
        "Figures: `results.png` (test true reward with intervals, ablations beside), "
        + ("`fig2_sweep.png` (RAO over beta and z0), " if report["sweeps"] else "")
        + "`training_curves.png` (implicit rewards of best / worst responses and the normaliser over steps).",
    ]
    if not report["sweeps"]:  # no Fig. 2 section without a sweep
        start = lines.index("## The paper's Fig. 2 claims")
        del lines[start : lines.index("## Every grid setting (validation true reward only)")]
    if not report["ablations"]:
        start = lines.index("## Ablations (each method at its chosen setting, one thing changed; test true reward)")
        del lines[start : lines.index("## The paper's Fig. 2 claims") if report["sweeps"] else
                  lines.index("## Every grid setting (validation true reward only)")]
    if "wall_seconds" in report:
        lines.insert(2, f"Wall time of this invocation: {report['wall_seconds'] / 60:.1f} min.")
        lines.insert(3, "")
    path = out / "study.md"
    write_atomically(path, "\n".join(lines) + "\n")
    write_atomically(out / "study.json", json.dumps(report, indent=1, default=str) + "\n")
    results_plot(out / "results.png", report["main"], report["ablations"])
    sweep_plot(out / "fig2_sweep.png", report["sweeps"])
    curves = {method: [study.results[Run(method, chosen[method], study.main, seed)]["training"]["curves"]
                       for seed in seeds]
              for method in ("RAO", "DPO") if method in chosen}
    curves_plot(out / "training_curves.png", curves)
    return path


def run_study(cfg: DictConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the study of ``cfg`` and write its report; returns the report's data."""
    return Study(cfg, log=log).run()
