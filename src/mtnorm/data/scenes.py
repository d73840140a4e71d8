"""FashionScenes: an NYUv2-like dense multi-task benchmark built from Fashion-MNIST items.

Each 64x64 grayscale scene is a small 2.5-D world seen by an orthographic camera (x right, y up,
z toward the viewer; depth = distance along the view ray, larger is farther; 1 pixel = 1/16 of a
depth unit):

* background: a tilted plane ``z_bg = c + g_x X + g_y Y`` (X, Y in depth units from the canvas
  centre), c ~ U(7.5, 8.5), g_x ~ U(-0.4, 0.4), g_y ~ U(0.3, 0.8) so the top recedes like a floor;
* 2 to 4 items (distinct source images of the split), each scaled by s ~ U(0.8, 1.5) and centred
  at a uniform position in [12, 52]^2 pixels; item k is the surface
  ``z_k(x, y) = d_k - h B_k(x, y)`` with base depth d_k ~ U(2, 5), relief h = 0.4 and B_k the
  bilinear interpolation of the item's intensities blurred with a Gaussian (σ = 1 source pixel),
  so the item's height follows its pixel intensities. The item covers pixels where B_k > 0.12;
* occlusion: each pixel shows the nearest surface (smallest depth) among background and items;
* normals come from the analytic gradient of each surface (the plane's (g_x, g_y), the bilinear
  patch's exact derivative for items), n = (∂z/∂X, ∂z/∂Y, 1) / ‖·‖ in the (x right, y up, z toward
  viewer) frame, so they are exact even where the composited depth map is discontinuous;
* image: Lambertian shading from the fixed light direction l ∝ (-0.5, 0.6, 0.8),
  ``I = albedo · (0.25 + 0.75 max(0, n·l)) · exp(-0.12 (z - 2))``, the last factor an
  atmospheric falloff so brightness also carries depth; albedo = 0.3 + 0.7·intensity on items,
  0.7 on the background.

Tasks: ``segment`` (11 classes: the 10 Fashion-MNIST classes keep their labels 0..9, background is
10), ``depth`` [1,H,W], ``normal`` [3,H,W] unit vectors, and ``has_<class>`` binary attributes
(1 when at least ``MIN_VISIBLE`` = 16 pixels of that class are visible). Test scenes use only
Fashion-MNIST test images. Generation is vectorized over scenes (chunks of 512) and item slots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset

from mtnorm.data._generated import generated_split
from mtnorm.data.fashion import FASHION_CLASSES

SIZE = 64
MAX_ITEMS = 4
BACKGROUND = 10
NUM_SEGMENT_CLASSES = 11
MIN_VISIBLE = 16
PIXELS_PER_UNIT = 16.0
RELIEF = 0.4
COVER = 0.12
# Python floats, not a float64 array: numpy scalars would promote the float32 maps to float64.
_L = np.array([-0.5, 0.6, 0.8])
LIGHT: tuple[float, ...] = tuple(float(v) for v in _L / np.linalg.norm(_L))
ATTRIBUTE_TASKS: tuple[str, ...] = tuple(f"has_{c}" for c in FASHION_CLASSES)
SCENE_TASKS: tuple[str, ...] = ("segment", "depth", "normal", *ATTRIBUTE_TASKS)
_VERSION = 3


def _distinct_sources(rng: np.random.Generator, n: int, n_source: int) -> np.ndarray:
    """[n, 4] source indices, distinct within each row (redraw only the rows that collide)."""
    if n_source < MAX_ITEMS:
        raise ValueError(f"need at least {MAX_ITEMS} source images, got {n_source}")
    source = rng.integers(0, n_source, size=(n, MAX_ITEMS))
    while True:
        ordered = np.sort(source, axis=1)
        clash = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if clash.size == 0:
            return source
        source[clash] = rng.integers(0, n_source, size=(clash.size, MAX_ITEMS))


def sample_scene_params(rng: np.random.Generator, n: int, n_source: int) -> dict[str, np.ndarray]:
    """Random layout of ``n`` scenes drawing items from ``n_source`` images (arrays [n, 4])."""
    count = rng.integers(2, MAX_ITEMS + 1, size=n)
    active = np.arange(MAX_ITEMS)[None, :] < count[:, None]
    source = _distinct_sources(rng, n, n_source)
    source = np.where(active, source, -1)
    scale = rng.uniform(0.8, 1.5, size=(n, MAX_ITEMS))
    centre = rng.uniform(12, SIZE - 12, size=(n, MAX_ITEMS, 2))
    return {
        "source": source.astype(np.int64),
        "scale": scale,
        "top": centre[..., 0] - 14 * scale,
        "left": centre[..., 1] - 14 * scale,
        "depth": rng.uniform(2.0, 5.0, size=(n, MAX_ITEMS)),
        "plane": np.stack(
            [rng.uniform(7.5, 8.5, n), rng.uniform(-0.4, 0.4, n), rng.uniform(0.3, 0.8, n)], axis=1
        ),
    }


def _interp_matrix(coords: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation weights [P,S,length] sampling a zero-padded axis at ``coords`` [P,S].

    Returns the weights and their derivative with respect to the coordinate. Resampling an
    axis-aligned scaled item is separable, so a 2-D bilinear lookup is two small matmuls.
    """
    p, s = coords.shape
    c = np.clip(coords + 1.0, 0.0, length + 1 - 1e-4)  # +1: index 0 is the zero padding
    c0 = np.floor(c).astype(np.int64)
    frac = (c - c0).astype(np.float32)
    weights = np.zeros((p, s, length + 2), dtype=np.float32)
    deriv = np.zeros_like(weights)
    np.put_along_axis(weights, c0[..., None], (1 - frac)[..., None], axis=2)
    np.put_along_axis(weights, c0[..., None] + 1, frac[..., None], axis=2)
    np.put_along_axis(deriv, c0[..., None], -1.0, axis=2)
    np.put_along_axis(deriv, c0[..., None] + 1, 1.0, axis=2)
    inside = ((coords > -1) & (coords < length)).astype(np.float32)[..., None]
    return weights[..., 1:-1], (deriv * inside)[..., 1:-1]


def _bilinear(
    images: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``images`` [P,C,h,w] on the grid ``rows`` [P,H] x ``cols`` [P,W]; zero outside.

    Returns the values [P,C,H,W] and the exact derivatives of the last channel along rows and
    along columns [P,H,W] (the bilinear patch's gradient).
    """
    wr, dr = _interp_matrix(rows, images.shape[2])
    wc, dc = _interp_matrix(cols, images.shape[3])
    wc_t = np.ascontiguousarray(wc.transpose(0, 2, 1))
    along_rows = wr[:, None] @ images  # [P,C,H,w]
    values = along_rows @ wc_t[:, None]
    d_row = (dr @ images[:, -1]) @ wc_t
    d_col = along_rows[:, -1] @ dc.transpose(0, 2, 1)
    return values, d_row, d_col


def render_scenes(
    albedo: np.ndarray, labels: np.ndarray, params: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Render scenes from source items ``albedo`` [M,28,28] in [0,1] and their ``labels`` [M].

    ``params`` as from :func:`sample_scene_params` (slots with source -1 are empty). Returns
    ``image`` [n,64,64], ``segment`` uint8, ``depth`` float32, ``normal`` [n,3,64,64] and
    ``has`` [n,10] uint8.
    """
    source = params["source"]
    n, k = source.shape
    f32 = {key: np.asarray(value, dtype=np.float32) for key, value in params.items()}
    active = source >= 0
    idx = np.where(active, source, 0)
    items = albedo[idx].reshape(n * k, 28, 28).astype(np.float32)
    heights = gaussian_filter(items, sigma=(0, 1.0, 1.0), mode="constant")
    scale = f32["scale"].reshape(-1, 1)
    pix = np.arange(SIZE, dtype=np.float32) + 0.5
    # Canvas pixel centre -> source pixel coordinates of every item slot.
    rows = (pix[None, :] - f32["top"].reshape(-1, 1)) / scale - 0.5
    cols = (pix[None, :] - f32["left"].reshape(-1, 1)) / scale - 0.5
    both, dh_row, dh_col = _bilinear(np.stack([items, heights], axis=1), rows, cols)
    shape = (n, k, SIZE, SIZE)
    tex, height = both[:, 0].reshape(shape), both[:, 1].reshape(shape)
    dh_row, dh_col = dh_row.reshape(shape), dh_col.reshape(shape)
    covered = (height > COVER) & active[:, :, None, None]
    item_z = f32["depth"][:, :, None, None] - RELIEF * height
    # d/dX and d/dY in depth units; rows grow downward while Y grows upward.
    per_unit = (RELIEF * PIXELS_PER_UNIT / f32["scale"])[:, :, None, None]
    item_zx = -per_unit * dh_col
    item_zy = per_unit * dh_row
    item_alb = 0.3 + 0.7 * tex

    coord = (pix - SIZE / 2) / PIXELS_PER_UNIT
    plane = f32["plane"][:, :, None, None]
    depth = plane[:, 0] + plane[:, 1] * coord[None, None, :] - plane[:, 2] * coord[None, :, None]
    zx = np.broadcast_to(plane[:, 1], (n, SIZE, SIZE)).copy()
    zy = np.broadcast_to(plane[:, 2], (n, SIZE, SIZE)).copy()
    alb = np.full((n, SIZE, SIZE), 0.7, dtype=np.float32)
    segment = np.full((n, SIZE, SIZE), BACKGROUND, dtype=np.uint8)
    slot_class = np.broadcast_to(labels[idx].astype(np.uint8)[:, :, None, None], shape)
    # Z-buffer over the (at most 4) slots: a slot wins a pixel where it covers it and is nearer.
    for j in range(k):
        nearer = covered[:, j] & (item_z[:, j] < depth)
        for dst, src in ((depth, item_z), (zx, item_zx), (zy, item_zy), (alb, item_alb)):
            np.copyto(dst, src[:, j], where=nearer)
        np.copyto(segment, slot_class[:, j], where=nearer)
    inv = 1.0 / np.sqrt(zx * zx + zy * zy + 1.0)
    normal = np.stack([zx * inv, zy * inv, inv], axis=1)
    lx, ly, lz = LIGHT
    lambert = np.clip((lx * zx + ly * zy + lz) * inv, 0.0, None)
    image = alb * (0.25 + 0.75 * lambert) * np.exp(-0.12 * (depth - 2.0))

    flat_seg = segment.reshape(n, -1).astype(np.int64) + NUM_SEGMENT_CLASSES * np.arange(n)[:, None]
    counts = np.bincount(flat_seg.ravel(), minlength=n * NUM_SEGMENT_CLASSES)
    has = counts.reshape(n, NUM_SEGMENT_CLASSES)[:, :BACKGROUND] >= MIN_VISIBLE
    return {
        "image": np.clip(image, 0, 1).astype(np.float32),
        "segment": segment,
        "depth": depth,
        "normal": normal.astype(np.float32),
        "has": has.astype(np.uint8),
    }


def make_scenes(
    images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, chunk: int = 512
) -> dict[str, np.ndarray]:
    """Generate ``n`` scenes from one split's uint8 ``images`` [M,28,28] and ``labels`` [M].

    Besides the rendered arrays, returns the layout (``source``, ``scale``, ``top``, ``left``,
    ``item_depth``, ``plane``), ``source`` indexing the given split.
    """
    params = sample_scene_params(rng, n, len(images))
    albedo = images.astype(np.float32) / 255.0
    parts = []
    for start in range(0, n, chunk):  # chunks bound memory to ~chunk * 4 * 64 * 64 per array
        sub = {key: value[start : start + chunk] for key, value in params.items()}
        parts.append(render_scenes(albedo, labels, sub))
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out["image"] = out["image"].astype(np.float16)
    out["normal"] = out["normal"].astype(np.float16)
    out.update({("item_depth" if key == "depth" else key): v for key, v in params.items()})
    return out


class FashionScenes(Dataset):
    """FashionScenes split as a torch Dataset and as whole-split tensors (recipe: module doc).

    ``ds[i]`` is ``(image float [1,64,64], targets)`` with targets ``segment`` long [64,64],
    ``depth`` float [1,64,64], ``normal`` float [3,64,64] and ``has_<class>`` float scalars
    (0/1, ready for BCE). ``ds.images`` [N,1,64,64] and ``ds.targets`` (same keys, batch first)
    hold the whole split (float32 maps, int64 segment: about 112 KB per scene, 0.9 GB for the
    default 8,000 train scenes); ``ds.layout`` holds the generating parameters (``source``
    indexes the split's own images).
    """

    tasks = SCENE_TASKS
    dense_tasks: tuple[str, ...] = ("segment", "depth", "normal")
    attribute_tasks = ATTRIBUTE_TASKS
    classes = (*FASHION_CLASSES, "background")
    in_channels = 1
    image_size = (SIZE, SIZE)

    def __init__(
        self,
        split: str = "train",
        n_train: int = 8_000,
        n_test: int = 2_000,
        seed: int = 0,
        root: str | Path | None = None,
        cache: bool = True,
    ) -> None:
        arrays = generated_split(
            f"fashionscenes-v{_VERSION}", split, n_train, n_test, seed, root, cache, make_scenes
        )
        self.split = split
        self.images = torch.from_numpy(arrays["image"].astype(np.float32)).unsqueeze(1)
        has = torch.from_numpy(arrays["has"].astype(np.float32))
        self.targets: dict[str, torch.Tensor] = {
            "segment": torch.from_numpy(arrays["segment"].astype(np.int64)),
            "depth": torch.from_numpy(arrays["depth"]).unsqueeze(1),
            "normal": torch.from_numpy(arrays["normal"].astype(np.float32)),
            **{task: has[:, i] for i, task in enumerate(ATTRIBUTE_TASKS)},
        }
        self.layout = {
            key: arrays[key] for key in ("source", "scale", "top", "left", "item_depth", "plane")
        }

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images[i], {task: value[i] for task, value in self.targets.items()}

    @classmethod
    def task_specs(cls, tasks: tuple[str, ...] | None = None) -> dict:
        """Per-task head/loss/metric description for trainers (see mtnorm.data.spec)."""
        from mtnorm.data.spec import fashion_scenes_specs

        return fashion_scenes_specs(tasks)
