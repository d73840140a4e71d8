"""Fashion-MNIST idx parsing and file lookup, on tiny files in the real format."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from fashion_fixtures import make_fashion_dir, require_real_fashion, write_idx

from mtnorm.data import FASHION_CLASSES, FashionMNISTError, load_fashion_mnist, read_idx
from mtnorm.data.fashion import DEBIAN_DIR, find_fashion_dir


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip(tmp_path, suffix):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"x-idx3-ubyte{suffix}", array)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_plain_and_gz_folders_give_same_arrays(tmp_path):
    gz = load_fashion_mnist("test", make_fashion_dir(tmp_path / "a", gz=True))
    plain = load_fashion_mnist("test", make_fashion_dir(tmp_path / "b", gz=False))
    for x, y in zip(gz, plain, strict=True):
        np.testing.assert_array_equal(x, y)
    assert gz[0].shape == (30, 28, 28) and gz[1].shape == (30,)


def test_bad_magic_names_file(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + b"abc")  # float code
    with pytest.raises(FashionMNISTError, match="bad magic") as err:
        read_idx(path)
    assert str(path) in str(err.value) and "apt-get install dataset-fashion-mnist" in str(err.value)


def test_size_mismatch_is_reported(tmp_path):
    path = write_idx(tmp_path / "short-idx1-ubyte", np.zeros(10, np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FashionMNISTError, match=r"header says \(10,\) = 10 bytes.*has 7"):
        read_idx(path)


def test_truncated_gzip_is_reported(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte.gz", np.ones((5, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(FashionMNISTError, match="cannot read") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_not_gzip_with_gz_suffix(tmp_path):
    path = tmp_path / "junk-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(FashionMNISTError, match="MTNORM_FASHION_DIR"):
        read_idx(path)


def test_missing_file_says_how_to_get_it(tmp_path):
    folder = make_fashion_dir(tmp_path / "f")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("test", folder)
    text = str(err.value)
    assert "t10k-labels-idx1-ubyte" in text
    assert "apt-get install dataset-fashion-mnist" in text and "MTNORM_FASHION_DIR" in text


def test_image_label_count_mismatch(tmp_path):
    folder = make_fashion_dir(tmp_path / "f")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(FashionMNISTError, match="30 images but .* 7 labels"):
        load_fashion_mnist("test", folder)


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MTNORM_FASHION_DIR", raising=False)
    assert find_fashion_dir() == DEBIAN_DIR
    monkeypatch.setenv("MTNORM_FASHION_DIR", str(tmp_path / "env"))
    assert find_fashion_dir() == tmp_path / "env"
    assert find_fashion_dir(tmp_path / "arg") == tmp_path / "arg"


def test_env_dir_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MTNORM_FASHION_DIR", str(make_fashion_dir(tmp_path / "env", n_test=12)))
    images, labels = load_fashion_mnist("test")
    assert images.shape == (12, 28, 28) and labels.tolist()[:3] == [0, 1, 2]


def test_gzip_header_layout_matches_real_files(tmp_path):
    # The header we write is what the real files hold: magic 0x00000803, then N, 28, 28.
    path = write_idx(tmp_path / "h-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    head = gzip.decompress(path.read_bytes())[:16]
    assert head == bytes.fromhex("00000803") + bytes.fromhex("00000003 0000001c 0000001c")


def test_real_fashion_mnist(real_fashion_dir):
    images, labels = load_fashion_mnist("train", real_fashion_dir)
    test_images, test_labels = load_fashion_mnist("test", real_fashion_dir)
    assert images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert len(FASHION_CLASSES) == 10 and FASHION_CLASSES[9] == "ankle_boot"


def test_real_data_fails_under_ci_and_skips_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("MTNORM_FASHION_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install dataset-fashion-mnist"):
        require_real_fashion()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not found"):
        require_real_fashion()
    monkeypatch.setenv("MTNORM_FASHION_DIR", str(make_fashion_dir(tmp_path / "ok")))
    assert require_real_fashion() == tmp_path / "ok"
