"""``metagrad sweep`` (Optuna) and ``metagrad run --seeds``, as a user runs them, on tiny runs."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metagrad.cli import main
from metagrad.experiments import get_experiment
from metagrad.experiments._report import numeric_leaves

TINY = ["quick=true", "train.iterations=20", "train.eval_every=10", "train.val_tasks=20", "train.eval_tasks=40"]
FAST = [a for kv in TINY for a in ("--set", kv)] + ["--no-progress"]


def _read(path: Path):
    return json.loads(path.read_text())


def _table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]  # past header and rule


def _files(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- sweeps
def test_grid_sweep_table_holds_the_trials_own_results(tmp_path, capsys):
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    grid = [0.05, 0.1, 0.5]
    assert main(["sweep", "linreg-depth", "--out", str(out), "--grid",
                 "--param", "inner_lr=grid:" + ",".join(map(str, grid)), *FAST]) == 0
    printed = capsys.readouterr().out
    md = (out / "sweep.md").read_text()
    assert printed == md
    result = _read(out / "sweep.json")
    assert result["objective"] == "deep.val_mse" and result["direction"] == "minimize"  # the default: validation
    trials = result["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 3
    assert sorted(t["params"]["inner_lr"] for t in trials) == grid  # each grid point once
    experiment = get_experiment("linreg-depth")
    for t in trials:
        folder = out / t["folder"]
        assert t["objective"] == _read(folder / "summary.json")["deep"]["val_mse"]
        logged = [json.loads(line) for line in (folder / "deep" / "metrics.jsonl").read_text().splitlines()]
        assert t["objective"] == [r["val_metric"] for r in logged if "val_metric" in r][-1]  # the last validation
        # a trial is the run that `metagrad run --set ... --set inner_lr=v` makes
        assert _read(folder / "config.json") == experiment.resolve([*TINY, f"inner_lr={t['params']['inner_lr']}"])
    rows = _table_rows(md)
    assert len(rows) == 3
    objectives = [float(r[1]) for r in rows]
    assert objectives == sorted(objectives)  # best (lowest) first
    assert [int(r[0]) for r in rows] == [t["number"] for t in trials]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["best"] == trials[0]


def test_tpe_sweep_reports_validation_curves(tmp_path):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "tpe"
    assert main(["sweep", "sinusoid", "--out", str(out), "--trials", "3", "--param", "inner_lr=loguniform:0.001:1",
                 "--param", "train.meta_lr=loguniform:1e-4:1e-2", "--param", "hidden=choice:[8,8]|[16,16]",
                 "--set", "shots=[5]", "--set", "test_steps=2", *FAST]) == 0
    result = _read(out / "sweep.json")
    assert len(result["trials"]) == 3 and {t["state"] for t in result["trials"]} == {"complete"}
    study = optuna.load_study(study_name="metagrad-sweep", storage=optuna.storages.JournalStorage(
        _journal_backend(optuna)(str(out / "sweep.journal"))))
    for t in result["trials"]:
        params, config = t["params"], _read(out / t["folder"] / "config.json")
        assert 0.001 <= params["inner_lr"] <= 1 and 1e-4 <= params["train.meta_lr"] <= 1e-2
        assert params["hidden"] in ([8, 8], [16, 16])
        assert (config["inner_lr"], config["train"]["meta_lr"], config["hidden"]) == \
            (params["inner_lr"], params["train.meta_lr"], params["hidden"])
        assert t["objective"] == _read(out / t["folder"] / "summary.json")["5-shot"]["val_mse"]
        # the pruner saw the objective's variant's validation curve, as the training loop logged it
        logged = [json.loads(line) for line in (out / t["folder"] / "5-shot" / "metrics.jsonl").read_text().splitlines()]
        curve = {r["iteration"]: r["val_metric"] for r in logged if "val_metric" in r and r["iteration"] > 0}
        assert study.trials[t["number"]].intermediate_values == curve and list(curve) == [10, 20]


def _journal_backend(optuna):
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend
    return JournalFileBackend


def test_pruned_trials_stop_early_and_leave_no_summary(tmp_path):
    optuna = pytest.importorskip("optuna")
    from metagrad.sweep import sweep

    out = tmp_path / "pruned"
    result = sweep(get_experiment("linreg-depth"), out, ["inner_lr=uniform:0.05:0.5"], trials=2, overrides=TINY,
                   pruner=optuna.pruners.ThresholdPruner(upper=0.0), progress=False)  # every MSE is above 0
    assert [t["state"] for t in result["trials"]] == ["pruned", "pruned"]
    for t in result["trials"]:
        assert t["pruned_at_iteration"] == 10 and t["objective"] is None
        folder = out / t["folder"]
        assert (folder / "shallow" / "summary.json").exists()  # trained before the watched variant
        assert not (folder / "deep" / "summary.json").exists() and not (folder / "summary.json").exists()
    assert [r[-2] for r in _table_rows((out / "sweep.md").read_text())] == ["pruned at iteration 10"] * 2


def test_sweep_continues_without_repeating_finished_trials(tmp_path, capsys):
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    args = ["sweep", "linreg-depth", "--out", str(out), "--grid", "--param", "inner_lr=grid:0.05,0.1,0.2,0.5", *FAST]
    assert main([*args, "--trials", "2"]) == 0
    first = {t["folder"]: t for t in _read(out / "sweep.json")["trials"]}
    assert len(first) == 2
    before = {name: _files(out / name) for name in first}
    assert main(args) == 0  # the whole grid now
    trials = _read(out / "sweep.json")["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 4
    assert sorted(t["params"]["inner_lr"] for t in trials) == [0.05, 0.1, 0.2, 0.5]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"trial-{i:04d}" for i in range(4)]
    for name, files in before.items():
        assert _files(out / name) == files  # finished trials untouched
        assert next(t for t in trials if t["folder"] == name) == first[name]
    assert main([*args, "--trials", "5"]) == 2  # a grid has no fifth point
    assert main([*args, "--set", "train.meta_lr=0.02"]) == 2  # another sweep: refused, nothing run
    assert "holds a sweep with overrides" in capsys.readouterr().err
    assert len(_read(out / "sweep.json")["trials"]) == 4


def test_killed_trial_is_retried_in_its_folder(tmp_path):
    """A sweep killed (SIGKILL) in its second trial: run again, the study marks that trial failed and
    a retry continues its run from the checkpoints to the same result as an uninterrupted run."""
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    longer = [*TINY, "train.iterations=600", "train.eval_every=100", "train.checkpoint_every=50"]
    sets = [a for kv in longer for a in ("--set", kv)]
    args = ["sweep", "linreg-depth", "--out", str(out), "--grid", "--param", "inner_lr=grid:0.1,0.3", *sets,
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from metagrad.cli import main; sys.exit(main())",
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "trial-0001" / "shallow" / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "trial-0001" / "summary.json").exists()
    done = _files(out / "trial-0000")
    assert main(args) == 0
    trials = sorted(_read(out / "sweep.json")["trials"], key=lambda t: t["number"])
    assert [(t["number"], t["state"], t["folder"]) for t in trials] == [
        (0, "complete", "trial-0000"), (1, "fail", "trial-0001"), (2, "complete", "trial-0001")]
    assert trials[2]["retry_of"] == 1 and trials[1]["retried_by"] == 2
    assert trials[2]["params"] == trials[1]["params"]
    assert _files(out / "trial-0000") == done
    # the retried run equals one never interrupted
    clean = tmp_path / "clean"
    assert main(["run", "linreg-depth", "--out", str(clean), *sets, "--set",
                 f"inner_lr={trials[2]['params']['inner_lr']}", "--no-progress"]) == 0
    assert _read(out / "trial-0001" / "summary.json") == _read(clean / "summary.json")


def test_missing_objective_key_lists_the_keys_then_the_sweep_goes_on(tmp_path, capsys):
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    args = ["sweep", "linreg-depth", "--out", str(out), "--grid", "--param", "inner_lr=grid:0.1", *FAST]
    assert main([*args, "--objective", "deep.post_adapt_mze", "--direction", "minimize"]) == 2
    err = capsys.readouterr().err
    assert "no numeric key 'deep.post_adapt_mze'" in err and "deep.post_adapt_mse, deep.post_adapt_mse_ci95" in err
    assert main(args) == 0  # the right objective: the run is taken up again, not repeated
    trials = sorted(_read(out / "sweep.json")["trials"], key=lambda t: t["number"])
    assert [(t["state"], t["folder"]) for t in trials] == [("fail", "trial-0000"), ("complete", "trial-0000")]


def test_a_trial_whose_training_diverges_is_diverged_and_the_sweep_goes_on(tmp_path, capsys):
    pytest.importorskip("optuna")
    from metagrad import DivergedError
    from metagrad.experiments import run

    with pytest.raises(DivergedError, match="non-finite"):  # the setting diverges as a plain run, too
        run(get_experiment("linreg-depth"), tmp_path / "plain", [*TINY, "inner_lr=1000.0"], progress=False)
    out = tmp_path / "sweep"
    assert main(["sweep", "linreg-depth", "--out", str(out), "--grid", "--param", "inner_lr=grid:0.1,1000.0",
                 *FAST]) == 0
    trials = {t["params"]["inner_lr"]: t for t in _read(out / "sweep.json")["trials"]}
    assert trials[0.1]["state"] == "complete" and trials[0.1]["objective"] is not None
    bad = trials[1000.0]
    assert bad["state"] == "complete" and bad["objective"] is None and "non-finite" in bad["diverged"]
    assert _read(out / "sweep.json")["best"]["params"] == {"inner_lr": 0.1}
    rows = _table_rows((out / "sweep.md").read_text())
    assert rows[-1][1] == "diverged"


def test_wildcard_objective_is_the_mean_of_the_matching_validation_numbers(tmp_path):
    """``variants.tanh-*.val_ce`` averages the tanh variants' final validation CE, each being the
    last validation record of that variant's training (metrics.jsonl), not a test-task number."""
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    tiny = ["epochs=1", "batches_per_epoch=4", "train.eval_every=2", "train.val_tasks=16", "train.eval_tasks=24",
            "steps=[1,2]", 'methods=["vanilla","tanh"]']
    assert main(["sweep", "wormhole-threshold", "--out", str(out), "--grid", "--param", "c_lr=grid:1.0,10.0",
                 "--objective", "variants.tanh-*.val_ce", "--direction", "minimize", "--no-progress",
                 *(a for kv in tiny for a in ("--set", kv))]) == 0
    trials = _read(out / "sweep.json")["trials"]
    assert len(trials) == 2
    for t in trials:
        folder = out / t["folder"]
        variants = _read(folder / "summary.json")["variants"]
        vals = []
        for name in ("tanh-1step", "tanh-2step"):
            records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in records if "val_loss" in r][-1]
            assert last["iteration"] == 4
            assert variants[name]["val_ce"] == last["val_loss"]
            assert _read(folder / name / "summary.json")["validation"] == {
                "tasks": 16, "iteration": 4, "loss": last["val_loss"], "metric": last["val_metric"]}
            vals.append(last["val_loss"])
        assert t["objective"] == pytest.approx(sum(vals) / 2, rel=1e-12)
        assert variants["vanilla-1step"]["val_ce"] not in vals


def test_wildcard_objective_diverged_part_and_no_match():
    from metagrad.sweep import objective_value

    summary = {"variants": {"a-1": {"v": 1.0}, "a-2": {"v": 3.0}, "b-1": {"v": 10.0, "diverged_tasks": 0}}}
    assert objective_value(summary, "variants.a-*.v") == 2.0
    assert objective_value(summary, "variants.*.v") == pytest.approx(14 / 3)
    assert objective_value(summary, "variants.a-1.v") == 1.0
    summary["variants"]["a-2"]["diverged_tasks"] = 3
    assert objective_value(summary, "variants.a-*.v") is None  # one diverged part: the whole mean is diverged
    with pytest.raises(ValueError, match=r"no numeric key 'variants.c-\*.v'"):
        objective_value(summary, "variants.c-*.v")


@pytest.mark.parametrize("extra, message", [
    (["--param", "inner_lr=loguniform:0:1", "--trials", "2"], "loguniform needs LOW > 0, got 0.0"),
    (["--param", "inner_lr=uniform:1:0.5", "--trials", "2"], "LOW must be below HIGH, got 1.0 and 0.5"),
    (["--param", "inner_lr=uniform:0.1", "--trials", "2"], "uniform takes LOW:HIGH"),
    (["--param", "inner_lr=normal:0:1", "--trials", "2"], "unknown kind 'normal'; valid: loguniform"),
    (["--param", "inner_lrr=uniform:0.1:1", "--trials", "2"], "unknown config key 'inner_lrr'; valid keys: quick"),
    (["--param", "train.meta_batch_size=uniform:10:100", "--trials", "2"], "train.meta_batch_size takes integers (it is 10): use int:LOW:HIGH"),
    (["--param", "inner_lr=choice:0.1|fast", "--trials", "2"], "the value 'fast'"),
    (["--param", "inner_lr=grid:0.1,0.1", "--grid"], "the value 0.1 is listed twice"),
    (["--param", "inner_lr=choice:0.1|", "--trials", "2"], "empty value"),
    (["--param", "inner_lr=grid:0.1,0.2", "--trials", "2"], "is a grid: pass --grid"),
    (["--param", "inner_lr=uniform:0.1:1", "--grid"], "--grid takes lists of values"),
    (["--param", "inner_lr=uniform:0.1:1"], "--trials N is needed"),
    (["--param", "inner_lr=uniform:0.1:1", "--param", "inner_lr=uniform:0.1:1", "--trials", "2"], "given twice"),
    (["--param", "inner_lr=uniform:0.1:1", "--trials", "2", "--set", "inner_lr=0.1"], "conflicts with --param"),
    (["--param", "inner_lr=uniform:0.1:1", "--trials", "2", "--objective", "shallow.post_adapt_mse"],
     "needs --direction"),
    (["--param", "inner_lr=uniform:0.1:1", "--trials", "0"], "--trials must be a positive integer, got 0"),
])
def test_bad_params_are_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    assert main(["sweep", "linreg-depth", "--out", str(out), *extra, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_experiment_without_a_default_objective_needs_one(tmp_path, capsys):
    pytest.importorskip("optuna")
    assert main(["sweep", "logreg-depth", "--out", str(tmp_path / "s"), "--param", "inner_lr=uniform:0.1:1",
                 "--trials", "2"]) == 2
    assert "logreg-depth has no default objective: pass --objective KEY" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_without_optuna_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails
    assert main(["sweep", "linreg-depth", "--out", str(tmp_path / "s"), "--param", "inner_lr=uniform:0.1:1",
                 "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "metagrad: error: metagrad sweep needs optuna: pip install 'metagrad[sweep]'\n"
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- several seeds
def test_seeds_are_separate_runs_and_their_aggregate_is_mean_and_t_interval(tmp_path, capsys):
    from scipy import stats

    out = tmp_path / "seeds"
    assert main(["run", "linreg-depth", "--out", str(out), "--seeds", "0", "1", *FAST]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "seeds.md").read_text()
    # each seed's folder is the run `--set seed=S` makes
    single = tmp_path / "single"
    assert main(["run", "linreg-depth", "--out", str(single), *FAST, "--set", "seed=1"]) == 0
    for name in ("config.json", "summary.json", "deep/summary.json"):
        assert _read(out / "seed-1" / name) == _read(single / name)
    assert _read(out / "seed-0" / "config.json")["seed"] == 0
    result = _read(out / "seeds.json")
    assert result["runs"] == {"0": "seed-0", "1": "seed-1"}
    summaries = [_read(out / f"seed-{s}" / "summary.json") for s in (0, 1)]
    leaves = [numeric_leaves(s) for s in summaries]
    assert list(result["aggregate"]) == list(leaves[0])
    for key, agg in result["aggregate"].items():
        values = [leaf[key] for leaf in leaves]
        assert agg["values"] == values and agg["n"] == 2
        assert agg["mean"] == pytest.approx(sum(values) / 2, rel=1e-12)
        half = stats.t.ppf(0.975, df=1) * statistics.stdev(values) / math.sqrt(2)  # 12.706 s / sqrt(2)
        assert agg["ci95"] == pytest.approx(half, rel=1e-9, abs=1e-15)
    mse = result["aggregate"]["deep.post_adapt_mse"]
    a, b = mse["values"]
    assert mse["ci95"] == pytest.approx(12.706204736 * abs(a - b) / 2, rel=1e-8)  # by hand: s = |a - b| / sqrt(2)
    assert len(_table_rows(printed)) == len(result["aggregate"])


def test_seeds_resume_per_seed(tmp_path):
    out = tmp_path / "seeds"
    assert main(["run", "linreg-depth", "--out", str(out), "--seeds", "0", "1", *FAST]) == 0
    seed0 = _files(out / "seed-0")
    finished = _read(out / "seed-1" / "summary.json")
    (out / "seed-1" / "summary.json").unlink()  # as if killed before the end of seed 1
    assert main(["run", "linreg-depth", "--out", str(out), "--seeds", "0", "1", *FAST]) == 2  # not without --resume
    assert main(["run", "linreg-depth", "--out", str(out), "--seeds", "0", "1", "2", "--resume", "--no-progress"]) == 0
    assert _files(out / "seed-0") == seed0  # finished: read back, not rerun
    assert _read(out / "seed-1" / "summary.json") == finished  # resumed from its checkpoints
    assert _read(out / "seed-2" / "config.json") == get_experiment("linreg-depth").resolve([*TINY, "seed=2"])
    agg = _read(out / "seeds.json")["aggregate"]
    assert agg["deep.post_adapt_mse"]["n"] == 3


def test_seeds_refuse_a_seed_override(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["run", "linreg-depth", "--out", str(out), "--seeds", "0", "1", "--set", "seed=3"]) == 2
    assert "--seeds cannot be combined with --set seed=" in capsys.readouterr().err
    assert main(["run", "linreg-depth", "--out", str(out), "--seeds", "0", "0"]) == 2
    assert "distinct integers, got [0, 0]" in capsys.readouterr().err
    assert main(["run", "linreg-depth", "--out", str(out), "--seeds", "0", "--set", "inner_lrr=1"]) == 2
    assert "inner_lrr" in capsys.readouterr().err
    assert not out.exists()


def test_seeds_md_leads_with_the_experiments_own_table_of_means_and_cis(tmp_path, capsys):
    """Wormhole's seeds report: Table 1's layout, each cell the mean +- t-interval of the seeds'
    summed query CE (by hand from the per-seed summaries), the paper's number in brackets."""
    from scipy import stats

    out = tmp_path / "seeds"
    tiny = ["epochs=1", "batches_per_epoch=3", "train.eval_every=3", "train.val_tasks=16", "train.eval_tasks=24",
            "steps=[1,2]", 'methods=["vanilla","tanh"]']
    assert main(["run", "wormhole-threshold", "--out", str(out), "--seeds", "3", "4", "5", "--no-progress",
                 *(a for kv in tiny for a in ("--set", kv))]) == 0
    md = (out / "seeds.md").read_text()
    assert capsys.readouterr().out == md
    head, rest = md.split("## Every summary key")
    assert "## Query cross-entropy x queries (Table 1)" in head and "over 3 seeds" in head
    rows = {r[0]: r[1:] for r in _table_rows(head.split("## Query accuracy")[0])}
    assert list(rows) == ["Vanilla MAML", "Wormhole tanh (eq 4)"]
    for label, method, paper in (("Vanilla MAML", "vanilla", ["5.6", "5.08"]), ("Wormhole tanh (eq 4)", "tanh",
                                                                                   ["1.56", "1.41"])):
        for cell, k, ref in zip(rows[label], (1, 2), paper):
            values = [_read(out / f"seed-{s}" / "summary.json")["variants"][f"{method}-{k}step"]["query_ce_sum"]
                      for s in (3, 4, 5)]
            half = stats.t.ppf(0.975, df=2) * statistics.stdev(values) / math.sqrt(3)
            assert cell == f"{statistics.mean(values):.2f} +- {half:.2f} ({ref})"
    assert len(_table_rows(rest)) == len(_read(out / "seeds.json")["aggregate"])

