"""Run folders that cannot be corrupted: the folder lock, partial runs, validation before writing,
safe stops on signals, workers that die with their parent, and orphan temporary files."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metagrad.cli import main
from metagrad.experiments import get_experiment, run

TINY = ["--set", "quick=true", "--set", "train.iterations=4", "--set", "train.checkpoint_every=2",
        "--set", "train.eval_every=2", "--set", "train.val_tasks=10", "--set", "train.eval_tasks=20",
        "--set", "train.meta_batch_size=4", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metagrad", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.1)


def _read(path: Path):
    return json.loads(path.read_text())


def _long(out: Path, *extra: str) -> subprocess.Popen:
    """A sinusoid run that trains until it is stopped."""
    return _cli("run", "sinusoid", "--out", str(out), "--set", "quick=true", "--set", "train.iterations=1000000",
                "--set", "train.eval_every=1000000", "--set", "train.val_tasks=10", "--set", "train.meta_batch_size=4",
                "--set", "train.checkpoint_every=1000000", "--no-progress", *extra)


# ----------------------------------------------------------------- 1. the run-folder lock
def test_a_second_command_on_a_busy_folder_fails_fast_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _long(out)
    try:
        _wait_for(out / "config.json", holder)
        for args in (["run", "sinusoid", "--out", str(out), *TINY], ["run", "sinusoid", "--out", str(out), "--resume",
                                                                    "--no-progress"],
                     ["eval", str(out)], ["merge", str(out), "--out", str(tmp_path / "merged")]):
            start = time.time()
            assert main(args) == 2, args
            err = capsys.readouterr().err
            assert f"pid {holder.pid} on host {socket.gethostname()}" in err and "in use" in err, err
            assert len(err.strip().splitlines()) == 1 and time.time() - start < 10
        assert not (tmp_path / "merged").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code = f"from metagrad._lock import hold; import time; h = hold({str(out)!r}); h.__enter__(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 2  # held: refused
        assert f"pid {proc.pid}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
    assert str(proc.pid) in (out / ".metagrad.lock").read_text()  # the dead holder's record is still there
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 0  # and the folder is free
    assert _read(out / "5-shot" / "summary.json")["iterations"] == 4


# ----------------------------------------------------------------- 2. a resumed run killed part-way is partial
def test_resume_to_more_iterations_stopped_part_way_leaves_a_partial_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 0
    assert (out / "summary.json").exists()

    def killed(variant, record):
        if record["iteration"] >= 6:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run(get_experiment("sinusoid"), out, ["train.iterations=10"], resume=True, progress=False, on_validate=killed)
    assert _read(out / "config.json")["train"]["iterations"] == 10
    # nothing says finished: neither the report nor the variant that trained on
    assert not (out / "summary.json").exists() and not (out / "5-shot" / "summary.json").exists()
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 2
    assert "has not finished" in capsys.readouterr().err and not (tmp_path / "merged").exists()
    assert main(["eval", str(out), "--tasks", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["5-shot"]["partial"] is True and result["5-shot"]["iteration"] == 6
    # resuming finishes it
    assert main(["run", "sinusoid", "--out", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    assert _read(out / "5-shot" / "summary.json")["iterations"] == 10 and (out / "summary.json").exists()
    assert main(["eval", str(out), "--tasks", "5"]) == 0
    assert "partial" not in json.loads(capsys.readouterr().out)["10-shot"]


# ----------------------------------------------------------------- 3. a config shorter than the checkpoint
def test_resuming_under_fewer_iterations_than_the_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    config = _read(out / "config.json")
    config["train"]["iterations"] = 2
    (out / "config.json").write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".metagrad.lock"}
    assert main(["run", "sinusoid", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot be shortened" in err and "meta-iteration 4" in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".metagrad.lock"}
    assert after == before  # nothing rewritten


# ----------------------------------------------------------------- 5. settings checked before writing
@pytest.mark.parametrize("bad", [["--set", "train.iterations=-1"], ["--set", "rule=nope"],
                                 ["--set", "train.meta_lr=0"], ["--variant", "nope"]])
def test_a_rejected_setting_leaves_nothing_behind(tmp_path, capsys, bad):
    out = tmp_path / "run"
    assert main(["run", "sinusoid", "--out", str(out), *TINY, *bad]) == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()


def test_a_truncated_data_zip_leaves_nothing_behind_and_the_corrected_command_works(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data" / "omniglot"
    data.mkdir(parents=True)
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        (data / name).write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a download cut short
    monkeypatch.setenv("METAGRAD_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    assert main(["run", "omniglot-maml", "--out", str(out), "--set", "quick=true", "--no-progress"]) == 2
    assert "zip" in capsys.readouterr().err
    assert not out.exists()
    # the corrected command (here: another setting) just works in the same folder
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 0


# ----------------------------------------------------------------- 7. orphan temporary files
def test_orphan_tmp_files_of_a_killed_write_are_removed_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "sinusoid", "--out", str(out), *TINY]) == 0
    orphans = [out / ".summary.json.abc123.tmp", out / "5-shot" / ".checkpoint.pt.xyz.tmp"]
    for p in orphans:
        p.write_bytes(b"half a file")
    keep = out / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    assert main(["run", "sinusoid", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert not any(p.exists() for p in orphans) and keep.exists()


def test_a_rejected_setting_of_a_multi_seed_run_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["run", "sinusoid", "--out", str(out), *TINY, "--set", "rule=nope", "--seeds", "0", "1"]) == 2
    assert "nope" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------- 6. SIGINT / SIGTERM stop at a safe point
def _checkpoint_iteration(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


@pytest.mark.parametrize("sig, jobs", [(signal.SIGINT, "1"), (signal.SIGTERM, "2")])
def test_a_signal_stops_at_a_safe_point_with_a_checkpoint_and_the_resume_command(tmp_path, sig, jobs):
    out = tmp_path / "run"
    proc = _long(out, "--jobs", jobs)
    try:
        for variant in (["5-shot"] if jobs == "1" else ["5-shot", "10-shot"]):
            _wait_for(out / variant / "metrics.jsonl", proc)
        time.sleep(0.5)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    command = f"metagrad run sinusoid --out {out} --resume"
    assert stderr.strip().endswith(command + (" --jobs 2" if jobs == "2" else "") + " --no-progress"), stderr
    names = ["5-shot"] if jobs == "1" else ["5-shot", "10-shot"]  # sequential: 10-shot has not started
    done = {name: _checkpoint_iteration(out / name / "checkpoint.pt") for name in names}
    assert min(done.values()) >= 1 and any(f"meta-iteration {d} (checkpoint written) in {out / n};" in stderr
                                           for n, d in done.items()), stderr
    assert not (out / "summary.json").exists() and not (out / "10-shot" / "checkpoint.pt").exists() or jobs == "2"
    done = max(done.values())
    # the checkpoint resumes (here: to a few iterations more, set in config.json)
    config = _read(out / "config.json")
    config["train"].update(iterations=done + 2, eval_tasks=10)
    (out / "config.json").write_text(json.dumps(config))
    assert main(["run", "sinusoid", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert _read(out / "5-shot" / "summary.json")["iterations"] == done + 2


# ----------------------------------------------------------------- 4. workers die with their parent
def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_of_a_jobs_run_kills_its_workers(tmp_path):
    out = tmp_path / "run"
    proc = _long(out, "--jobs", "2")
    try:
        for variant in ("5-shot", "10-shot"):
            _wait_for(out / variant / "metrics.jsonl", proc)
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()  # SIGKILL: no handler runs in the parent
        proc.wait()
        end = time.time() + 10
        while any(map(_alive, workers)) and time.time() < end:
            time.sleep(0.1)
        assert not any(map(_alive, workers))
    finally:
        proc.kill()
