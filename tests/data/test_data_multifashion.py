"""MultiFashion: layout, provenance, determinism and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fashion_fixtures import make_fashion_dir

from mtnorm.data import MultiFashion, cache_dir, load_fashion_mnist, make_multifashion
from mtnorm.data.multifashion import CANVAS, MAX_SHIFT


def small(fashion_dir, split="train", seed=0, **kw):
    return MultiFashion(split, n_train=200, n_test=80, seed=seed, root=fashion_dir, **kw)


def test_item_and_split_tensors(fashion_dir):
    ds = small(fashion_dir)
    assert len(ds) == 200 and ds.images.shape == (200, 1, CANVAS, CANVAS)
    assert ds.images.dtype == torch.float32 and ds.images.min() >= 0 and ds.images.max() <= 1
    image, target = ds[3]
    assert image.shape == (1, 36, 36) and {"left", "right"} <= set(target)
    assert target["left"].dtype == torch.long and torch.equal(image, ds.images[3])
    assert ds.task_specs()["left"].num_outputs == 10


def test_canvas_is_max_of_the_two_shifted_items(fashion_dir):
    ds = small(fashion_dir)
    src, labels = load_fashion_mnist("train", fashion_dir)
    for i in range(0, 200, 37):
        left, right = ds.source[i].tolist()
        assert ds.targets["left"][i] == labels[left] and ds.targets["right"][i] == labels[right]
        canvas = ds.raw[i].numpy()
        # Brute force over the allowed offsets: exactly the recipe's placement must reproduce it.
        found = [
            (a, b, c, d)
            for a in range(MAX_SHIFT + 1)
            for b in range(MAX_SHIFT + 1)
            for c in range(MAX_SHIFT, 2 * MAX_SHIFT + 1)
            for d in range(MAX_SHIFT, 2 * MAX_SHIFT + 1)
            if np.array_equal(canvas, _compose(src[left], src[right], a, b, c, d))
        ]
        assert len(found) >= 1


def _compose(left, right, a, b, c, d):
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    canvas[a : a + 28, b : b + 28] = left
    canvas[c : c + 28, d : d + 28] = np.maximum(canvas[c : c + 28, d : d + 28], right)
    return canvas


def test_test_canvases_use_only_test_images(fashion_dir):
    # The fixture's train pixels are < 128 and test pixels >= 128 (or 0 off the item).
    train, test = small(fashion_dir, "train"), small(fashion_dir, "test")
    assert train.raw.max() < 128
    assert ((test.raw == 0) | (test.raw >= 128)).all() and len(test) == 80
    assert test.source.max() < 30  # indices into the 30 test images


def test_two_items_are_distinct_images(fashion_dir):
    ds = small(fashion_dir)
    assert (ds.source[:, 0] != ds.source[:, 1]).all()


def test_deterministic_and_seed_dependent(fashion_dir):
    a = small(fashion_dir, seed=1, cache=False)
    b = small(fashion_dir, seed=1, cache=False)
    c = small(fashion_dir, seed=2, cache=False)
    assert torch.equal(a.raw, b.raw) and torch.equal(a.source, b.source)
    assert not torch.equal(a.raw, c.raw)


def test_shifts_cover_the_full_range():
    images = np.full((10, 28, 28), 200, np.uint8)
    out = make_multifashion(images, np.arange(10, dtype=np.uint8), 2000, np.random.default_rng(0))
    rows = out["images"].any(axis=2)
    first = rows.argmax(axis=1)  # top row of the left item
    last = CANVAS - 1 - rows[:, ::-1].argmax(axis=1)  # bottom row of the right item
    assert set(first.tolist()) == set(range(MAX_SHIFT + 1))
    assert set((CANVAS - 1 - last).tolist()) == set(range(MAX_SHIFT + 1))


def test_cache_hit_returns_identical_arrays(fashion_dir):
    first = small(fashion_dir, seed=5)
    entries = list(cache_dir().glob("multifashion-*train*"))
    assert len(entries) == 1 and (entries[0] / "manifest.json").exists()
    stamp = (entries[0] / "images.npy").stat().st_mtime_ns
    again = small(fashion_dir, seed=5)
    assert torch.equal(first.raw, again.raw) and torch.equal(first.source, again.source)
    assert (entries[0] / "images.npy").stat().st_mtime_ns == stamp  # read, not rewritten


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest"])
def test_damaged_cache_is_regenerated(fashion_dir, damage):
    fresh = small(fashion_dir, seed=7)
    (entry,) = cache_dir().glob("multifashion-*train*")
    path = entry / "images.npy"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # a run killed before the manifest was written
        (entry / "manifest.json").unlink()
        path.write_bytes(bytes(data[: len(data) // 3]))
    again = small(fashion_dir, seed=7)
    assert torch.equal(fresh.raw, again.raw)
    np.testing.assert_array_equal(np.load(path), fresh.raw.numpy())  # repaired on disk


def test_cache_key_depends_on_source_files(tmp_path):
    a = MultiFashion("test", n_test=20, root=make_fashion_dir(tmp_path / "a"))
    other = make_fashion_dir(tmp_path / "b", n_test=31)
    b = MultiFashion("test", n_test=20, root=other)
    assert len(list(cache_dir().glob("multifashion-*"))) == 2
    assert not torch.equal(a.source, b.source) or not torch.equal(a.raw, b.raw)


def test_no_temp_files_left(fashion_dir):
    small(fashion_dir)
    assert not list(cache_dir().rglob("*.tmp"))


def test_real_multifashion_small(real_fashion_dir):
    ds = MultiFashion("test", n_test=500, seed=0, root=real_fashion_dir)
    images, labels = load_fashion_mnist("test", real_fashion_dir)
    assert ds.images.shape == (500, 1, 36, 36)
    left, right = ds.source[:, 0].numpy(), ds.source[:, 1].numpy()
    np.testing.assert_array_equal(ds.targets["left"].numpy(), labels[left])
    np.testing.assert_array_equal(ds.targets["right"].numpy(), labels[right])
    # Both items fit whole on the canvas and merge by max: it holds at least each item's ink,
    # and at most their sum.
    ink = ds.raw.numpy().astype(np.int64).sum(axis=(1, 2))
    ink_left = images[left].astype(np.int64).sum((1, 2))
    ink_right = images[right].astype(np.int64).sum((1, 2))
    assert (ink >= np.maximum(ink_left, ink_right)).all()
    assert (ink <= ink_left + ink_right).all() and (ink < ink_left + ink_right).any()


def test_unwritable_cache_still_returns_data(fashion_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MTNORM_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not cache"):
        ds = small(fashion_dir, seed=11)
    assert torch.equal(ds.raw, small(fashion_dir, seed=11, cache=False).raw)


def test_has_class_attributes_follow_the_two_labels(fashion_dir):
    ds = small(fashion_dir)
    assert set(ds.targets) == set(ds.all_tasks) and len(ds.all_tasks) == 12
    has = torch.stack([ds.targets[t] for t in ds.attribute_tasks], dim=1)
    assert has.dtype == torch.float32
    for c in range(10):
        expected = (ds.targets["left"] == c) | (ds.targets["right"] == c)
        assert torch.equal(has[:, c].bool(), expected), c
    # one class when both items share it, else two
    assert set(has.sum(1).tolist()) <= {1.0, 2.0}
    _, target = ds[5]
    assert target["has_bag"] == has[5, 8] and set(target) == set(ds.all_tasks)
    specs = ds.task_specs()
    assert [specs[t].kind for t in ("left", "has_bag")] == ["classification", "binary"]
    assert list(ds.task_specs(("right", "has_coat"))) == ["right", "has_coat"]


def test_twelve_task_multifashion_trains_end_to_end(fashion_dir, tmp_path):
    from mtnorm.train import Trainer, config_from_dict

    tasks = ["left", "right", "has_bag", "has_coat"]
    cfg = config_from_dict({
        "method": "tssbn",
        "epochs": 1,
        "out": str(tmp_path / "run"),
        "data": {"name": "multifashion", "root": str(fashion_dir), "tasks": tasks,
                 "n_train": 64, "n_test": 32, "batch_size": 32},
        "model": {"width": 4, "hidden": 8},
    })
    result = Trainer(cfg, log=None).fit()
    assert result.status == "finished" and list(result.metrics) == tasks
    assert {"f1", "accuracy"} <= set(result.metrics["has_bag"])
    assert "accuracy" in result.metrics["left"]
