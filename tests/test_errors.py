"""Errors a user can act on (issue 21): one line naming the file and what to do, exit code 2, no
traceback; diverged tasks counted beside finite means; batches that do not fit the model refused
by name before any torch error deep inside vmap."""
from __future__ import annotations

import errno
import io
import json
import os
import warnings
import zipfile

import pytest
import torch

from metagrad import MetaLearner
from metagrad.cli import main
from metagrad.metrics import mse
from metagrad.models import MLP
from metagrad.sweep import objective_value
from metagrad.tasks import TaskBatch
from metagrad.train import evaluate_tasks

TINY = ["--set", "quick=true", "--set", "shots=[5]", "--set", "train.iterations=2", "--set", "train.val_tasks=5",
        "--set", "train.eval_tasks=50", "--set", "train.eval_every=1", "--no-progress"]


def _error(capsys) -> str:
    """The stderr of a refused command: exactly one line, ``metagrad: error: ...``, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metagrad: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-iteration sinusoid run to damage in the tests (copied per test)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 0
    return out


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- 1. the CLI's file errors
def test_read_only_out_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr("metagrad._io.tempfile.mkstemp", refuse)
    out = tmp_path / "ro"
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 2
    line = _error(capsys)
    assert str(out) in line and ".tmp" not in line and "Permission denied" in line and "choose an --out" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_for_real(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["run", "sinusoid", "--out", str(ro / "run"), *TINY]) == 2
    finally:
        ro.chmod(0o755)
    assert str(ro) in _error(capsys)


def test_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("metagrad._io.os.fsync", full)  # every atomic write: config.json first
    out = tmp_path / "full"
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 2
    line = _error(capsys)
    assert str(out) in line and ".tmp" not in line and "No space left" in line and "disk is full" in line


def test_full_disk_at_the_checkpoint_names_it(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "full"
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 2
    line = _error(capsys)
    assert str(out / "5-shot" / "checkpoint.pt") in line and "disk is full" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_bad_checkpoint_is_one_line_naming_it(trained, tmp_path, capsys, damage):
    run = _copy(trained, tmp_path)
    ckpt = run / "5-shot" / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all\n")
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", "5"]) == 2
    line = _error(capsys)
    assert str(ckpt) in line and ("delete it" in line or "remove it" in line)
    assert main(["run", "sinusoid", "--out", str(run), "--resume", "--set", "train.iterations=3",
                 "--no-progress"]) == 2
    assert str(ckpt) in _error(capsys)


@pytest.mark.parametrize("text", ["{\"experiment\": \"sinus", "", "[1, 2]"])
def test_malformed_config_json_is_one_line_naming_it(trained, tmp_path, capsys, text):
    run = _copy(trained, tmp_path)
    (run / "config.json").write_text(text)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    line = _error(capsys)
    assert str(run / "config.json") in line


def test_malformed_config_json_on_resume(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    (run / "config.json").write_text("{\"experiment\": ")
    capsys.readouterr()
    assert main(["run", "sinusoid", "--out", str(run), "--resume", "--no-progress"]) == 2
    line = _error(capsys)
    assert str(run / "config.json") in line and "not valid JSON" in line


def _png(size=105) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (size, size), 1).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_omniglot_member_is_one_line(tmp_path, capsys):
    folder = tmp_path / "data" / "omniglot"
    folder.mkdir(parents=True)
    for split in ("small1", "small2"):
        with zipfile.ZipFile(folder / f"images_background_{split}.zip", "w") as zf:
            for c in range(6):
                for d in range(2):
                    member = f"images_background_{split}/Alpha/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png"
                    zf.writestr(member, b"\x89PNG not really" if (split, c, d) == ("small1", 3, 1) else _png())
    argv = ["run", "omniglot-maml", "--out", str(tmp_path / "run"), "--set", "quick=true", "--set",
            f"data_root={tmp_path / 'data'}", "--set", f"cache_dir={tmp_path / 'cache'}", "--no-progress"]
    assert main(argv) == 2
    line = _error(capsys)
    assert "images_background_small1.zip" in line and "0003_02.png" in line


def test_out_naming_an_existing_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["run", "sinusoid", "--out", str(target), *TINY]) == 2
    line = _error(capsys)
    assert str(target) in line and "not a folder" in line and target.read_text() == "keep me"


def test_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # before the fix, "" meant the current folder
    assert main(["run", "sinusoid", "--out", "", *TINY]) == 2
    assert "--out must name a folder" in _error(capsys)
    assert list(tmp_path.iterdir()) == []
    assert main(["eval", ""]) == 2
    _error(capsys)


@pytest.mark.parametrize("device", ["meta", "cuda:7" if not torch.cuda.is_available() else "cuda:99", "nonsense"])
def test_unusable_device(tmp_path, capsys, device):
    assert main(["run", "sinusoid", "--out", str(tmp_path / "run"), "--device", device, *TINY]) == 2
    assert f"--device {device!r}" in _error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, shown", [("train.iterations=1e30", "1e+30"), ("train.iterations=2.5", "2.5"),
                                             ("train.eval_tasks=1e13", "10000000000000"), ("inner_lr=nan", "nan"),
                                             ("inner_lr=Infinity", "inf"), ("train.meta_lr=-Infinity", "-inf")])
def test_absurd_values_are_refused(tmp_path, capsys, override, shown):
    key = override.split("=")[0]
    assert main(["run", "sinusoid", "--out", str(tmp_path / "run"), *TINY, "--set", override]) == 2
    line = _error(capsys)
    assert key in line and shown in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 2. divergence
class _Family:
    def sample(self, n, *, generator):
        x = torch.randn(n, 3, 1, generator=generator)
        return TaskBatch(x, x, x, x)


class _HalfDiverges:
    """A stand-in learner whose every 4th task diverges after the first inner step."""

    def evaluate(self, batch, steps=None):
        n = batch.num_tasks
        loss = torch.ones(n, 3)
        loss[::4, 1:] = float("inf")
        loss[1::4, 2] = 3.0
        return {"loss": loss}


def test_evaluate_tasks_excludes_diverged_tasks_and_counts_them():
    with pytest.warns(RuntimeWarning, match=r"sinusoid:5-shot: 3 of 10 evaluation tasks diverged"):
        res = evaluate_tasks(_HalfDiverges(), _Family(), 10, seed=0, batch=4, group=None, name="sinusoid:5-shot")
    loss = res["loss"]
    assert loss["diverged"] == 3 and res["tasks"] == 10
    # the 7 other tasks: 1.0 each, except tasks 1, 5, 9 with 3.0 after the last step
    assert loss["mean"] == pytest.approx((4 * 1.0 + 3 * 3.0) / 7)
    assert loss["by_step"] == pytest.approx([1.0, 1.0, (4 * 1.0 + 3 * 3.0) / 7])

    class Fine:
        def evaluate(self, batch, steps=None):
            return {"loss": torch.ones(batch.num_tasks, 3)}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing diverged: no warning
        assert evaluate_tasks(Fine(), _Family(), 10, seed=0, group=None)["loss"]["diverged"] == 0


def test_all_diverged_reports_null_means_and_the_count():
    class AllDiverge:
        def evaluate(self, batch, steps=None):
            return {"loss": torch.full((batch.num_tasks, 2), float("nan"))}

    with pytest.warns(RuntimeWarning, match=r"6 of 6"):
        res = evaluate_tasks(AllDiverge(), _Family(), 6, seed=0, group=None)
    assert res["loss"]["mean"] is None and res["loss"]["diverged"] == 6 and res["loss"]["by_step"] == [None, None]


def test_report_means_over_tasks_leave_out_diverged_ones():
    """The A-MAML reports (amaml-regression, amaml-cf) average per-task curves with this."""
    from metagrad.experiments._report import finite_columns

    values = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [float("inf"), 4.0], [5.0, 6.0]])
    with pytest.warns(RuntimeWarning, match=r"amaml-regression:x: 1 of 4 test tasks diverged"):
        stats = finite_columns(values, "amaml-regression:x")
    assert stats["diverged"] == 1 and stats["kept"].tolist() == [True, False, True, True]
    assert stats["mean"] == pytest.approx([3.0, 4.0])  # column 0 of the kept: 1, 5 (inf left out); column 1: 2, 4, 6
    assert stats["std"][1] == pytest.approx(2.0)
    with pytest.warns(RuntimeWarning, match="1 of 4"):
        assert finite_columns(values, "x", column=0)["mean"] == pytest.approx([3.0, 4.0])
    with pytest.warns(RuntimeWarning):
        assert finite_columns(torch.full((3, 2), float("nan")), "x")["mean"] == [None, None]


def test_sinusoid_large_inner_lr_reports_finite_mean_count_and_warning(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "sinusoid", "--out", str(out), *TINY, "--set", "inner_lr=3"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)["5-shot"]
    assert 0 < summary["diverged_tasks"] < summary["eval_tasks"]
    assert summary["post_adapt_mse"] is not None and summary["post_adapt_mse_ci95"] is not None
    assert all(v is not None for v in summary["mse_by_step"])
    warned = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith("metagrad: warning: sinusoid:5-shot: ")
    assert f"{summary['diverged_tasks']} of {summary['eval_tasks']}" in warned[0]
    # a sweep still counts a value with diverged tasks beside it as diverged (the worst)
    full = json.loads((out / "summary.json").read_text())
    assert objective_value(full, "5-shot.post_adapt_mse") is None


def test_training_divergence_names_variant_and_meta_iteration(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "sinusoid", "--out", str(out), *TINY, "--set", "inner_lr=3", "--set", "train_steps=5"]) == 2
    line = _error(capsys)
    assert "sinusoid:5-shot: meta-iteration 1: non-finite inner loss" in line and "task" in line


# --------------------------------------------------------------------------- 3. the API
def _learner():
    torch.manual_seed(0)
    return MetaLearner(MLP(1, [8], 1), mse)


def _batch(features=1, dtype=torch.float32, target=None):
    x = torch.randn(2, 5, features, dtype=dtype)
    y = torch.randn(2, 5, 1, dtype=dtype) if target is None else target
    return TaskBatch(x, y, x, y)


@pytest.mark.parametrize("steps", [-2, 1.5, True, "3"])
def test_bad_steps_are_refused(steps):
    learner = _learner()
    with pytest.raises(ValueError, match=f"steps must be a non-negative integer, got {steps!r}"):
        learner.evaluate(_batch(), steps=steps)
    with pytest.raises(ValueError, match=f"steps must be a non-negative integer, got {steps!r}"):
        learner.adapt(torch.randn(5, 1), torch.randn(5, 1), steps=steps)


def test_wrong_feature_count_names_tensor_and_layer():
    with pytest.raises(ValueError, match=r"support_x of shape \[2, 5, 3\].*takes 1 input features"):
        _learner().evaluate(_batch(features=3))
    with pytest.raises(ValueError, match=r"support_x of shape \[1, 5, 3\]"):
        _learner().adapt(torch.randn(5, 3), torch.randn(5, 1))


def test_float64_batch_for_float32_model():
    with pytest.raises(ValueError, match=r"support_x of shape \[2, 5, 1\] \(torch.float64.*torch.float32 parameters"):
        _learner().evaluate(_batch(dtype=torch.float64))
    learner = _learner()
    with pytest.raises(ValueError, match=r"torch.float64"):
        learner.meta_step(_batch(dtype=torch.float64), torch.optim.SGD(learner.parameters(), lr=0.1))


def test_integer_targets_for_mse():
    with pytest.raises(ValueError, match=r"support_y of shape \[2, 5, 1\] \(torch.int64.*floating point"):
        _learner().evaluate(_batch(target=torch.randint(0, 3, (2, 5, 1))))


def test_targets_that_would_broadcast():
    with pytest.raises(ValueError, match=r"support_y of shape \[2, 5\].*\[5, 1\].*broadcast to \[5, 5\]"):
        _learner().evaluate(_batch(target=torch.randn(2, 5)))


def test_a_fitting_batch_still_evaluates():
    out = _learner().evaluate(_batch(), steps=2)
    assert out["loss"].shape == (2, 3) and torch.isfinite(out["loss"]).all()


def test_reports_give_the_diverged_count_beside_the_mean(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "linreg-depth", "--out", str(out), "--set", "quick=true", "--set", "train.iterations=2",
                 "--set", "train.val_tasks=5", "--set", "train.eval_tasks=20", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for variant in ("shallow", "deep"):
        assert summary[variant]["diverged_tasks"] == 0 and summary[variant]["post_adapt_mse"] is not None
