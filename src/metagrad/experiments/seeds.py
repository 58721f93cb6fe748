"""One experiment over several seeds, with means and 95% confidence intervals across them.

``metagrad run NAME --out DIR --seeds 0 1 2`` (or :func:`run_seeds`) runs the experiment once per
seed, each an ordinary run in ``DIR/seed-S`` with config ``seed=S`` (the same folder ``metagrad run
NAME --out DIR/seed-S --set seed=S`` would make), then writes ``DIR/seeds.json`` and
``DIR/seeds.md``: for every numeric leaf of the per-seed ``summary.json`` files (dotted keys, list
items by index), the mean over seeds and the half-width of its 95% confidence interval from the
t-distribution with ``n - 1`` degrees of freedom (``t_0.975 * s / sqrt(n)``, ``s`` the sample
standard deviation; none for a single seed). A leaf that is ``null`` in some seeds (a diverged
mean) is averaged over the others; ``n`` says how many.

``seeds.json`` is written first with the plan (experiment, seeds, overrides, variants), so a killed
sweep over seeds resumes with ``--resume``: finished seeds are read back, a started one continues
from its checkpoints, the others start. ``--resume --set train.iterations=N`` trains every seed on
to ``N``, as for one run.
"""
from __future__ import annotations

import math
from pathlib import Path

from .. import _lock
from .._io import clean_tmp, read_json, write_json
from ..config import _split_override
from ._report import fmt_g, fmt_overrides, md_table, numeric_leaves, write_text
from .base import Experiment, _check_variants, _longer, _selected, read_resumable, run

PLAN = "seeds.json"


def seed_folder(out_dir: str | Path, seed: int) -> Path:
    """Where :func:`run_seeds` puts the run of ``seed``: ``out_dir / f"seed-{seed}"``."""
    return Path(out_dir) / f"seed-{seed}"


def run_seeds(experiment: Experiment, out_dir: str | Path, seeds, overrides=(), *, resume: bool = False,
              variants=None, **run_kwargs) -> dict:
    """Run ``experiment`` once per seed in ``seeds`` into ``out_dir/seed-S`` and aggregate the
    summaries (see the module docstring); returns what ``seeds.json`` holds.

    ``overrides`` apply to every seed and may not set ``seed``. ``resume``: continue a killed
    multi-seed run in ``out_dir`` under its recorded overrides (``overrides`` may then only raise
    the experiment's :attr:`~Experiment.resume_keys`); ``seeds`` may add new seeds to it.
    ``variants`` and ``run_kwargs`` (``progress``, ``device``, ``jobs``) go to every
    :func:`~metagrad.experiments.base.run`.
    """
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds)):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    seeds = list(seeds)
    pairs = [_split_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    if any(key == "seed" for key, _ in pairs):
        raise ValueError("--seeds cannot be combined with --set seed=...: each run's seed is one of --seeds")
    out_dir = Path(out_dir)
    plan_path = out_dir / PLAN
    if resume:
        plan = read_resumable(plan_path, experiment, variants, "multi-seed run")
        base = [tuple(p) for p in plan["overrides"]]
        _longer(experiment, experiment.resolve(base), pairs)  # only resume_keys, never lowered
        variants = plan["variants"]
    else:
        taken = [p for p in [plan_path, *(seed_folder(out_dir, s) / "config.json" for s in seeds)] if p.exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} exists; pass --resume or choose another --out")
        base = []
        config = experiment.resolve([*pairs, ("seed", seeds[0])])  # checks keys and values before writing
        if variants:
            config["only"] = list(variants)
        _check_variants(experiment, config, _selected(experiment, config), out_dir, False)  # builds each variant
    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock.hold(out_dir, what="multi-seed run"):  # one process at a time writes the plan and seed folders
        clean_tmp(out_dir, depth=0)  # what a killed write of seeds.json left (run() cleans the seed folders)
        plan = {"experiment": experiment.name, "seeds": seeds, "overrides": [list(p) for p in dict(base + pairs).items()],
                "variants": list(variants) if variants else None}
        write_json(plan_path, plan)
        summaries = {}
        for seed in seeds:
            folder = seed_folder(out_dir, seed)
            if not resume or not (folder / "config.json").exists():
                summaries[seed] = run(experiment, folder, [*base, *pairs, ("seed", seed)], variants=variants,
                                      **run_kwargs)
            elif (folder / "summary.json").exists() and not pairs:
                summaries[seed] = read_json(folder / "summary.json")  # finished before
            else:
                summaries[seed] = run(experiment, folder, pairs, resume=True, **run_kwargs)
        result = {**plan, "runs": {str(s): seed_folder(out_dir, s).name for s in seeds},
                  "aggregate": aggregate(list(summaries.values()))}
        write_json(plan_path, result)
        write_text(out_dir / "seeds.md", seeds_table(result, experiment.seeds_report(result)))
    return result


def aggregate(summaries: list[dict]) -> dict[str, dict]:
    """For every numeric leaf key of ``summaries`` (in first-seen order): ``mean``, ``ci95`` (the
    t-distribution 95% CI half-width; ``None`` under two values), ``n`` (the values that are
    finite numbers) and ``values`` (one per summary, ``None`` where missing or not finite)."""
    from scipy import stats

    leaves = [numeric_leaves(s) for s in summaries]
    keys = list(dict.fromkeys(k for leaf in leaves for k in leaf))
    out = {}
    for key in keys:
        values = [leaf.get(key) for leaf in leaves]
        values = [v if v is not None and math.isfinite(v) else None for v in values]
        finite = [v for v in values if v is not None]
        n = len(finite)
        mean = math.fsum(finite) / n if n else None
        ci = None
        if n >= 2:
            sd = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
            ci = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out[key] = {"mean": mean, "ci95": ci, "n": n, "values": values}
    return out


def seeds_table(result: dict, headline=()) -> str:
    """``seeds.md``: the ``headline`` lines (the experiment's :meth:`~.base.Experiment.seeds_report`),
    then one row per numeric summary key, mean, 95% CI, n and each seed's value."""
    seeds = result["seeds"]
    lines = [f"# {result['experiment']} over seeds {', '.join(map(str, seeds))}", "",
             "Mean over seeds and the half-width of its 95% confidence interval (t-distribution, n - 1 "
             "degrees of freedom); n: seeds with a finite value.", ""]
    if result["overrides"]:
        lines += ["Overrides: " + fmt_overrides(result["overrides"]), ""]
    if headline:
        lines += [*headline, "", "## Every summary key", ""]
    lines += md_table(["key", "mean", "95% CI", "n", *(f"seed {s}" for s in seeds)],
                      ([key, fmt_g(a["mean"]), fmt_g(a["ci95"]), a["n"], *map(fmt_g, a["values"])]
                       for key, a in result["aggregate"].items()))
    return "\n".join(lines) + "\n"
