"""FashionScenes: geometry, occlusion, attributes, provenance, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtnorm.data import SCENE_TASKS, FashionScenes, load_fashion_mnist, render_scenes
from mtnorm.data.scenes import BACKGROUND, MIN_VISIBLE, RELIEF


def small(fashion_dir, split="train", seed=0, **kw):
    return FashionScenes(split, n_train=48, n_test=24, seed=seed, root=fashion_dir, **kw)


def test_shapes_and_types(fashion_dir):
    ds = small(fashion_dir)
    image, targets = ds[0]
    assert image.shape == (1, 64, 64) and ds.images.shape == (48, 1, 64, 64)
    assert set(targets) == set(SCENE_TASKS) and len(SCENE_TASKS) == 13
    assert targets["segment"].shape == (64, 64) and targets["segment"].dtype == torch.long
    assert targets["depth"].shape == (1, 64, 64) and targets["normal"].shape == (3, 64, 64)
    assert targets["has_ankle_boot"].dtype == torch.float32 and targets["has_t_shirt"].dim() == 0
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert set(ds.task_specs()) == set(SCENE_TASKS)
    assert ds.task_specs()["segment"].num_outputs == 11


def test_normals_unit_and_facing_the_camera(fashion_dir):
    normal = small(fashion_dir).targets["normal"]
    norm = normal.norm(dim=1)
    assert (norm - 1).abs().max() < 2e-3  # float16 storage
    assert (normal[:, 2] > 0).all()


def test_every_scene_has_2_to_4_distinct_items(fashion_dir):
    source = small(fashion_dir).layout["source"]
    count = (source >= 0).sum(1)
    assert count.min() >= 2 and count.max() <= 4 and len(set(count.tolist())) == 3
    for row in source:
        used = row[row >= 0]
        assert len(set(used.tolist())) == len(used)


def test_segment_and_depth_agree_with_the_layout(fashion_dir):
    ds = small(fashion_dir)
    _, labels = load_fashion_mnist("train", fashion_dir)
    seg = ds.targets["segment"].numpy()
    depth = ds.targets["depth"][:, 0].numpy()
    src, base = ds.layout["source"], ds.layout["item_depth"]
    cls = np.where(src >= 0, labels[np.maximum(src, 0)], -1)
    # A pixel labelled c lies on an item of class c: depth within that item's relief band.
    match = np.zeros(seg.shape, bool)
    for k in range(src.shape[1]):
        band = (depth >= base[:, k, None, None] - RELIEF - 1e-4) & (
            depth <= base[:, k, None, None] + 1e-4
        )
        match |= (seg == cls[:, k, None, None]) & band
    assert match[seg != BACKGROUND].all()
    # Items are always in front of the background plane: plane depth >= 7.5 - 0.8 - 1.6 > 5, and
    # item depth <= 5.
    assert depth[seg != BACKGROUND].max() <= 5.0 < depth[seg == BACKGROUND].min()


def test_occlusion_nearest_item_wins():
    albedo = np.ones((4, 28, 28), np.float32)
    labels = np.array([3, 7, 0, 0], np.uint8)
    params = {
        "source": np.array([[0, 1, -1, -1]]),
        "scale": np.ones((1, 4)),
        "top": np.array([[10.0, 20.0, 0, 0]]),
        "left": np.array([[10.0, 20.0, 0, 0]]),
        "depth": np.array([[4.0, 3.0, 0, 0]]),
        "plane": np.array([[7.5, 0.0, 0.5]]),
    }
    out = render_scenes(albedo, labels, params)
    overlap = (slice(28, 36), slice(28, 36))  # both squares cover it
    assert (out["segment"][0][overlap] == 7).all()  # item 1 is nearer (3 < 4)
    assert np.allclose(out["depth"][0][overlap], 3.0 - RELIEF, atol=0.05)
    assert (out["segment"][0][14:18, 14:18] == 3).all()  # only item 0 there
    params["depth"] = np.array([[3.0, 4.0, 0, 0]])
    swapped = render_scenes(albedo, labels, params)
    assert (swapped["segment"][0][overlap] == 3).all()
    assert (out["segment"][0][60:, :8] == BACKGROUND).all()
    # Flat tops face the camera; the floor plane tilts up (positive y component).
    assert np.allclose(out["normal"][0][:, 30, 30], [0, 0, 1], atol=1e-3)
    assert out["normal"][0][1, 62, 2] > 0.4
    assert out["has"][0].tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]


def test_has_attributes_follow_visible_pixels(fashion_dir):
    ds = small(fashion_dir)
    seg = ds.targets["segment"]
    for c, task in enumerate(ds.attribute_tasks):
        visible = (seg == c).flatten(1).sum(1) >= MIN_VISIBLE
        assert torch.equal(ds.targets[task].bool(), visible)
    present = torch.stack([ds.targets[t] for t in ds.attribute_tasks], 1).sum(1)
    assert present.min() >= 1


def test_test_scenes_are_rendered_from_test_images(fashion_dir):
    ds = small(fashion_dir, "test")
    images, labels = load_fashion_mnist("test", fashion_dir)
    layout = dict(ds.layout, depth=ds.layout["item_depth"])
    del layout["item_depth"]
    again = render_scenes(images.astype(np.float32) / 255, labels, layout)
    np.testing.assert_allclose(again["image"], ds.images[:, 0].numpy(), atol=1e-3)
    np.testing.assert_array_equal(again["segment"], ds.targets["segment"].numpy())
    assert ds.layout["source"].max() < 30


def test_deterministic_and_seed_dependent(fashion_dir):
    a = small(fashion_dir, seed=3, cache=False)
    b = small(fashion_dir, seed=3, cache=False)
    c = small(fashion_dir, seed=4, cache=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets["depth"], b.targets["depth"])
    assert not torch.equal(a.images, c.images)
    train = small(fashion_dir, "train", seed=3, cache=False)
    test = small(fashion_dir, "test", seed=3, cache=False)
    assert not np.array_equal(train.layout["scale"][:24], test.layout["scale"])


def test_cache_hit_matches_fresh(fashion_dir):
    fresh = small(fashion_dir, seed=9, cache=False)
    small(fashion_dir, seed=9)
    cached = small(fashion_dir, seed=9)
    for task in ("segment", "depth", "normal", "has_bag"):
        assert torch.equal(fresh.targets[task], cached.targets[task])
    assert torch.equal(fresh.images, cached.images)


def test_unknown_split(fashion_dir):
    with pytest.raises(ValueError, match="split"):
        FashionScenes("val", root=fashion_dir)


def test_real_fashion_scenes(real_fashion_dir):
    ds = FashionScenes("test", n_test=200, seed=0, root=real_fashion_dir, cache=False)
    seg = ds.targets["segment"]
    assert (seg != BACKGROUND).float().mean() > 0.15  # items take a real share of the canvas
    assert len(torch.unique(seg)) == 11
    assert (ds.targets["normal"].norm(dim=1) - 1).abs().max() < 2e-3
    has = torch.stack([ds.targets[t] for t in ds.attribute_tasks], 1)
    assert 0.1 < has.mean() < 0.4 and (has.sum(0) > 0).all()
