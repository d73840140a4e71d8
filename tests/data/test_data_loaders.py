"""Loaders for the standard layouts, each on a tiny fixture written in exactly that layout."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtnorm.data import (
    CelebA,
    Cityscapes,
    DatasetLayoutError,
    NYUv2,
    Office,
    load_office,
    load_qm9,
)
from mtnorm.data.office import office_task_specs


def write_mtan(root: Path, folders: dict[str, tuple], n: int = 3, h: int = 6, w: int = 8) -> Path:
    """MTAN-style ``<root>/{train,val}/<folder>/<i>.npy`` arrays with the given trailing shape."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder, (trailing, kind) in folders.items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (h, w, *trailing)
                if kind == "label":
                    array = rng.integers(-1, 13, size=shape).astype(np.float32)
                else:
                    array = rng.random(shape).astype(np.float32)
                np.save(root / split / folder / f"{i}.npy", array)
    return root


NYU = {
    "image": ((3,), "float"),
    "label": ((), "label"),
    "depth": ((1,), "float"),
    "normal": ((3,), "float"),
}


def test_nyuv2_items_are_chw(tmp_path):
    root = write_mtan(tmp_path / "nyuv2", NYU)
    ds = NYUv2(root, "train")
    assert len(ds) == 3 and ds.tasks == ("segmentation", "depth", "normal")
    image, t = ds[1]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    assert t["segmentation"].shape == (6, 8) and t["segmentation"].dtype == torch.long
    assert t["segmentation"].min() >= -1 and (t["segmentation"] == -1).any()
    assert t["depth"].shape == (1, 6, 8) and t["normal"].shape == (3, 6, 8)
    raw = np.load(root / "train" / "normal" / "1.npy")
    np.testing.assert_array_equal(t["normal"].numpy(), raw.transpose(2, 0, 1))
    assert len(NYUv2(root, "test")) == 3  # "test" is MTAN's val split
    assert NYUv2.task_specs()["segmentation"].num_outputs == 13


def test_nyuv2_missing_folder_shows_tree(tmp_path):
    root = write_mtan(tmp_path / "nyuv2", {k: v for k, v in NYU.items() if k != "normal"})
    with pytest.raises(FileNotFoundError) as err:
        NYUv2(root)
    text = str(err.value)
    assert isinstance(err.value, DatasetLayoutError)
    assert str(root / "train" / "normal") in text and "└── normal/0.npy" in text


def test_nyuv2_missing_file_is_named(tmp_path):
    root = write_mtan(tmp_path / "nyuv2", NYU)
    (root / "val" / "depth" / "2.npy").unlink()
    with pytest.raises(DatasetLayoutError, match=r"val/depth/2\.npy"):
        NYUv2(root, "val")


def test_nyuv2_wrong_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match="expected layout"):
        NYUv2(tmp_path / "nowhere")


def test_cityscapes(tmp_path):
    root = write_mtan(
        tmp_path / "cs", {"image": ((3,), "float"), "label_7": ((), "label"), "depth": ((1,), "f")}
    )
    ds = Cityscapes(root, "val")
    image, t = ds[0]
    assert set(t) == {"segmentation", "depth"} and image.shape == (3, 6, 8)
    assert t["depth"].shape == (1, 6, 8) and t["segmentation"].dtype == torch.long
    (root / "train" / "label_7").rename(root / "train" / "label")
    with pytest.raises(DatasetLayoutError, match="label_7"):
        Cityscapes(root, "train")


def write_celeba(root: Path, n: int = 6) -> tuple[Path, np.ndarray]:
    names = [f"Attr_{j}" for j in range(40)]
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(1)
    values = rng.choice([-1, 1], size=(n, 40))
    lines = [str(n), " ".join(names)]
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        pixels = np.full((20, 16, 3), 40 * i, np.uint8)
        Image.fromarray(pixels).save(root / "img_align_celeba" / name)
        lines.append(name + "  " + " ".join(f"{v:2d}" for v in values[i]))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    parts = [0, 0, 0, 1, 2, 2]
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{i + 1:06d}.jpg {parts[i]}\n" for i in range(n))
    )
    return root, values


def test_celeba(tmp_path):
    root, values = write_celeba(tmp_path / "celeba")
    train, test = CelebA(root, "train"), CelebA(root, "test")
    assert (len(train), len(CelebA(root, "val")), len(test)) == (3, 1, 2)
    assert len(train.tasks) == 40 and train.tasks[0] == "Attr_0"
    image, t = test[1]
    assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
    assert abs(image.mean().item() - 200 / 255) < 0.02  # 6th image was filled with 200
    np.testing.assert_array_equal(train.attributes.numpy(), (values[:3] > 0).astype(np.float32))
    assert t["Attr_5"].item() == float(values[5, 5] > 0)
    assert len(train.task_specs()) == 40


def test_celeba_missing_partition(tmp_path):
    root, _ = write_celeba(tmp_path / "celeba")
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="list_eval_partition.txt") as err:
        CelebA(root)
    assert "img_align_celeba/" in str(err.value)


def test_celeba_bad_attribute_values(tmp_path):
    root, _ = write_celeba(tmp_path / "celeba")
    path = root / "list_attr_celeba.txt"
    path.write_text(path.read_text().replace(" 1", " 0", 1))
    with pytest.raises(ValueError, match="-1, 1"):
        CelebA(root)


def write_office(root: Path) -> Path:
    (root / "data_txt" / "office-31").mkdir(parents=True)
    for d, domain in enumerate(("amazon", "dslr", "webcam")):
        folder = root / domain / "images" / "back_pack"
        folder.mkdir(parents=True)
        for split in ("train", "val", "test"):
            lines = []
            for i in range(2):
                rel = f"{domain}/images/back_pack/{split}_{i}.png"
                Image.fromarray(np.full((10, 12, 3), 30 * d + i, np.uint8)).save(root / rel)
                lines.append(f"{rel} {d + 10 * i}")
            (root / "data_txt" / "office-31" / f"{domain}_{split}.txt").write_text(
                "\n".join(lines) + "\n"
            )
    return root


def test_office_domains_are_tasks(tmp_path):
    root = write_office(tmp_path / "office")
    tasks = load_office(root, "office-31", "val", image_size=32)
    assert list(tasks) == ["amazon", "dslr", "webcam"]
    image, label = tasks["dslr"][1]
    assert image.shape == (3, 32, 32) and label.item() == 11
    assert abs(image.mean().item() * 255 - 31) < 1
    assert set(office_task_specs("office-31")) == {"amazon", "dslr", "webcam"}


def test_office_errors(tmp_path):
    root = write_office(tmp_path / "office")
    (root / "data_txt" / "office-31" / "webcam_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="webcam_test.txt") as err:
        Office(root, "office-31", "webcam", "test")
    assert "data_txt/" in str(err.value)
    (root / "data_txt" / "office-31" / "amazon_train.txt").write_text("just/a/path.jpg\n")
    with pytest.raises(ValueError, match="amazon_train.txt:1"):
        Office(root, "office-31", "amazon", "train")
    with pytest.raises(ValueError, match="domains"):
        Office(root, "office-31", "Art")


def test_qm9_without_torch_geometric_explains(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_pyg(name, *args, **kwargs):
        if name.startswith("torch_geometric"):
            raise ImportError("No module named 'torch_geometric'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyg)
    with pytest.raises(ImportError, match=r"pip install torch_geometric"):
        load_qm9(tmp_path / "qm9")
