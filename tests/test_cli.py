"""The command line and config overrides, as a user runs them."""
from __future__ import annotations

import json

import pytest

from metagrad.cli import main
from metagrad.config import apply_overrides

FAST = ["--set", "train.iterations=30", "--set", "train.eval_every=10", "--set", "train.val_tasks=20",
        "--set", "train.eval_tasks=40", "--no-progress"]


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("linreg-depth", "logreg-depth", "sinusoid"):
        assert name in out
    assert all(len(line.split(None, 1)) == 2 for line in out.strip().splitlines())


def test_run_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "linreg-depth", "--out", str(out), "--set", "quick=true", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["shallow"]) >= {"post_adapt_mse", "post_adapt_mse_ci95"}
    assert "post_adapt_mse" in summary["deep"]
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == "linreg-depth" and config["quick"] is True
    assert config["train"]["iterations"] == 30  # the user's override wins over quick's
    assert (out / "linreg_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in ("shallow", "deep"):
        assert (out / variant / "checkpoint.pt").exists() and (out / variant / "metrics.csv").exists()
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["deep"]["tasks"] == 50 and result["deep"]["iteration"] == 30
    assert json.loads((out / "eval.json").read_text()) == result
    # naming the CPU device evaluates the same tasks to the same figures
    assert main(["eval", str(out), "--tasks", "50", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    # evaluating under a changed config: more inner steps on the same tasks extend the same curve
    assert main(["eval", str(out), "--tasks", "50", "--set", "inner_steps=3"]) == 0
    longer = json.loads(capsys.readouterr().out)["deep"]
    assert longer["overrides"] == ["inner_steps=3"] and len(longer["metric"]["by_step"]) == 4
    assert longer["metric"]["by_step"][:2] == pytest.approx(result["deep"]["metric"]["by_step"], rel=1e-6)
    assert main(["eval", str(out), "--tasks", "5", "--variant", "shallow"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"shallow"}
    assert main(["eval", str(out), "--set", "inner_stepz=3"]) == 2
    assert "inner_stepz" in capsys.readouterr().err
    # a second run into the same folder is refused rather than overwriting it
    assert main(["run", "linreg-depth", "--out", str(out), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["run", "nope", "--out", "X"], "valid: amaml-cf, amaml-regression, arnold-depth, arnold-table1, arnold-table2, arnold-table3, linnet-collapse, linreg-depth, linreg-landscape, logreg-depth, omniglot-maml, sinusoid, wormhole-mnist, wormhole-threshold, wormhole-wavelet"),
    (["run", "linreg-depth", "--out", "X", "--set", "train.iterationz=3"], "train.iterationz"),
    (["run", "linreg-depth", "--out", "X", "--set", "inner_lr=fast"], "inner_lr"),
    (["run", "linreg-depth", "--out", "X", "--set", "noequals"], "key=value"),
    (["run", "linreg-depth", "--out", "X", "--resume"], "nothing to resume"),
    (["eval", "X"], "not a metagrad run directory"),
])
def test_bad_input_is_a_clear_error(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "X").exists()  # nothing half-written


def test_overrides_parse_and_type_check():
    cfg = {"a": 1, "b": {"c": 0.5, "d": "x", "e": True, "f": [1, 2]}}
    out = apply_overrides(cfg, ["a=3", "b.c=2", "b.d=hello", "b.e=false", "b.f=[3]"])
    assert out == {"a": 3, "b": {"c": 2.0, "d": "hello", "e": False, "f": [3]}}
    assert cfg["a"] == 1  # the input is not modified
    with pytest.raises(ValueError, match="integer"):
        apply_overrides(cfg, ["a=1.5"])
    with pytest.raises(ValueError, match="valid keys: a, b.c"):
        apply_overrides(cfg, ["b.zz=1"])
    with pytest.raises(ValueError, match="unknown config key 'b'"):
        apply_overrides(cfg, ["b=1"])


def test_missing_data_writes_nothing(tmp_path, monkeypatch, capsys):
    """A run that cannot find its data fails before creating the run directory."""
    monkeypatch.setenv("METAGRAD_DATA", str(tmp_path / "empty"))
    out = tmp_path / "run"
    assert main(["run", "omniglot-maml", "--out", str(out), "--no-progress"]) == 2
    assert "no Omniglot data" in capsys.readouterr().err
    assert not out.exists()


def test_variant_selection_trains_only_the_named_variants_and_resume_keeps_it(tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--set", "quick=true", "--set", "train.iterations=3", "--set", "train.eval_tasks=20",
            "--no-progress"]
    assert main(["run", "linreg-depth", "--out", str(out), "--variant", "shallow", *fast]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "shallow" in summary and "deep" not in summary and summary["shallow"]["tasks"] == 20
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["shallow"]
    assert json.loads((out / "config.json").read_text())["only"] == ["shallow"]
    assert main(["run", "linreg-depth", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["shallow"]
    assert main(["eval", str(out), "--tasks", "5"]) == 0
    capsys.readouterr()
    assert main(["run", "linreg-depth", "--out", str(tmp_path / "x"), "--variant", "medium", *fast]) == 2
    assert "unknown variant 'medium'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_resume_with_more_iterations_trains_on_to_the_run_of_that_length(tmp_path, capsys):
    fast = ["--set", "quick=true", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4",
            "--set", "train.eval_tasks=20", "--no-progress"]
    short, straight = tmp_path / "short", tmp_path / "straight"
    assert main(["run", "linreg-depth", "--out", str(short), "--set", "train.iterations=4", *fast]) == 0
    assert main(["run", "linreg-depth", "--out", str(straight), "--set", "train.iterations=8", *fast]) == 0
    capsys.readouterr()
    before = (short / "config.json").read_text()

    def refused(args, message):
        assert main(["run", *args, "--resume", "--no-progress"]) == 2
        assert message in capsys.readouterr().err

    refused(["linreg-depth", "--out", str(short), "--set", "inner_lr=0.2"], "train.iterations may be raised")
    refused(["linreg-depth", "--out", str(short), "--set", "train.iterations=3"], "at least the run's 4")
    refused(["linreg-depth", "--out", str(short), "--set", "train.iterations=true"], "expects an integer")
    assert (short / "config.json").read_text() == before  # a refused resume changes nothing
    assert main(["run", "linreg-depth", "--out", str(short), "--resume", "--set", "train.iterations=8",
                 "--no-progress"]) == 0
    capsys.readouterr()
    longer, ref = (json.loads((d / "summary.json").read_text()) for d in (short, straight))
    for name in ("shallow", "deep"):  # 4 + 4 iterations from the checkpoint: the 8-iteration run
        assert json.loads((short / name / "summary.json").read_text())["iterations"] == 8
        assert longer[name]["post_adapt_mse"] == pytest.approx(ref[name]["post_adapt_mse"], rel=1e-6)
    assert json.loads((short / "config.json").read_text()) == json.loads((straight / "config.json").read_text())
    land = tmp_path / "land"  # an experiment with no iteration key to raise refuses every --set on resume
    assert main(["run", "linreg-landscape", "--out", str(land), "--set", "quick=true", "--no-progress"]) == 0
    capsys.readouterr()
    refused(["linreg-landscape", "--out", str(land), "--set", "iterations=500"], "no key of linreg-landscape")


def test_merge_combines_variant_runs_into_the_full_report(tmp_path, capsys):
    # two processes each train one variant; merged, they give the report of one run of both
    fast = ["--set", "quick=true", "--set", "train.iterations=4", "--set", "train.eval_tasks=20", "--no-progress"]
    for name in ("shallow", "deep"):
        assert main(["run", "linreg-depth", "--out", str(tmp_path / name), "--variant", name, *fast]) == 0
    assert main(["run", "linreg-depth", "--out", str(tmp_path / "both"), *fast]) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "deep"), str(tmp_path / "shallow"), "--out", str(merged)]) == 0
    printed = json.loads(capsys.readouterr().out)
    full = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert printed == json.loads((merged / "summary.json").read_text())
    for name in ("shallow", "deep"):  # the same seeds train the same model alone or together
        assert printed[name]["post_adapt_mse"] == pytest.approx(full[name]["post_adapt_mse"], rel=1e-6)
        assert (merged / name / "checkpoint.pt").exists()
    config = json.loads((merged / "config.json").read_text())
    assert "only" not in config and config == json.loads((tmp_path / "both" / "config.json").read_text())
    assert (merged / "linreg_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the merged folder is a normal run: it evaluates and resumes
    assert main(["eval", str(merged), "--tasks", "5"]) == 0
    assert main(["run", "linreg-depth", "--out", str(merged), "--resume", "--no-progress"]) == 0
    capsys.readouterr()

    def refused(args, message):
        assert main(["merge", *args]) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left

    refused([str(tmp_path / "shallow"), "--out", str(merged)], "already exists")
    refused([str(tmp_path / "shallow"), str(tmp_path / "both"), "--out", str(tmp_path / "m2")], "'shallow' is in both")
    assert main(["run", "linreg-depth", "--out", str(tmp_path / "lr"), "--variant", "deep", *fast,
                 "--set", "inner_lr=0.2"]) == 0
    capsys.readouterr()
    refused([str(tmp_path / "shallow"), str(tmp_path / "lr"), "--out", str(tmp_path / "m3")], "'inner_lr' differs")
    refused([str(tmp_path / "nope"), "--out", str(tmp_path / "m4")], "not a metagrad run directory")
    assert not any((tmp_path / m).exists() for m in ("m2", "m3", "m4"))
    # a key named in --ignore may differ (the first source's value is kept); one variant alone is a partial run
    assert main(["merge", str(tmp_path / "shallow"), str(tmp_path / "lr"), "--out", str(tmp_path / "m5"),
                 "--ignore", "inner_lr"]) == 0
    assert json.loads((tmp_path / "m5" / "config.json").read_text())["inner_lr"] != 0.2
    assert main(["merge", str(tmp_path / "deep"), "--out", str(tmp_path / "m6")]) == 0
    assert json.loads((tmp_path / "m6" / "config.json").read_text())["only"] == ["deep"]


def test_jobs_trains_variants_side_by_side_with_the_sequential_results(tmp_path, capsys):
    # two worker processes (spawned) give the report of the sequential run: same seeds, same models
    fast = ["--set", "quick=true", "--set", "train.iterations=5", "--set", "train.eval_tasks=20", "--no-progress"]
    assert main(["run", "linreg-depth", "--out", str(tmp_path / "seq"), *fast]) == 0
    capsys.readouterr()
    assert main(["run", "linreg-depth", "--out", str(tmp_path / "par"), "--jobs", "2", *fast]) == 0
    printed = json.loads(capsys.readouterr().out)
    sequential = json.loads((tmp_path / "seq" / "summary.json").read_text())
    parallel = json.loads((tmp_path / "par" / "summary.json").read_text())
    assert printed == parallel and set(parallel) == set(sequential) >= {"shallow", "deep"}
    for name in ("shallow", "deep"):
        assert parallel[name]["post_adapt_mse"] == pytest.approx(sequential[name]["post_adapt_mse"], rel=1e-6)
        assert json.loads((tmp_path / "par" / name / "summary.json").read_text())["iterations"] == 5
        seq_metrics = (tmp_path / "seq" / name / "metrics.jsonl").read_text().splitlines()
        par_metrics = (tmp_path / "par" / name / "metrics.jsonl").read_text().splitlines()
        assert len(par_metrics) == len(seq_metrics) > 0
    assert (tmp_path / "par" / "linreg_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resuming with jobs continues every variant (all finished here: nothing retrained)
    assert main(["run", "linreg-depth", "--out", str(tmp_path / "par"), "--resume", "--jobs", "2",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "par" / "summary.json").read_text()) == parallel


def test_jobs_bad_value_and_a_failing_variant_stop_the_run(tmp_path, capsys):
    assert main(["run", "linreg-depth", "--out", str(tmp_path / "x"), "--jobs", "0", "--no-progress"]) == 2
    assert "jobs must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # 'deep' fails at once (its folder already holds a checkpoint); 'shallow', with far too many
    # iterations to finish, is stopped rather than waited for, and the error names 'deep'
    out = tmp_path / "run"
    (out / "deep").mkdir(parents=True)
    (out / "deep" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", "linreg-depth", "--out", str(out), "--jobs", "2", "--set", "train.iterations=10000000",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "variant 'deep'" in err and "already holds a checkpoint" in err
    assert not (out / "shallow" / "summary.json").exists() and not (out / "summary.json").exists()
