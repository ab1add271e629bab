"""Data loading, splitting, batching and per-sample reproducible augmentation (instaprune.data / .augment)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from instaprune.core.config import Preprocessing
from instaprune.core.errors import ConfigError, DataError
from instaprune.data.augment import augment_batch, augment_params, epoch_permutation, shard_indices
from instaprune.data.datasets import (
    CIFAR10_CLASSES,
    ImageSet,
    iterate_batches,
    load_cifar_batches,
    load_dataset,
    load_image_folder,
    make_folder_loader,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_JPEG = SHARED / "data" / "cifar10-test-jpeg"
CLASSES = ("cat", "dog", "emu")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def _pixels(c: int, i: int, h: int = 8, w: int = 8) -> np.ndarray:
    rng = np.random.default_rng(100 * c + i)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_folder(root: Path, n_per_class: int = 4, size: tuple[int, int] = (8, 8)) -> Path:
    """3 classes x n images; even images PNG (lossless), odd ones JPEG."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = Image.fromarray(_pixels(c, i, size[1], size[0]))
            file = root / name / (f"{i:03d}.png" if i % 2 == 0 else f"{i:03d}.jpg")
            img.save(file, quality=98, subsampling=0)  # JPEG options are ignored for PNG
    return root


def make_set(n_per_class: tuple[int, ...] = (10, 20, 30), hw: int = 6) -> ImageSet:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, hw, hw), generator=g, dtype=torch.uint8)
    return ImageSet(images, labels, tuple(f"c{c}" for c in range(len(n_per_class))))


# ---------------------------------------------------------------- image folders


def test_load_image_folder_labels_shapes_and_values(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "dog" / "notes.txt").write_text("not an image")  # ignored, like torchvision
    data = load_image_folder(root, workers=1)
    assert len(data) == 12 and data.images.shape == (12, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.class_names == CLASSES and data.num_classes == 3
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [Path(p).name for p in data.paths[:4]] == ["000.png", "001.jpg", "002.png", "003.jpg"]
    for k, path in enumerate(data.paths):
        c, i = CLASSES.index(Path(path).parent.name), int(Path(path).stem)
        want = torch.from_numpy(_pixels(c, i)).permute(2, 0, 1)
        got = data.images[k]
        if path.endswith(".png"):
            assert torch.equal(got, want)  # lossless: exact pixel values, RGB order, CHW layout
        else:
            assert (got.float() - want.float()).abs().mean() < 8  # JPEG: lossy, but the same image


def test_load_image_folder_threads_match_sequential(tmp_path):
    root = tmp_path / "big"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(300):  # more than one decode chunk, so the thread pool really runs
        Image.fromarray(_pixels(0, i, 4, 4)).save(root / ("a" if i % 3 else "b") / f"{i}.png")
    one, two = load_image_folder(root, workers=1), load_image_folder(root, workers=2)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.paths == two.paths
    assert one.labels.bincount().tolist() == [200, 100]


def test_resize_center_crop_grayscale_and_size_mismatch(tmp_path):
    root = tmp_path / "ds"
    (root / "x").mkdir(parents=True)
    Image.fromarray(np.full((10, 14), 77, np.uint8), mode="L").save(root / "x" / "gray.png")
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, mode="RGBA").save(root / "x" / "rgba.png")
    data = load_image_folder(root, size=8)
    assert data.images.shape == (2, 3, 8, 8)
    assert (data.images[0] == 77).all()
    assert (data.images[1, 1] == 200).all() and (data.images[1, 0] == 0).all()
    assert load_image_folder(root, size=6, resize=9).images.shape == (2, 3, 6, 6)
    assert load_dataset(root, resize=9).images.shape == (2, 3, 9, 9)
    with pytest.raises(DataError, match="pass an input size"):
        load_image_folder(root)


def test_folder_errors_are_one_line(tmp_path):
    cases = {
        "not found": tmp_path / "missing",
        "not a directory": tmp_path / "file.txt",
        "no images found": tmp_path / "empty",
    }
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    flat = tmp_path / "flat"  # images but no class sub-folders
    flat.mkdir()
    Image.fromarray(_pixels(0, 0)).save(flat / "a.png")
    nofiles = tmp_path / "nofiles"  # class folders without images
    (nofiles / "a").mkdir(parents=True)
    (nofiles / "b").mkdir()
    cases.update({"no images found in " + str(flat): flat, "no images found in " + str(nofiles): nofiles})
    for msg, path in cases.items():
        for load in (load_image_folder, load_dataset):
            with pytest.raises(DataError, match=msg) as e:
                load(path)
            assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"expected ImageFolder layout .*/<class>/<image>"):
        load_image_folder(tmp_path / "empty")


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_names_the_file(tmp_path, workers):
    root = make_folder(tmp_path / "ds", n_per_class=100 if workers == 2 else 4)
    bad = root / "dog" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image .*dog/002.png") as e:
        load_image_folder(root, workers=workers)
    assert "\n" not in str(e.value)


def test_truncated_jpeg_names_the_file(tmp_path):
    root = make_folder(tmp_path / "ds")
    bad = root / "emu" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="emu/001.jpg"):
        load_image_folder(root)


# ---------------------------------------------------------------- ImageSet


def test_imageset_validation_and_subset():
    data = make_set()
    with pytest.raises(DataError, match="uint8"):
        ImageSet(data.images.float(), data.labels)
    with pytest.raises(DataError, match="labels"):
        ImageSet(data.images, data.labels[:-1])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        ImageSet(data.images, data.labels, ("a", "b"))
    assert ImageSet(data.images, data.labels.int()).labels.dtype == torch.int64
    sub = data.subset([5, 0, 59])
    assert len(sub) == 3 and torch.equal(sub.images[0], data.images[5]) and sub.labels.tolist() == [0, 0, 2]
    assert sub.class_names == data.class_names
    with pytest.raises(ConfigError, match="out of range"):
        data.subset([60])


def test_split_stratified_deterministic_disjoint():
    data = make_set((10, 20, 30))
    rest, held = data.split(12, seed=3)
    assert len(held) == 12 and len(rest) == 48
    assert held.labels.bincount().tolist() == [2, 4, 6]  # exactly proportional
    rest2, held2 = data.split(12, seed=3)
    assert torch.equal(held.images, held2.images) and torch.equal(rest.labels, rest2.labels)
    _, other = data.split(12, seed=4)
    assert not torch.equal(other.images, held.images)
    # disjoint and complete: every image is in exactly one part (images are random, hence distinct)
    both = torch.cat([rest.images, held.images]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == 60
    # largest-remainder rounding: 7 of (10, 20, 30) -> exact (7/6, 14/6, 21/6) -> (1, 2, 4)
    assert data.split(7, seed=0)[1].labels.bincount(minlength=3).tolist() == [1, 2, 4]
    assert len(data.split(0, 0)[1]) == 0 and len(data.split(60, 0)[0]) == 0
    with pytest.raises(ConfigError, match="holdout"):
        data.split(61, 0)


# ---------------------------------------------------------------- batching & augmentation


def test_normalisation_exact_and_batching_options():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    data = ImageSet(images, torch.tensor([0, 1, 1]), ("a", "b"))
    (x, y, idx), = list(iterate_batches(data, 8, MEAN, STD))
    for k, v in enumerate((0, 51, 255)):
        for c in range(3):
            want = (v / 255.0 - MEAN[c]) / STD[c]
            assert torch.allclose(x[k, c], torch.full((2, 2), want), atol=1e-6)
    assert x.dtype == torch.float32 and y.tolist() == [0, 1, 1] and idx.tolist() == [0, 1, 2]
    data = make_set()
    sizes = [len(b[1]) for b in iterate_batches(data, 25, MEAN, STD)]
    assert sizes == [25, 25, 10]
    assert [len(b[1]) for b in iterate_batches(data, 25, MEAN, STD, drop_last=True)] == [25, 25]
    x, y, idx = next(iterate_batches(data, 4, MEAN, STD, indices=[7, 3, 55], channels_last=True))
    assert idx.tolist() == [7, 3, 55] and torch.equal(y, data.labels[[7, 3, 55]])
    assert x.is_contiguous(memory_format=torch.channels_last)
    ref = next(iterate_batches(data, 4, MEAN, STD, indices=[7, 3, 55]))[0]
    assert torch.equal(x, ref)
    for bad in ({"batch_size": 0}, {"augment": "rotate"}, {"mean": (0.5,)}, {"indices": [60]}):
        kw = {"batch_size": 4, "mean": MEAN, "std": STD, **bad}
        with pytest.raises(ConfigError):
            iterate_batches(data, **kw)  # raised on the call, before iterating


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    data = make_set()

    def order(**kw):
        return torch.cat([i for _, _, i in iterate_batches(data, 7, MEAN, STD, shuffle=True, **kw)])

    a = order(seed=1, epoch=2)
    assert sorted(a.tolist()) == list(range(60)) and torch.equal(a, order(seed=1, epoch=2))
    assert not torch.equal(a, order(seed=1, epoch=3)) and not torch.equal(a, order(seed=2, epoch=2))
    sub = order(seed=1, epoch=2, indices=list(range(10, 20)))
    assert sorted(sub.tolist()) == list(range(10, 20))


def _per_sample(data, **kw):
    out = {}
    for x, _, idx in iterate_batches(data, mean=MEAN, std=STD, **kw):
        out.update({int(i): x[k] for k, i in enumerate(idx)})
    return out


@pytest.mark.parametrize("mode", ["cifar", "flip"])
def test_augmentation_independent_of_batch_composition(mode):
    data = make_set(hw=8)
    a = _per_sample(data, batch_size=7, augment=mode, shuffle=True, seed=5, epoch=1)
    b = _per_sample(data, batch_size=16, augment=mode, shuffle=True, seed=6, epoch=4, indices=None)
    c = _per_sample(data, batch_size=3, augment=mode, shuffle=False, seed=5, epoch=1,
                    indices=list(range(59, -1, -1)))
    assert all(torch.equal(a[i], c[i]) for i in range(60))  # same (seed, epoch, index), other batches/order
    assert sum(not torch.equal(a[i], b[i]) for i in range(60)) > 20  # other seed/epoch: other draws


def test_crop_and_flip_match_reference_and_stay_in_bounds():
    data = make_set((200,), hw=8)
    idx = torch.arange(200)
    out = augment_batch(data.images, idx, "cifar", seed=0, epoch=0)
    dy, dx, flip = augment_params(idx, 0, 0, pad=4)
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8  # full range used...
    assert set(flip.tolist()) == {0, 1}  # ...and both flip states
    padded = F.pad(data.images, (4, 4, 4, 4))
    for i in range(200):
        ref = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    ones = torch.full((200, 3, 8, 8), 255, dtype=torch.uint8)
    kept = augment_batch(ones, idx, "cifar", 0, 0).flatten(1).eq(255).sum(1) // 3
    assert torch.equal(kept, (8 - (dy - 4).abs()) * (8 - (dx - 4).abs()))  # crop window inside the pad
    fl = augment_batch(data.images, idx, "flip", 0, 0)
    for i in range(200):
        assert torch.equal(fl[i], data.images[i].flip(-1)) or torch.equal(fl[i], data.images[i])
    assert augment_batch(data.images, idx, None, 0, 0) is data.images


def test_shards_reproduce_the_single_process_batches():
    data = make_set((9, 9, 5), hw=8)  # 23 images: not a multiple of the world size
    world, bs = 3, 2
    single = list(iterate_batches(data, bs * world, MEAN, STD, augment="cifar",
                                  indices=shard_indices(len(data), 0, 1, seed=4, epoch=2), seed=4, epoch=2))
    shards = [shard_indices(len(data), r, world, seed=4, epoch=2) for r in range(world)]
    ranks = [list(iterate_batches(data, bs, MEAN, STD, augment="cifar", seed=4, epoch=2, indices=sh))
             for sh in shards]
    assert all(len(r) == 4 for r in ranks)  # ceil(23 / 3) = 8 per rank (one padded sample), 4 batches of 2
    for k, (xs, _, ids) in enumerate(single[:3]):
        xr = torch.stack([ranks[r][k][0] for r in range(world)], 1).flatten(0, 1)
        ir = torch.stack([ranks[r][k][2] for r in range(world)], 1).flatten()
        assert torch.equal(ir, ids) and torch.equal(xr, xs)
    assert torch.equal(shard_indices(23, 0, 1, seed=4, epoch=2), epoch_permutation(23, 4, 2))
    dropped = [shard_indices(23, r, world, drop_last=True) for r in range(world)]
    assert all(len(d) == 7 for d in dropped) and len(set(torch.cat(dropped).tolist())) == 21
    with pytest.raises(ConfigError):
        shard_indices(10, 3, 3)


# ---------------------------------------------------------------- CIFAR-10 python batches


def make_cifar(root: Path, per_batch: int = 3, meta: bool = True) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.arange(per_batch * 3072, dtype=np.int64).reshape(per_batch, 3072)
        data = ((data + 7 * b) % 256).astype(np.uint8)
        with open(d / name, "wb") as f:
            labels = [(b + i) % 10 for i in range(per_batch)]
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f)
    if meta:
        with open(d / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072}, f)
    return d


def test_cifar_batches(tmp_path):
    d = make_cifar(tmp_path)
    train, test = load_cifar_batches(d, train=True), load_cifar_batches(tmp_path, train=False)
    assert len(train) == 15 and len(test) == 3 and train.images.shape == (15, 3, 32, 32)
    assert train.class_names == CIFAR10_CLASSES
    assert train.labels.tolist()[:6] == [0, 1, 2, 1, 2, 3]
    assert test.labels.tolist() == [5, 6, 7]
    # row layout: 1024 red, 1024 green, 1024 blue values, row-major
    assert int(test.images[0, 0, 0, 1]) == (1 + 35) % 256
    assert int(test.images[0, 1, 0, 0]) == (1024 + 35) % 256
    assert test.paths[1].endswith("test_batch#1")
    assert torch.equal(load_dataset(d / "test").images, test.images)
    assert torch.equal(load_dataset(tmp_path / "cifar-10-batches-py" / "train").labels, train.labels)
    assert torch.equal(load_dataset(d, train=False).labels, test.labels)
    assert len(load_dataset(d / "data_batch_2")) == 3
    assert load_dataset(d / "test", size=40).images.shape == (3, 3, 40, 40)
    with pytest.raises(DataError, match="name the split"):
        load_dataset(d)


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_cifar_batches(tmp_path / "nope", train=True)
    with pytest.raises(DataError, match="no CIFAR-10 python batches"):
        load_cifar_batches(tmp_path, train=True)
    d = make_cifar(tmp_path / "a", meta=False)
    assert load_cifar_batches(d, False).class_names == CIFAR10_CLASSES  # default names without batches.meta
    os.remove(d / "data_batch_4")
    with pytest.raises(DataError, match="missing data_batch_4"):
        load_cifar_batches(d, train=True)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"uint8 \(N, 3072\)"):
        load_cifar_batches(d, train=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="forbidden global") as e:
        load_cifar_batches(d, train=False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- streaming loader


def test_make_folder_loader(tmp_path):
    root = make_folder(tmp_path / "ds", size=(10, 12))
    pre = Preprocessing(mean=MEAN, std=STD, input_size=8, resize=9)
    batches = list(make_folder_loader(root, train=False, preprocessing=pre, batch_size=5, workers=0))
    assert [b[0].shape for b in batches] == [(5, 3, 8, 8), (5, 3, 8, 8), (2, 3, 8, 8)]
    assert torch.cat([b[1] for b in batches]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(12))
    train = list(make_folder_loader(root, train=True, preprocessing=pre, batch_size=5, workers=0))
    assert [len(b[1]) for b in train] == [5, 5] and train[0][0].shape[1:] == (3, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        make_folder_loader(tmp_path / "empty", False, pre, 4, 0)
    with pytest.raises(DataError, match="not found"):
        make_folder_loader(tmp_path / "nope", False, pre, 4, 0)
    with pytest.raises(ConfigError, match="process group"):
        make_folder_loader(root, True, pre, 4, 0, distributed=True)
    (root / "cat" / "000.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="cat/000.png"):
        list(make_folder_loader(root, train=False, preprocessing=pre, batch_size=5, workers=0))


# ---------------------------------------------------------------- the real CIFAR-10 test split (JPEG)


def test_real_cifar10_test_jpeg():
    if not CIFAR_JPEG.is_dir():
        pytest.skip(f"shared data not found at {CIFAR_JPEG} (CI provides ../shared next to the repo)")
    data = load_dataset(CIFAR_JPEG, size=32)
    assert len(data) == 10_000 and data.images.shape == (10_000, 3, 32, 32)
    assert data.class_names == CIFAR10_CLASSES
    assert data.labels.bincount().tolist() == [1000] * 10
    rest, held = data.split(1000, seed=0)
    assert held.labels.bincount().tolist() == [100] * 10 and len(rest) == 9000
