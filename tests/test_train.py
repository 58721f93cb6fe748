"""Training loop: checkpoints, atomic writes, resume after a kill (bitwise), run directories."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import metagrad as mg
from metagrad import train as train_mod
from metagrad.metrics import mse
from metagrad.models import linear_chain

ARGS = ["--set", "train.iterations=1500", "--set", "train.checkpoint_every=20", "--set", "train.eval_every=100",
        "--set", "train.val_tasks=100", "--set", "train.eval_tasks=300", "--no-progress"]


def _cli(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "metagrad.cli", "run", "linreg-depth", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _state(run: Path, variant: str):
    return train_mod.load_checkpoint(run / variant / "checkpoint.pt")


def test_killed_run_resumes_bitwise(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = _cli(killed, *ARGS)
    ckpt = killed / "deep" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = _state(killed, "deep")["iteration"]
    assert 0 < stopped_at < 1500
    assert not (killed / "summary.json").exists()

    resumed = _cli(killed, "--resume", "--no-progress")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    whole = _cli(ref, *ARGS)
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()

    for variant in ("shallow", "deep"):
        a, b = _state(ref, variant), _state(killed, variant)
        assert a["iteration"] == b["iteration"] == 1500
        for k in a["learner"]:
            assert torch.equal(a["learner"][k], b["learner"][k]), k
        assert (ref / variant / "metrics.jsonl").read_text() == (killed / variant / "metrics.jsonl").read_text()
        assert (ref / variant / "metrics.csv").read_text() == (killed / variant / "metrics.csv").read_text()
    assert json.loads((ref / "summary.json").read_text()) == json.loads((killed / "summary.json").read_text())


def _tiny_fit(run_dir, *, device=None, resume=False, **train):
    torch.manual_seed(0)
    learner = mg.MetaLearner(linear_chain([1, 1]), mse, lr=0.1, metric_fn=mse)
    fam = mg.LinearRegression1D(shots=5, queries=5)
    cfg = {"iterations": 10, "meta_batch_size": 4, "checkpoint_every": 5, "eval_every": 5, "val_tasks": 8,
           "eval_tasks": 16, "optimizer": "sgd", "meta_lr": 0.01, **train}
    return learner, mg.train.fit(learner, fam, fam, cfg, run_dir, progress=False, resume=resume, device=device)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    learner, _ = _tiny_fit(tmp_path)
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(train_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.save_checkpoint(path, {"iteration": 99})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert train_mod.load_checkpoint(path)["iteration"] == 10
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_run_directory_contents(tmp_path):
    learner, summary = _tiny_fit(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "summary.json"} <= names
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "val_loss" in r] == [0, 5, 10]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "iteration" and "val_loss" in header and "query_loss" in header
    assert json.loads((tmp_path / "config.json").read_text())["iterations"] == 10
    # the summary's CI is the normal-approximation 95% CI over the evaluation tasks
    assert summary["tasks"] == 16 and summary["metric"]["ci95"] > 0
    with pytest.raises(FileExistsError):
        _tiny_fit(tmp_path)


def test_fit_on_the_cpu_device_is_the_default_run(tmp_path):
    """``device`` only moves work: naming the CPU gives bitwise the run without a device."""
    a, sa = _tiny_fit(tmp_path / "a")
    b, sb = _tiny_fit(tmp_path / "b", device="cpu")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert sb.pop("device") == "cpu" and "device" not in sa
    assert sa == sb


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_matches_the_cpu_and_resumes_across_devices(tmp_path):
    """Same seeded tasks on both devices: the CUDA run's parameters and evaluation match the CPU
    run to float32 rounding, and its checkpoint resumes on the CPU."""
    cpu, s_cpu = _tiny_fit(tmp_path / "cpu")
    gpu, s_gpu = _tiny_fit(tmp_path / "gpu", device="cuda")
    assert s_gpu["device"].startswith("cuda")
    for (k, x), (_, y) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert y.is_cuda
        torch.testing.assert_close(y.cpu(), x, rtol=1e-4, atol=1e-5, msg=k)
    assert s_gpu["loss"]["mean"] == pytest.approx(s_cpu["loss"]["mean"], rel=1e-3)
    # the finished CUDA run's checkpoint resumes (no steps left) on the CPU with the same parameters
    moved, s_moved = _tiny_fit(tmp_path / "gpu", resume=True)
    for (k, x), (_, y) in zip(gpu.state_dict().items(), moved.state_dict().items()):
        assert not y.is_cuda and torch.equal(x.cpu(), y), k
    assert s_moved["loss"]["mean"] == pytest.approx(s_gpu["loss"]["mean"], rel=1e-4)


def test_cli_refuses_a_bad_device(tmp_path, capsys):
    from metagrad.cli import main

    assert main(["run", "linreg-depth", "--out", str(tmp_path / "r"), "--device", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", "linreg-depth", "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fit_rejects_bad_training_config(tmp_path):
    with pytest.raises(ValueError, match="iterationz"):
        _tiny_fit(tmp_path / "a", iterationz=3)
    with pytest.raises(ValueError, match="rmsprop"):
        _tiny_fit(tmp_path / "b", optimizer="rmsprop")
    with pytest.raises(ValueError, match="meta_batch_size"):
        _tiny_fit(tmp_path / "c", meta_batch_size=0)


def test_mean_ci95_matches_formula():
    vals = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    mean, ci = mg.metrics.mean_ci95(vals)
    assert mean == pytest.approx(3.5)
    assert ci == pytest.approx(1.96 * vals.std().item() / 2.0)


def test_outputs_respect_the_umask(tmp_path):
    from metagrad._io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_diverging_evaluation_is_reported_not_raised():
    """Evaluation with too large a rate diverges on some tasks: counted and left out of the means
    (issue 21: one diverged task of 500 must not make the whole summary null), with a warning."""
    torch.manual_seed(0)
    learner = mg.MetaLearner(linear_chain([1, 1]), mse, lr=5.0, metric_fn=mse, schedule=mg.Schedule(1, 30))
    fam = mg.LinearRegression1D(shots=5, queries=5)
    with pytest.warns(RuntimeWarning, match="evaluation tasks diverged"):
        out = train_mod.evaluate_tasks(learner, fam, 20, seed=0, batch=20)
    direct = learner.evaluate(fam.sample(20, generator=torch.Generator().manual_seed(0)))
    kept = torch.isfinite(direct["loss"][:, -1])
    diverged = int((~kept).sum())
    assert 0 < diverged < 20 and out["loss"]["diverged"] == diverged
    assert out["loss"]["mean"] == pytest.approx(direct["loss"][kept, -1].double().mean().item())
    assert out["loss"]["by_step"][-1] == pytest.approx(out["loss"]["mean"])
    assert out["loss"]["by_step"][0] == pytest.approx(direct["loss"][kept, 0].double().mean().item())
