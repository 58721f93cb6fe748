"""Reader tests on tiny fixtures generated in each dataset's exact on-disk format."""

import gzip
import io
import os
import pickle
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from metagrad.data import CIFARFS, MNIST, CorruptFileError, DownloadError, MiniImageNet, Omniglot
from metagrad.data import omniglot as omniglot_mod
from metagrad.data.cifar import cifar_fs_classes

# ----------------------------------------------------------------------------- Omniglot


def _png(bits: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(bits).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_omniglot_zip(path, top, alphabets, drawers=2, seed=0, size=105):
    """Write an Omniglot-layout zip; return {(alphabet, character): [bool arrays]}."""
    rng = np.random.RandomState(seed)
    content = {}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/", b"")
        for alpha, nchars in alphabets.items():
            for c in range(nchars):
                char = f"character{c + 1:02d}"
                arrs = []
                for d in range(drawers):
                    a = rng.rand(size, size) > 0.3
                    arrs.append(a)
                    zf.writestr(f"{top}/{alpha}/{char}/{c:04d}_{d + 1:02d}.png", _png(a))
                content[(alpha, char)] = arrs
    return content


@pytest.fixture
def omni_root(tmp_path):
    d = tmp_path / "omniglot"
    d.mkdir()
    content = make_omniglot_zip(
        d / "images_background_small1.zip", "images_background_small1", {"Zeta": 2, "Alpha": 3}, drawers=3
    )
    return tmp_path, content


def test_omniglot_full_resolution_matches_pixels(omni_root):
    root, content = omni_root
    ds = Omniglot(root, "small1", image_size=105, cache=False)
    keys = sorted(content)  # classes sorted by "Alphabet/character"
    assert ds.class_names == [f"{a}/{c}" for a, c in keys]
    ref = np.stack([a for k in keys for a in content[k]]).astype(np.uint8) * 255
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), ref)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (15, 1, 105, 105)
    assert ds.labels.tolist() == [i for i in range(5) for _ in range(3)]
    assert ds.num_classes == 5 and len(ds) == 15


@pytest.mark.parametrize("resample,filt", [("lanczos", Image.Resampling.LANCZOS), ("bilinear", Image.Resampling.BILINEAR)])
def test_omniglot_resize(omni_root, resample, filt):
    root, content = omni_root
    ds = Omniglot(root, "small1", image_size=28, resample=resample, cache=False)
    first = content[sorted(content)[0]][0]
    ref = np.asarray(Image.fromarray(first.astype(np.uint8) * 255, mode="L").resize((28, 28), filt))
    np.testing.assert_array_equal(ds.images[0, 0].numpy(), ref)


def test_omniglot_rotations(omni_root):
    root, content = omni_root
    base = Omniglot(root, "small1", image_size=12, cache=False)
    rot = Omniglot(root, "small1", image_size=12, rotations=True, cache=False)
    assert rot.num_classes == 4 * base.num_classes and len(rot) == 4 * len(base)
    for i in (0, 7, 14):
        for r in range(4):
            j = 4 * i + r
            np.testing.assert_array_equal(rot.images[j, 0].numpy(), np.rot90(base.images[i, 0].numpy(), r))
            assert rot.labels[j] == 4 * base.labels[i] + r
    assert rot.class_names[1] == base.class_names[0] + "/rot090"


def test_omniglot_real_zip_layout_and_bad_split(omni_root):
    root, _ = omni_root
    with pytest.raises(ValueError, match="'nope'"):
        Omniglot(root, "nope")
    with pytest.raises(ValueError, match="image_size"):
        Omniglot(root, "small1", image_size=0)
    with pytest.raises(FileNotFoundError, match=r"images_background_small2\.zip.*download=True"):
        Omniglot(root, "small2")


def test_omniglot_corrupt_and_html_zip_named(tmp_path):
    d = tmp_path / "omniglot"
    d.mkdir()
    make_omniglot_zip(d / "images_background_small1.zip", "images_background_small1", {"A": 2})
    data = (d / "images_background_small1.zip").read_bytes()
    (d / "images_background_small1.zip").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CorruptFileError, match=r"images_background_small1\.zip"):
        Omniglot(tmp_path, "small1", cache=False)
    (d / "images_background_small2.zip").write_bytes(b"<!DOCTYPE html><html>Not found</html>")
    with pytest.raises(CorruptFileError, match=r"images_background_small2\.zip.*not a readable zip"):
        Omniglot(tmp_path, "small2", cache=False)


def _encoded_character_zip(path, top, names, offset):
    """One 105x105 drawing per character whose first row encodes its global index in binary."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, (alpha, char) in enumerate(names):
            a = np.ones((105, 105), dtype=bool)
            g = offset + i
            a[0, :11] = [(g >> b) & 1 == 0 for b in range(11)]  # stroke (0) = bit set
            zf.writestr(f"{top}/{alpha}/{char}/x_01.png", _png(a))


def test_omniglot_maml_and_vinyals_splits(tmp_path):
    d = tmp_path / "omniglot"
    d.mkdir()
    bg = [(f"Bg{a:02d}", f"character{c:02d}") for a in range(30) for c in range(1, 34)][:964]
    ev = [(f"Ev{a:02d}", f"character{c:02d}") for a in range(20) for c in range(1, 34)][:659]
    _encoded_character_zip(d / "images_background.zip", "images_background", bg, 0)
    _encoded_character_zip(d / "images_evaluation.zip", "images_evaluation", ev, 964)
    allnames = [f"{a}/{c}" for a, c in sorted(bg)] + [f"{a}/{c}" for a, c in sorted(ev)]
    perm = np.random.RandomState(0).permutation(1623)
    expected = {
        "maml": (np.sort(perm[:1100]), np.sort(perm[1100:1200]), np.sort(perm[1200:])),
        "vinyals": (np.arange(1028), np.arange(1028, 1200), np.arange(1200, 1623)),
    }
    cache = tmp_path / "cache"
    for protocol, parts in expected.items():
        seen = []
        for part, ref in zip(("train", "val", "test"), parts):
            ds = Omniglot(tmp_path, f"{protocol}-{part}", image_size=105, cache_dir=cache)
            assert ds.num_classes == len(ref) == len(ds)
            assert ds.class_names == [allnames[i] for i in ref]
            # decode the global index from the pixels: independent of the reader's bookkeeping
            bits = (ds.images[:, 0, 0, :11] == 0).long()
            glob = (bits << torch.arange(11)).sum(1)
            assert glob[ds.labels.argsort()].tolist() == ref.tolist()
            seen.extend(ref.tolist())
        assert sorted(seen) == list(range(1623))
    assert (cache / "images_background.105px.lanczos.pt").exists()


# ----------------------------------------------------------------------------- decoded cache


def test_decoded_cache_reused_rebuilt_when_corrupt_or_stale(omni_root, monkeypatch):
    root, _ = omni_root
    ref = Omniglot(root, "small1", image_size=20, cache=False)
    first = Omniglot(root, "small1", image_size=20)
    cache_file = root / "omniglot" / "images_background_small1.20px.lanczos.pt"
    assert cache_file.exists()
    assert [p.name for p in cache_file.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert torch.equal(first.images, ref.images)

    calls = []
    real = omniglot_mod.decode_omniglot_zip
    monkeypatch.setattr(omniglot_mod, "decode_omniglot_zip", lambda *a: calls.append(1) or real(*a))
    again = Omniglot(root, "small1", image_size=20)
    assert calls == [] and torch.equal(again.images, ref.images)

    # 1. truncated cache file
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 3])
    with pytest.warns(RuntimeWarning, match="rebuilding decoded cache"):
        ds = Omniglot(root, "small1", image_size=20)
    assert calls == [1] and torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels)

    # 2. valid torch file whose tensor bytes were altered (checksum mismatch)
    obj = torch.load(cache_file, weights_only=True)
    obj["images"][0, 0, 0, 0] ^= 1
    torch.save(obj, cache_file)
    with pytest.warns(RuntimeWarning, match="checksum"):
        ds = Omniglot(root, "small1", image_size=20)
    assert calls == [1, 1] and torch.equal(ds.images, ref.images)

    # 3. source zip changed (mtime) -> stale
    src = root / "omniglot" / "images_background_small1.zip"
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(RuntimeWarning, match="source files changed"):
        Omniglot(root, "small1", image_size=20)
    assert calls == [1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Omniglot(root, "small1", image_size=20)  # fresh again, no warning
    assert calls == [1, 1, 1]


# ----------------------------------------------------------------------------- MNIST


def _idx_images(arr):
    n, r, c = arr.shape
    return (2051).to_bytes(4, "big") + b"".join(x.to_bytes(4, "big") for x in (n, r, c)) + arr.tobytes()


def _idx_labels(lab):
    return (2049).to_bytes(4, "big") + len(lab).to_bytes(4, "big") + lab.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.RandomState(0)
    imgs = rng.randint(0, 256, (7, 28, 28), dtype=np.uint8)
    lab = rng.randint(0, 10, 7)
    d = tmp_path / "mnist"
    d.mkdir()
    for name, data in (("t10k-images-idx3-ubyte", _idx_images(imgs)), ("t10k-labels-idx1-ubyte", _idx_labels(lab))):
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    ds = MNIST(tmp_path, "test", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), imgs)
    assert ds.labels.tolist() == lab.tolist() and ds.labels.dtype == torch.int64
    assert ds.num_classes == 10


def _write_mnist(d, img_bytes, lab_bytes, gz=False):
    d.mkdir(exist_ok=True)
    suffix = ".gz" if gz else ""
    (d / ("t10k-images-idx3-ubyte" + suffix)).write_bytes(img_bytes)
    (d / ("t10k-labels-idx1-ubyte" + suffix)).write_bytes(lab_bytes)


def test_mnist_bad_files_named(tmp_path):
    imgs = np.zeros((3, 28, 28), np.uint8)
    good_i, good_l = _idx_images(imgs), _idx_labels(np.array([1, 2, 3]))
    d = tmp_path / "mnist"
    _write_mnist(d, good_l, good_l)  # labels file where images expected: wrong magic
    with pytest.raises(CorruptFileError, match=r"t10k-images-idx3-ubyte.*magic number 2049.*2051"):
        MNIST(tmp_path, "test", cache=False)
    _write_mnist(d, good_i[:-5], good_l)
    with pytest.raises(CorruptFileError, match=r"t10k-images-idx3-ubyte.*truncated"):
        MNIST(tmp_path, "test", cache=False)
    _write_mnist(d, good_i, _idx_labels(np.array([1, 2])))
    with pytest.raises(CorruptFileError, match="3 images but .* 2 labels"):
        MNIST(tmp_path, "test", cache=False)
    for p in d.iterdir():
        p.unlink()
    _write_mnist(d, gzip.compress(good_i)[:-10], gzip.compress(good_l), gz=True)
    with pytest.raises(CorruptFileError, match=r"t10k-images-idx3-ubyte\.gz.*gzip"):
        MNIST(tmp_path, "test", cache=False)


# ----------------------------------------------------------------------------- CIFAR-FS


def _all_cifar_names():
    return sorted(cifar_fs_classes("train") + cifar_fs_classes("val") + cifar_fs_classes("test"))


def make_cifar100_tarball(path, per_class_train=2, per_class_test=1, bytes_keys=True, seed=0):
    """CIFAR-100 python tarball; returns (images [N,3,32,32], fine labels) in train+test order."""
    rng = np.random.RandomState(seed)
    names = _all_cifar_names()  # real fine_label_names are alphabetical
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)  # the real files are Python 2 pickles
    batches, all_imgs, all_labels = {}, [], []
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(100), per))
        data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
        batches[split] = {k("filenames"): [], k("fine_labels"): labels.tolist(),
                          k("coarse_labels"): [0] * len(labels), k("data"): data}
        all_imgs.append(data.reshape(-1, 3, 32, 32))
        all_labels.append(labels)
    batches["meta"] = {k("fine_label_names"): names, k("coarse_label_names"): ["x"] * 20}
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in batches.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return np.concatenate(all_imgs), np.concatenate(all_labels), names


def test_cifar_fs_split_files():
    tr, va, te = cifar_fs_classes("train"), cifar_fs_classes("val"), cifar_fs_classes("test")
    assert (len(tr), len(va), len(te)) == (64, 16, 20)
    assert len(set(tr) | set(va) | set(te)) == 100
    assert {"whale", "poppy", "wardrobe"} <= set(te) and {"otter", "tractor"} <= set(va)


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar_fs(tmp_path, bytes_keys):
    d = tmp_path / "cifar100"
    d.mkdir()
    imgs, labels, names = make_cifar100_tarball(d / "cifar-100-python.tar.gz", bytes_keys=bytes_keys)
    for split, ncls in (("train", 64), ("val", 16), ("test", 20)):
        ds = CIFARFS(tmp_path, split, cache_dir=tmp_path / "c")
        assert ds.num_classes == ncls and len(ds) == 3 * ncls
        assert ds.images.shape[1:] == (3, 32, 32)
        wanted = cifar_fs_classes(split)
        # reference via a Python loop over the raw arrays
        ref = [(imgs[i], wanted.index(names[l])) for i, l in enumerate(labels) if names[l] in wanted]
        np.testing.assert_array_equal(ds.images.numpy(), np.stack([r[0] for r in ref]))
        assert ds.labels.tolist() == [r[1] for r in ref]


def test_cifar_fs_corrupt_tarball(tmp_path):
    d = tmp_path / "cifar100"
    d.mkdir()
    make_cifar100_tarball(d / "cifar-100-python.tar.gz")
    data = (d / "cifar-100-python.tar.gz").read_bytes()
    (d / "cifar-100-python.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"cifar-100-python\.tar\.gz"):
        CIFARFS(tmp_path, "train", cache=False)


# ----------------------------------------------------------------------------- mini-ImageNet


def test_mini_imagenet(tmp_path):
    rng = np.random.RandomState(0)
    d = tmp_path / "mini-imagenet"
    d.mkdir()
    images = rng.randint(0, 256, (12, 84, 84, 3), dtype=np.uint8)
    perm = rng.permutation(12)
    class_dict = {"n03": perm[:4].tolist(), "n01": perm[4:8].tolist(), "n02": perm[8:].tolist()}
    with open(d / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    ds = MiniImageNet(tmp_path, "val", cache_dir=tmp_path / "c")
    assert ds.class_names == ["n01", "n02", "n03"]
    assert ds.images.shape == (12, 3, 84, 84)
    for i in range(12):
        np.testing.assert_array_equal(ds.images[i].numpy(), images[i].transpose(2, 0, 1))
        wnid = next(w for w, idx in class_dict.items() if i in idx)
        assert ds.class_names[int(ds.labels[i])] == wnid


def test_mini_imagenet_missing_and_corrupt(tmp_path):
    with pytest.raises(DownloadError, match=r"mini-imagenet-cache-train\.pkl.*no stable official"):
        MiniImageNet(tmp_path, "train", download=True)
    with pytest.raises(FileNotFoundError, match=r"mini-imagenet-cache-train\.pkl"):
        MiniImageNet(tmp_path, "train")
    d = tmp_path / "mini-imagenet"
    d.mkdir()
    raw = pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 1]}})
    (d / "mini-imagenet-cache-test.pkl").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match=r"mini-imagenet-cache-test\.pkl"):
        MiniImageNet(tmp_path, "test", cache=False)
    with open(d / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((3, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 1]}}, f)
    with pytest.raises(CorruptFileError, match="belong to no class"):
        MiniImageNet(tmp_path, "test", cache=False)


def test_pickles_with_arbitrary_objects_are_refused(tmp_path):
    d = tmp_path / "mini-imagenet"
    d.mkdir()
    with open(d / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"image_data": os.getcwd, "class_dict": {}}, f)
    with pytest.raises(CorruptFileError, match="refusing to unpickle"):
        MiniImageNet(tmp_path, "val", cache=False)
