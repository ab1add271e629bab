from __future__ import annotations

import pytest
import torch
from torch import nn

from instaprune.core.errors import ConfigError
from instaprune.data.synthetic import CLASS_NAMES, RECIPE, DemoData, DemoRecipe, make_dataset, make_splits, mean_std
from instaprune.models.tiny_resnet import BasicBlock, PadShortcut, tiny_resnet


@pytest.fixture(scope="module")
def data() -> DemoData:
    return make_dataset(2000, seed=5, size=16)


def _edge_energy(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255.0
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean(dim=(1, 2, 3))
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
    return dx + dy


def test_shapes_dtypes_and_ranges(data: DemoData) -> None:
    assert data.images.shape == (2000, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.labels.shape == (2000,) and data.labels.dtype == torch.int64
    assert data.difficulty.shape == (2000,) and data.difficulty.dtype == torch.float32
    assert float(data.difficulty.min()) >= 0.0 and float(data.difficulty.max()) <= 1.0
    assert float(data.difficulty.max() - data.difficulty.min()) > 0.9  # spans the whole range
    assert data.class_names == CLASS_NAMES and len(CLASS_NAMES) == 10
    assert int(data.labels.min()) == 0 and int(data.labels.max()) == 9
    assert len(data) == 2000
    # images use the whole dynamic range, not a constant
    assert int(data.images.min()) < 20 and int(data.images.max()) > 235


def test_deterministic_for_a_seed_and_thread_count() -> None:
    a = make_dataset(700, seed=3, size=20)  # 700 > one render chunk
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = make_dataset(700, seed=3, size=20)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.difficulty, b.difficulty)
    c = make_dataset(700, seed=4, size=20)
    assert not torch.equal(a.images, c.images)
    # global RNG state does not matter
    torch.manual_seed(123)
    d = make_dataset(700, seed=3, size=20)
    assert torch.equal(a.images, d.images)


def test_class_balance(data: DemoData) -> None:
    counts = torch.bincount(data.labels, minlength=10)
    assert counts.min() >= 0.8 * 200 and counts.max() <= 1.2 * 200
    assert counts.max() - counts.min() <= 1  # balanced by construction


def test_hard_images_are_busier_than_easy_ones(data: DemoData) -> None:
    order = data.difficulty.argsort()
    easy, hard = order[:200], order[-200:]
    edge = _edge_energy(data.images)
    # measured with this generator: 0.0384 (hardest 200) vs 0.0166 (easiest 200)
    assert edge[hard].mean() > 1.8 * edge[easy].mean()
    # (pixel std is not compared: the contrast-loss factor lowers it on hard images)
    # more distinct colours in hard images (coarsely quantised)
    q = (data.images // 64).long()
    codes = q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]
    distinct = torch.tensor([codes[i].unique().numel() for i in range(len(data))], dtype=torch.float32)
    assert distinct[hard].mean() > 2.5 * distinct[easy].mean()  # measured 30.0 vs 8.4
    # difficulty correlates with edge energy across the whole set (Spearman via ranks)
    r1 = data.difficulty.argsort().argsort().double()
    r2 = edge.argsort().argsort().double()
    assert float(torch.corrcoef(torch.stack([r1, r2]))[0, 1]) > 0.5  # measured 0.65


def test_easy_images_are_clean_single_objects(data: DemoData) -> None:
    easy = data.difficulty.argsort()[:100]
    x = data.images[easy].float() / 255.0
    # the border (background) is nearly flat on easy images
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    assert float(border.std(dim=-1).mean()) < 0.05


def test_mean_std(data: DemoData) -> None:
    mean, std = mean_std(data)
    assert len(mean) == 3 and len(std) == 3
    assert all(0.05 < m < 0.95 for m in mean) and all(0.02 < s < 0.5 for s in std)
    x = data.images.double() / 255.0
    assert abs(mean[1] - float(x[:, 1].mean())) < 1e-9
    assert abs(std[2] - float(x[:, 2].std())) < 1e-6


def test_make_splits_are_disjoint_seeds() -> None:
    r = DemoRecipe(n_train=50, n_calib=30, n_test=40)
    tr, ca, te = make_splits(0, r)
    assert (len(tr), len(ca), len(te)) == (50, 30, 40)
    assert tr.images.shape[-1] == r.image_size
    assert not torch.equal(tr.images[:30], ca.images)
    tr1, _, _ = make_splits(1, r)
    assert not torch.equal(tr.images, tr1.images)


def test_recipe_is_documented() -> None:
    d = RECIPE.to_dict()
    assert d["n_test"] >= 5000 and d["image_size"] == RECIPE.image_size
    assert isinstance(d["measured"], dict)
    with pytest.raises(ConfigError):
        DemoRecipe(epochs=0)


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError):
        make_dataset(0, seed=0)
    with pytest.raises(ConfigError):
        make_dataset(10, seed=0, size=4)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_tiny_resnet_forward(shortcut: str) -> None:
    torch.manual_seed(0)
    m = tiny_resnet(num_classes=7, width=8, shortcut=shortcut)
    x = torch.randn(4, 3, 16, 16)
    assert m(x).shape == (4, 7)
    assert m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)).shape == (4, 7)
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 3
    assert all(hasattr(b, "shortcut") for b in blocks)
    assert isinstance(blocks[0].shortcut, nn.Identity)
    down = blocks[1].shortcut
    assert isinstance(down, PadShortcut) if shortcut == "A" else isinstance(down[0], nn.Conv2d)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert "conv1" in convs and "layer3.0.conv2" in convs
    widths = [mod.out_channels for n, mod in m.named_modules() if n.endswith("conv2")]
    assert widths == [8, 16, 32]


def test_tiny_resnet_two_blocks_and_validation() -> None:
    m = tiny_resnet(width=4, blocks=(2, 1, 2))
    assert m(torch.randn(2, 3, 12, 12)).shape == (2, 10)
    assert len([b for b in m.modules() if isinstance(b, BasicBlock)]) == 5
    with pytest.raises(ConfigError):
        tiny_resnet(width=0)
    with pytest.raises(ConfigError):
        tiny_resnet(blocks=(1, 1))
    with pytest.raises(ConfigError):
        tiny_resnet(shortcut="C")
