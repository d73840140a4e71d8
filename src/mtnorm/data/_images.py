"""Image file reading without extra dependencies: PIL (ships with matplotlib) when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def read_image(path: str | Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image as float [3,H,W] in [0,1], bilinearly resized to ``size`` (int = square)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib depends on pillow
        import matplotlib.image as mpimg

        array = np.asarray(mpimg.imread(path), dtype=np.float32)
        array = array / 255.0 if array.max() > 1.0 else array
        tensor = _rgb(torch.from_numpy(array))
        if size is not None:
            tensor = _resize(tensor, size)
        return tensor
    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else size
            img = img.resize((w, h), Image.BILINEAR)
        array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _rgb(array: torch.Tensor) -> torch.Tensor:
    if array.dim() == 2:
        array = array[..., None].expand(-1, -1, 3)
    return array[..., :3].permute(2, 0, 1).contiguous()


def _resize(tensor: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    hw = (size, size) if isinstance(size, int) else size
    return torch.nn.functional.interpolate(tensor[None], size=hw, mode="bilinear")[0]
