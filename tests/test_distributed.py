"""Data-parallel meta-training (metagrad.distributed) against single-process runs.

Two launches of 2 CPU processes (gloo) by ``torchrun`` on a free 127.0.0.1 port: this file as a
worker script (meta-gradients and meta-steps of every method, fit killed and resumed with another
number of processes, configs that differ between ranks, errors on one rank) and the command line
``torchrun -m metagrad run sinusoid``. Every result is compared with the same computation in one
process, here. float64 throughout the library checks, so "equal" means equal to float rounding.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg
from metagrad import cli, distributed, experiments, train
from metagrad.models import MLP

TASKS = 5  # an odd meta-batch: 3 + 2 tasks over 2 ranks
STEPS = 3  # meta-steps compared after the meta-gradient


def _methods() -> dict:
    """Meta-gradient, rule (with learned state where the method allows one) and whether the
    meta-gradient reaches the rule's state, for every method compared."""
    return {
        "unrolled": (mg.Unrolled(), "meta-sgd", True),
        "first-order": (mg.FirstOrder(), "meta-sgd", True),
        "checkpointed": (mg.Checkpointed(), "meta-sgd", True),
        "implicit": (mg.Implicit(lam=2.0, cg_steps=3), "meta-sgd", False),  # rates step the inner loop only
        "reptile": (mg.Reptile(), "sgd", False),
        "adjoint-euler": (mg.Adjoint(T=0.04, h=0.01, forward="euler"), "sgd", False),  # plain SGD only
        "adjoint": (mg.Adjoint(T=0.04, h=0.01), "sgd", False),  # dopri5: a rank's tasks share its step sizes
    }


def _learner(method: str) -> mg.MetaLearner:
    meta_gradient, rule, _ = _methods()[method]
    torch.manual_seed(0)
    return mg.MetaLearner(MLP(1, [16], 1).double(), F.mse_loss, rule=rule, lr=0.05, meta_gradient=meta_gradient,
                          schedule=mg.Schedule(2, 2))


FAMILY = mg.Sinusoid(shots=5, queries=5, dtype=torch.float64)
FIT_CFG = {"iterations": 4, "meta_batch_size": TASKS, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
           "val_tasks": TASKS, "eval_tasks": 7, "eval_batch": 3, "meta_lr": 1e-2, "seed": 3}


class _Stop(Exception):
    """Raised by on_validate to stop a run after its checkpoint, as a kill would."""


def _stop_at_2(record: dict) -> None:
    if record["iteration"] == 2:
        raise _Stop("stopped at iteration 2")


def _meta_run(method: str, group):
    """The meta-gradient of one batch, then STEPS Adam meta-steps; each rank on its share."""
    learner = _learner(method)
    gen = torch.Generator().manual_seed(1)
    grads, stats = learner.meta_gradient_of(distributed.shard(FAMILY.sample(TASKS, generator=gen), group), group=group)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(STEPS):
        last = learner.meta_step(distributed.shard(FAMILY.sample(TASKS, generator=gen), group), opt, group=group)
    return {"grads": grads, "stats": stats, "params": learner.state_dict(), "last": last}


def _fit(run_dir, group, **kwargs):
    return train.fit(_learner("unrolled"), FAMILY, FAMILY, {**FIT_CFG, **kwargs.pop("cfg", {})}, run_dir,
                     progress=False, group=group, **kwargs)


def _error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def _worker(out: Path) -> None:
    """One rank of the torchrun launch (``python tests/test_distributed.py OUT``)."""
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    group = distributed.resolve()
    rank = distributed.rank(group)
    result: dict = {"methods": {m: _meta_run(m, group) for m in _methods()}}
    # a run stopped after its checkpoint at iteration 2; rank 1 gets a folder it must not create
    stopped = out / "stopped-2" if rank == 0 else out / "rank1-writes-nothing"
    try:
        _fit(stopped, group, on_validate=_stop_at_2)
    except _Stop:
        pass
    result["resumed-2"] = _fit(out / "stopped-1" if rank == 0 else out / "rank1-writes-nothing", group, resume=True)
    result["fit-differs"] = _error(lambda: _fit(out / "differs", group, cfg={"iterations": 4 + rank}))
    result["fit-invalid"] = _error(lambda: _fit(out / "differs", group, cfg={"iterations": 4 - 5 * rank}))
    sinusoid = experiments.get_experiment("sinusoid")
    result["run-differs"] = _error(lambda: experiments.run(sinusoid, out / "run-differs",
                                                           [f"train.iterations={3 + rank}"], progress=False))
    result["run-jobs"] = _error(lambda: experiments.run(sinusoid, out / "run-jobs", [], jobs=2, progress=False))
    batch = FAMILY.sample(TASKS, generator=torch.Generator().manual_seed(1))
    batch.support_y[4] = float("nan")  # the last task: rank 1's
    result["nan"] = _error(lambda: _learner("unrolled").meta_gradient_of(distributed.shard(batch, group)))
    broken = distributed.shard(batch, group)
    if rank == 1:  # a bad batch on one rank only
        broken = mg.TaskBatch(broken.support_x, broken.support_y, broken.query_x[:1], broken.query_y[:1])
    result["broken"] = _error(lambda: _learner("unrolled").meta_gradient_of(broken))
    torch.save(result, out / f"rank{rank}.pt")
    distributed.shutdown()


# ---------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Both ranks' results; before the launch, a one-process run stopped at iteration 2 that the
    two ranks resume."""
    out = tmp_path_factory.mktemp("ddp")
    with pytest.raises(_Stop):
        _fit(out / "stopped-1", None, on_validate=_stop_at_2)
    _torchrun(__file__, str(out))
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close(a, b, rtol=1e-9, atol=1e-12) -> None:
    flat_a, _ = torch.utils._pytree.tree_flatten(a)
    flat_b, _ = torch.utils._pytree.tree_flatten(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
        elif isinstance(x, float):
            assert x == pytest.approx(y, rel=rtol, abs=atol)
        else:
            assert x == y


@pytest.mark.parametrize("method", list(_methods()))
def test_meta_gradient_and_meta_steps_equal_one_process(launched, method):
    _, ranks = launched
    ref = _meta_run(method, None)
    # dopri5's adaptive steps are shared by the tasks of one stacked solve (a rank's share of the
    # meta-batch here, all of it in one process): agreement to its tolerance (1e-7 / 1e-9 in float64)
    tol = {"rtol": 1e-5, "atol": 1e-6} if method == "adjoint" else {"rtol": 1e-9, "atol": 1e-9}
    for res in ranks:
        got = res["methods"][method]
        _close(got["grads"], ref["grads"], **tol)
        assert got["stats"]["query_loss"].shape == (TASKS,) and got["stats"]["inner_loss"].shape[0] == TASKS
        _close(got["stats"], ref["stats"], **tol)
        _close(got["params"], ref["params"], **tol)
        _close(got["last"], ref["last"], **tol)
    if _methods()[method][2]:  # the learned rates are meta-trained too
        assert ref["grads"]["rule"] and any(g.abs().max() > 0 for g in ref["grads"]["rule"].values())
    params = [res["methods"][method]["params"] for res in ranks]
    for k in params[0]:  # the ranks hold the same parameters, bitwise
        assert torch.equal(params[0][k], params[1][k]), k


def _finished(run_dir: Path) -> dict:
    ckpt = train.load_checkpoint(run_dir / train.CHECKPOINT)
    return {"learner": ckpt["learner"], "metrics": ckpt["metrics"],
            "jsonl": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "summary": json.loads((run_dir / "summary.json").read_text()), "iteration": ckpt["iteration"]}


def test_run_stopped_with_one_number_of_processes_resumes_with_another(launched, tmp_path):
    out, ranks = launched
    whole = _fit(tmp_path / "whole", None)
    ref = _finished(tmp_path / "whole")
    assert ref["iteration"] == FIT_CFG["iterations"] and ref["jsonl"] == ref["metrics"]
    # two ranks stopped it at 2, one process resumes; one process stopped it, two ranks resumed
    assert train.load_checkpoint(out / "stopped-2" / train.CHECKPOINT)["iteration"] == 2
    resumed_here = _fit(out / "stopped-2", None, resume=True)
    for run_dir, summary in ((out / "stopped-2", resumed_here), (out / "stopped-1", ranks[0]["resumed-2"])):
        got = _finished(run_dir)
        assert [sorted(r) for r in got["metrics"]] == [sorted(r) for r in ref["metrics"]]
        _close(got, ref)
        _close(summary, whole)
    _close(ranks[1]["resumed-2"], whole)  # every rank returns the summary
    assert not (out / "rank1-writes-nothing").exists()
    assert sorted(p.name for p in (out / "stopped-2").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


def test_a_rank_with_another_config_fails_fast_on_every_rank(launched):
    out, ranks = launched
    for res in ranks:
        assert res["fit-differs"] == ranks[0]["fit-differs"]
        assert "training config differs between the 2 processes" in res["fit-differs"]
        assert "rank 1: iterations=5 where rank 0 has 4" in res["fit-differs"]
        assert ("rank 1: invalid='ValueError: iterations must be a positive integer, got -1' where rank 0 has "
                "<missing>") in res["fit-invalid"]  # one rank's bad config: every rank fails, none waits
        assert "rank 1: config.train.iterations=4 where rank 0 has 3" in res["run-differs"]
        assert "jobs=2 cannot be combined with a data-parallel run over 2 processes" in res["run-jobs"]
    assert not (out / "differs").exists() and not (out / "run-differs").exists()


def test_an_error_on_one_rank_is_raised_on_every_rank(launched):
    _, ranks = launched
    batch = FAMILY.sample(TASKS, generator=torch.Generator().manual_seed(1))
    batch.support_y[4] = float("nan")
    single = _error(lambda: _learner("unrolled").meta_gradient_of(batch))
    assert "task 4" in single
    for res in ranks:
        assert res["nan"] == single  # the global task index, as in one process
        assert res["broken"] == "rank 1 (its tasks start at task 3 of the meta-batch): support has 2 tasks but query has 1"


def test_cli_under_torchrun_writes_the_single_process_run(tmp_path):
    args = ["run", "sinusoid", "--set", "quick=true", "--set", "train.iterations=4", "--set", "train.log_every=2",
            "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "train.val_tasks=9",
            "--set", "train.eval_tasks=11", "--set", "train.eval_batch=5", "--set", "train.meta_batch_size=7",
            "--set", "test_steps=3", "--no-progress"]
    proc = _torchrun("-m", "metagrad", *args, "--out", str(tmp_path / "two"))
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert json.loads(proc.stdout) == two  # printed once, by rank 0
    _close(two, one, rtol=1e-4, atol=1e-6)  # float32: the ranks' sums round differently
    files = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*"))
    assert sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*")) == files
    for variant in ("5-shot", "10-shot"):
        _close(_finished(tmp_path / "two" / variant), _finished(tmp_path / "one" / variant), rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
