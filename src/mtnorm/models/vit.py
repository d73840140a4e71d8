"""timm vision transformers (ViT-S, Swin-T, ...) as dense multi-task backbones.

The paper's transformer experiments (Table 3: ViT-S on PascalContext, 5 tasks, whole model
fine-tuned; Table 4: Swin-T on PascalContext, 4 tasks, frozen backbone with TSσBN and optionally
shared LoRA of rank 16) replace every LayerNorm by a task-specific σLN. In mtnorm that is the
``tssbn`` method on a :func:`timm_backbone`, since ``tssbn`` converts with ``norm="sigma"`` and
LayerNorms become :class:`~mtnorm.TaskSigmoidLayerNorm` (timm's own ``LayerNorm`` classes are
registered converters)::

    from mtnorm.models import DenseHead, build_method
    from mtnorm.models.lora import add_lora
    from mtnorm.models.vit import timm_backbone

    def vit(norm):  # the factory's norm argument is unused: tssbn converts the LayerNorms itself
        return timm_backbone("vit_small_patch16_224", img_size=512, pretrained_path="vit_s.pth")

    heads = {t: DenseHead(384, out) for t, out in outputs.items()}   # on the [B, 384, H/16, W/16] map
    model = build_method("tssbn", vit, tasks, heads)                  # Table 3: TSσBN, full fine-tuning
    model = build_method("tssbn", lambda norm: add_lora(vit(norm), 16), tasks, heads)  # TSσBN (r=16)

With :func:`~mtnorm.models.lora.add_lora` (``freeze_rest=True``) the trainable parameters are the
shared adapters, the task σLN and the heads; :func:`mtnorm.param_groups` gives the σLN their
``layernorm_lr_mult`` (10). For Swin-T without LoRA ("TSσBN" of Table 4, frozen backbone), freeze
the backbone's non-norm parameters yourself before ``convert`` (the norms and heads stay trainable).

The YAML route: ``model.backbone: vit_s`` or ``swin_t`` on the dense benchmarks (``nyuv2``,
``cityscapes``) builds these for the data's image size, with ``model.checkpoint`` for the weights
and ``model.lora_rank`` for the adapters. mtnorm ships no PascalContext loader; for it, register a
benchmark whose ``backbone`` is a factory like ``vit`` above::

    from mtnorm.train.benchmarks import BENCHMARKS, Benchmark
    BENCHMARKS["pascal_context"] = lambda cfg: Benchmark("pascal_context", tasks, specs, load, vit, heads)

and set ``data.name: pascal_context`` (``configs/pascal_vit_s.yaml`` has the protocol). Leave
``model.checkpoint`` unset: give the weights to :func:`timm_backbone` (``pretrained_path``), which
loads them before adapters and task norms change the parameter names.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

FEATURES = ("map", "tokens")


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            "mtnorm.models.vit needs timm for its transformer backbones: pip install timm "
            "(or install mtnorm with the 'integrations' extra)"
        ) from e
    return timm


class TimmBackbone(nn.Module):
    """A timm model's ``forward_features`` as a multi-task encoder.

    ``features="map"``: a feature map ``[B, C, H / reduction, W / reduction]`` for dense heads; for
    ViT-like models (token sequences) the class / prefix tokens are dropped and the patch tokens
    reshaped to the patch grid, for NHWC models (Swin) the map is permuted to NCHW, and NCHW maps
    (CNNs) pass as they are. ``features="tokens"``: a token sequence ``[B, L, C]``: the ViT's
    ``forward_features`` output as it is (prefix tokens first), a map flattened row by row.

    ``out_channels`` is the feature width (384 for ViT-S, 768 for Swin-T) and ``reduction`` the
    output stride (16 for ViT-S/16, 32 for Swin-T). The timm model is ``self.model``.
    """

    def __init__(self, model: nn.Module, features: str = "map") -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features must be one of {list(FEATURES)}, got {features!r}")
        self.model = model
        self.features = features
        self.out_channels = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
        info = getattr(model, "feature_info", None)
        self.reduction = int(info[-1]["reduction"]) if info else None
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.output_fmt = str(getattr(model, "output_fmt", "NCHW"))

    def load_pretrained(self, path: str | Path) -> None:
        """Load timm weights saved as a local state dict into ``self.model`` (:func:`load_pretrained`:
        position embeddings resampled to this model's input size); the trainer calls it for
        ``model.checkpoint``, where a plain ``load_state_dict`` would refuse the resized tables."""
        load_pretrained(self.model, path)

    def _grid(self, x: torch.Tensor, tokens: int) -> tuple[int, int]:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        embed = getattr(self.model, "patch_embed", None)
        if embed is not None and hasattr(embed, "dynamic_feat_size"):
            h, w = embed.dynamic_feat_size(size)
        elif self.reduction:
            h, w = size[0] // self.reduction, size[1] // self.reduction
        else:
            h = w = int(round(tokens**0.5))
        if h * w != tokens:
            raise ValueError(
                f"{type(self.model).__name__}: {tokens} patch tokens do not form the {h}x{w} grid of a "
                f"{size[0]}x{size[1]} input; use features='tokens'"
            )
        return int(h), int(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{type(self.model).__name__}.forward_features returned {type(y).__name__}")
        if y.dim() == 3:  # [B, prefix + N, C]
            if self.features == "tokens":
                return y
            patches = y[:, self.num_prefix_tokens :]
            h, w = self._grid(x, patches.shape[1])
            return patches.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)
        if y.dim() != 4:
            raise ValueError(f"unexpected forward_features output of shape {tuple(y.shape)}")
        if self.output_fmt == "NHWC":
            y = y.permute(0, 3, 1, 2)
        return y.flatten(2).transpose(1, 2) if self.features == "tokens" else y.contiguous()

    def extra_repr(self) -> str:
        return f"features={self.features!r}, out_channels={self.out_channels}, reduction={self.reduction}"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"pretrained_path {path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load user-given weights into a timm ``model`` (never downloads anything).

    The checkpoint is adapted by the model family's own ``checkpoint_filter_fn`` where timm has one
    (position embeddings resampled to ``img_size``, Swin's relative-position tables resized, ...);
    classifier weights are dropped (the backbone has no classifier); any other missing or
    unexpected key is an error that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained_path: no file at {path} (pretrained weights are user-provided; mtnorm never "
            "downloads them)"
        )
    state = _read_state(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        state = filter_fn(state, model)
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(n + ".") for n in names)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"pretrained_path {path} does not fit {type(model).__name__}: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5])
        raise ValueError(f"pretrained_path {path}: shapes differ from the model's: {detail}")
    model.load_state_dict(state)
    return model


def timm_backbone(
    name: str,
    *,
    features: str = "map",
    pretrained_path: str | Path | None = None,
    img_size: int | tuple[int, int] | None = None,
    **timm_kwargs: Any,
) -> TimmBackbone:
    """A timm model (``pretrained=False, num_classes=0``) as a :class:`TimmBackbone`.

    Args:
        name: a timm model name, e.g. ``"vit_small_patch16_224"`` (ViT-S/16) or
            ``"swin_tiny_patch4_window7_224"`` (Swin-T).
        features: ``"map"`` (``[B, C, H/16, W/16]`` for ViT-S/16, ``[B, C, H/32, W/32]`` for
            Swin-T) or ``"tokens"`` (see :class:`TimmBackbone`).
        pretrained_path: a local state dict of the same architecture (e.g. timm's ImageNet
            weights, saved by the user); loaded by :func:`load_pretrained`. Nothing is ever
            downloaded: without it the model is randomly initialized.
        img_size: the input size the model is built for (ViT's position embeddings, Swin's windows).
        timm_kwargs: passed to ``timm.create_model`` (``depth``, ``drop_path_rate``, ...);
            ``pretrained`` and ``num_classes`` are fixed.
    """
    timm = _import_timm()
    for fixed in ("pretrained", "num_classes", "pretrained_cfg_overlay"):
        if fixed in timm_kwargs:
            raise ValueError(
                f"timm_backbone fixes {fixed!r} (pretrained=False, num_classes=0, nothing downloaded); "
                "pass local weights as pretrained_path"
            )
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return TimmBackbone(model, features)
