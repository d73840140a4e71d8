"""Render a grid of FashionScenes samples with their dense targets to docs/img/fashion_scenes.png.

Usage: python benchmarks/plot_scenes.py [--out PATH] [--n 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtnorm.data.fashion import load_fashion_mnist  # noqa: E402
from mtnorm.data.scenes import BACKGROUND, FASHION_CLASSES, make_scenes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/fashion_scenes.png"))
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images, labels = load_fashion_mnist("test")
    start = time.perf_counter()
    scenes = make_scenes(images, labels, args.n, np.random.default_rng(args.seed))
    print(f"rendered {args.n} scenes in {time.perf_counter() - start:.2f} s")

    colours = plt.get_cmap("tab10")(np.arange(10))[:, :3]
    palette = np.vstack([colours, [[0.12, 0.12, 0.12]]])  # background = dark grey
    rows = ("image", "segment", "depth", "normal")
    fig, axes = plt.subplots(len(rows), args.n, figsize=(1.9 * args.n, 1.95 * len(rows)))
    for j in range(args.n):
        seg = scenes["segment"][j]
        axes[0, j].imshow(scenes["image"][j].astype(np.float32), cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(palette[seg], interpolation="nearest")
        axes[2, j].imshow(scenes["depth"][j], cmap="magma_r", vmin=1.5, vmax=11)
        normal = scenes["normal"][j].astype(np.float32).transpose(1, 2, 0)
        axes[3, j].imshow((normal + 1) / 2)
        present = [FASHION_CLASSES[c] for c in np.unique(seg) if c != BACKGROUND]
        axes[0, j].set_title("\n".join(present), fontsize=7)
    for i, name in enumerate(rows):
        axes[i, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "FashionScenes: image, segment (10 classes + background), depth (dark = far), "
        "normal (RGB = xyz/2 + 1/2)",
        fontsize=9,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
