"""Arnold et al. (2021) vision experiments: tiny runs on generated Omniglot zips, the paper's tables
against the paper text, and adapted models of the base CNN's size."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metagrad.experiments import get_experiment, merge_runs, run
from metagrad.experiments import arnold_learners as al
from metagrad.experiments import arnold_paper as ap
from metagrad.models import CNN

PAPER = Path(__file__).resolve().parents[2] / "shared" / "papers" / "when-maml-can-adapt-fast.txt"
NAMES = ("arnold-table1", "arnold-table2", "arnold-table3", "arnold-depth")


def _png(bits: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(bits).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_zip(path: Path, top: str, characters: int, drawers: int, seed: int) -> None:
    """An Omniglot-layout zip: ``top/<Alphabet>/characterNN/<id>_<drawer>.png`` 1-bit images. Each
    character is a random template with a little per-drawer noise, so tasks are learnable."""
    rng = np.random.RandomState(seed)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/", b"")
        for c in range(characters):
            template = rng.rand(28, 28) > 0.5
            for d in range(drawers):
                img = template ^ (rng.rand(28, 28) > 0.9)
                zf.writestr(f"{top}/Alpha{c % 2}/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png", _png(img))


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "omniglot").mkdir()
    # 6 characters x 10 drawers: >= ways classes with >= shots + queries drawings each
    _omniglot_zip(root / "omniglot" / "images_background_small1.zip", "images_background_small1", 6, 10, 0)
    _omniglot_zip(root / "omniglot" / "images_background_small2.zip", "images_background_small2", 6, 10, 1)
    return root


TINY = ["quick=true", "channels=4", "shots=2", "queries=2", "test_queries=3", "linnet_widths=[8,4]",
        "train.iterations=2", "train.meta_batch_size=2", "train.eval_every=2", "train.val_tasks=4",
        "train.eval_tasks=8", "train.eval_batch=8", "train.checkpoint_every=2"]


@pytest.mark.parametrize("name", NAMES)
def test_tiny_run_writes_table_summary_and_png(tmp_path, omniglot_root, name):
    exp = get_experiment(name)
    extra = {"arnold-table1": ['architectures=[2,3]'], "arnold-depth": ['architectures=[2,3]'],
             "arnold-table3": ['methods=["maml","maml-tnets","anil-mc"]']}.get(name, [])
    out = tmp_path / "run"
    sets = TINY + [f"data_root={omniglot_root}", f"cache_dir={tmp_path / 'cache'}", *extra]
    summary = run(exp, out, sets, progress=False)
    assert summary["splits"] == {"train": "small1", "test": "small2"}
    assert json.loads((out / "summary.json").read_text()) == summary
    table = (out / "table.md").read_text()
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    specs = exp.variant_specs(config)
    assert set(summary["variants"]) == set(specs)
    for vname, row in summary["variants"].items():
        assert (out / vname / "checkpoint.pt").exists()
        assert 0.0 <= row["accuracy"] <= 100.0 and row["test_tasks"] == 8
        assert row["label"] in table
        paper_a, paper_m = ap.paper_rates("omniglot", row["method"])
        assert row["paper_rates"] == [paper_a, paper_m]
    for c in summary["comparisons"]:
        assert c["agrees"] in ("yes", "yes*", "no", "no (within CI)", "n/a")
    if name == "arnold-table2":  # quick's documented override is shown beside the paper's rate
        assert summary["variants"]["anil-linnet-cnn2"]["meta_lr"] == 0.001
        assert "0.001 (paper 0.003)" in table
        assert "| ANIL | 2 | 0.5 | 0.001 |" in table and "91.00 (Table 2)" in table
    if name == "arnold-depth":
        assert set(summary["kfo_gain_by_depth"]) == {"2", "3"}
        assert "Fig. 4" in table


def _paper_line(label: str, first: str = "") -> list[float]:
    """Numbers after ``label`` on the paper-text line that starts with ``label + first``."""
    for line in PAPER.read_text().splitlines():
        if line.startswith(label + first):
            return [float(t.strip("$")) for t in line[len(label):].split() if t.strip("$").replace(".", "").isdigit()]
    raise AssertionError(f"no line starting with {label + first!r} in {PAPER}")


@pytest.mark.skipif(not PAPER.exists(), reason="paper text not present")
def test_paper_tables_match_paper_text():
    # Table D.6 rows, in the paper's column order
    cols = ["maml", "maml-linnet", "maml-msgd", "maml-mc", "maml-kfo", "anil", "anil-linnet", "anil-msgd",
            "anil-mc", "anil-kfo"]
    for ds, label in (("omniglot", "Omniglot\t"), ("cifar-fs", "CIFAR-FS\t")):
        nums = _paper_line(label, "0.0")
        assert [ap.ADAPTATION_LR[ds][c] for c in cols] == nums
    assert [ap.ADAPTATION_LR["mini-imagenet"][c] for c in cols] == _paper_line("$\\min$ -ImageNet\t")
    # Table B.4 and Table 2 rows
    b4 = ["anil", "anil-msgd", "anil-mc", "anil-kfo"]
    assert [ap.PAPER_TABLE_B4["mini-imagenet"][c] for c in b4] == _paper_line("${\\rm mini\\text{-}ImageNet}$\t")
    assert [ap.PAPER_TABLE2["cifar-fs"][c] for c in ("anil", "anil-linnet")] == [66.10, 67.55]
    text = PAPER.read_text()
    assert "CIFAR-FS\t66.10\t67.55" in text and "Omniglot\t91.00\t92.47\t92.67\t94.40" in text
    # Table 3: the columns MAML / MSGD / T-Nets / KFO (dataset order Omniglot, CIFAR-FS, mini-ImageNet)
    assert "66.6 62.2 52.6\t74.07 62.82 <b>59.90</b>\t68.37\t92.27 66.42 58.47\t96.62 69.64 59.08" in text
    t3 = ap.PAPER_TABLE3
    assert [t3[d]["maml-kfo"] for d in ap.DATASETS] == [96.62, 69.64, 59.08]
    assert [t3[d]["maml-tnets"] for d in ap.DATASETS] == [92.27, 66.42, 58.47]
    # Table D.7: the first three columns (Omniglot, CIFAR-FS, mini-ImageNet) and ANIL's
    assert "0.003 $0.003$ $0.0005$\t0.003 0.003 0.0005\t$0.0005 \\\\ 0.001 \\\\ 0.001$" in text
    assert [ap.META_LR[d]["maml"] for d in ap.DATASETS] == [0.003, 0.003, 0.0005]
    assert [ap.META_LR[d]["maml-msgd"] for d in ap.DATASETS] == [0.0005, 0.001, 0.001]
    assert [ap.META_LR[d]["anil"] for d in ap.DATASETS] == [0.001, 0.002, 0.001]
    # Table 1: CIFAR-FS MAML CNN(2) equals Table 3's MAML on CNN(2) (the same setting)
    assert ap.PAPER_TABLE1["cifar-fs"]["maml"][2] == t3["cifar-fs"]["maml"]
    assert "62.2\t68.9\t70.9\t71.3\t66.1\t71.1\t98.1 74.4 64.9\t71.9" in text


def test_rates_lookup_fills_lost_cells_and_overrides():
    assert ap.paper_rates("cifar-fs", "maml-kfo") == (0.1, 0.003)  # lost D.7 cell: column's number
    assert ap.paper_rates("mini-imagenet", "anil-kfo") == (0.1, 0.001)
    assert ap.paper_rates("omniglot", "maml-tnets") == ap.paper_rates("omniglot", "maml")
    exp = get_experiment("arnold-table3")
    cfg = exp.resolve(["meta_lr.maml-mc=0.01", "dataset=cifar-fs"])
    assert ap.rates(cfg, "maml-mc") == (0.7, 0.01) and ap.rates(cfg, "maml") == (0.07, 0.003)
    assert ap.paper_accuracy("omniglot", "maml", 2, ("Table 1",)) == (66.6, "Table 3")
    with pytest.raises(ValueError, match="anil-tnets"):
        exp.variant_specs(exp.resolve(['methods=["anil-tnets"]']))
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        exp.variant_specs(exp.resolve(["dataset=svhn"]))


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dataset", ["omniglot", "cifar-fs"])
def test_adapted_models_have_base_cnn_size_and_function(dataset):
    torch.manual_seed(0)
    for name in NAMES:
        exp = get_experiment(name)
        cfg = exp.resolve([f"dataset={dataset}", "channels=8", 'methods=' + json.dumps(list(exp.methods))])
        for vname, (method, k) in exp.variant_specs(cfg).items():
            learner, _ = al.build_learner(method, k, cfg)
            model = learner.model.double()
            with torch.no_grad():  # move T-Net transforms off the identity, so absorbing is not trivial
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            plain = al.adapted_model(model)
            shape = (1, 28, 28) if dataset == "omniglot" else (3, 32, 32)
            reference = CNN(k, 5, channels=8, in_channels=shape[0], image_size=shape[1])  # counted independently
            assert type(plain) is CNN, vname
            assert _count(plain) == _count(reference), vname
            assert [n for n, _ in plain.named_parameters()] == [n for n, _ in reference.named_parameters()]
            x = torch.rand(6, *shape, dtype=torch.float64)
            torch.testing.assert_close(plain(x), model(x), rtol=1e-9, atol=1e-9, msg=vname)
            # ANIL adapts the head (with LinNet: the whole linear chain); MAML everything but T-Net transforms
            adapted = set(learner.adapted_names)
            if method.startswith("anil"):
                assert all(n.startswith(("head.", "base.head.", "linear.")) for n in adapted), vname
            else:
                assert not any(n.endswith("transform") for n in adapted) and len(adapted) >= 2 * k + 2


def test_init_option_reaches_every_cnn_of_the_experiments():
    exp = get_experiment("arnold-table3")
    cfg = exp.resolve(["channels=8", "init=xavier", 'methods=' + json.dumps(list(exp.methods))])
    for method, k in exp.variant_specs(cfg).values():
        learner, _ = al.build_learner(method, k, cfg)
        convs = [m for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all((m.bias == 0).all() for m in convs), method  # PyTorch's init has nonzero biases
    assert (al.base_cnn(2, cfg).features[0].bias == 0).all()



def test_learn2learn_cnn_options_reach_every_cnn_and_old_configs_keep_ours():
    exp = get_experiment("arnold-table3")
    methods = 'methods=' + json.dumps(list(exp.methods))
    cfg = exp.resolve(["channels=8", "downsample=stride", "pool=mean", "init=l2l", methods])
    for method, k in exp.variant_specs(cfg).values():
        learner, _ = al.build_learner(method, k, cfg)
        cnns = [m for m in learner.model.modules() if isinstance(m, CNN)]
        assert len(cnns) == 1 and cnns[0].pool == "mean" and cnns[0].downsample == "stride", method
        assert cnns[0].feature_dim == 8 and not any(isinstance(m, torch.nn.MaxPool2d) for m in learner.model.modules())
        x = torch.randn(10, 1, 28, 28)
        assert learner.model(x).shape == (10, 5)
    base = al.base_cnn(2, cfg)
    assert base.feature_dim == 8 and base.pool == "mean"
    # a config without the keys (runs stored before them) builds our network and merges with the default
    default = exp.resolve(["channels=8", methods])
    assert (default["downsample"], default["pool"]) == ("maxpool", "flatten")
    old = {k: v for k, v in default.items() if k not in ("downsample", "pool")}
    assert al.base_cnn(2, old).feature_dim == 8 * 7 * 7
    assert exp.variant_config(old, "maml-cnn2") == exp.variant_config(default, "maml-cnn2")
    assert exp.variant_config(cfg, "maml-cnn2")["pool"] == "mean"


def test_variants_shared_between_experiments_merge_into_another_experiments_run(tmp_path, omniglot_root):
    # MAML and Meta-KFO on CNN(2) trained for Table 3 complete a Fig. 4 run trained on CNN(3) only:
    # the merged report equals that of one arnold-depth run of all four variants
    sets = TINY + [f"data_root={omniglot_root}", f"cache_dir={tmp_path / 'cache'}", "architectures=[2,3]"]
    depth = get_experiment("arnold-depth")
    full = run(depth, tmp_path / "full", sets, progress=False)
    t3_sets = TINY + [f"data_root={omniglot_root}", f"cache_dir={tmp_path / 'cache'}",
                      'methods=["maml","maml-kfo","anil"]']
    run(get_experiment("arnold-table3"), tmp_path / "t3", t3_sets, progress=False)
    run(depth, tmp_path / "deep", sets, progress=False, variants=["maml-cnn3", "maml-kfo-cnn3"])
    merged = merge_runs(depth, tmp_path / "merged", [tmp_path / "deep", tmp_path / "t3"])
    assert set(merged["variants"]) == set(full["variants"])
    for name, row in full["variants"].items():  # same seeds, same model, whichever experiment trained it
        assert merged["variants"][name]["accuracy"] == pytest.approx(row["accuracy"], rel=1e-6)
    assert merged["kfo_gain_by_depth"]["2"]["gain"] == pytest.approx(full["kfo_gain_by_depth"]["2"]["gain"],
                                                                     rel=1e-6, abs=1e-9)
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == \
        json.loads((tmp_path / "full" / "config.json").read_text())
    assert not (tmp_path / "merged" / "anil-cnn2").exists()  # Table 3's other variants stay out
    # a variant trained at other rates is refused, and nothing is written
    run(get_experiment("arnold-table3"), tmp_path / "t3-lr", t3_sets + ["adapt_lr.maml=0.1"], progress=False,
        variants=["maml-cnn2"])
    with pytest.raises(ValueError, match="'rates' differs"):
        merge_runs(depth, tmp_path / "m2", [tmp_path / "deep", tmp_path / "t3-lr"])
    with pytest.raises(ValueError, match="holds a 'arnold-depth' run"):  # another experiment's runs alone
        merge_runs(depth, tmp_path / "m3", [tmp_path / "t3"])
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_tiny_run_on_cifar_fs_reads_the_cifar100_tarball_and_reports_its_paper_numbers(tmp_path):
    from test_data_readers import make_cifar100_tarball  # the generated CIFAR-100 fixture of the reader tests

    (tmp_path / "data" / "cifar100").mkdir(parents=True)
    make_cifar100_tarball(tmp_path / "data" / "cifar100" / "cifar-100-python.tar.gz", per_class_train=4,
                          per_class_test=2)
    out = tmp_path / "run"
    sets = TINY + [f"data_root={tmp_path / 'data'}", f"cache_dir={tmp_path / 'cache'}", "dataset=cifar-fs"]
    summary = run(get_experiment("arnold-table2"), out, sets, progress=False)
    assert summary["dataset"] == "cifar-fs" and summary["splits"] == {"train": "train", "test": "test"}
    for name, paper in (("anil-cnn2", 66.10), ("anil-linnet-cnn2", 67.55)):  # Table 2's CIFAR-FS column
        row = summary["variants"][name]
        assert row["paper_accuracy"] == paper and 0.0 <= row["accuracy"] <= 100.0 and row["test_tasks"] == 8
        assert row["paper_rates"] == list(ap.paper_rates("cifar-fs", row["method"]))
    assert "66.10 (Table 2)" in (out / "table.md").read_text()
