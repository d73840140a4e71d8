"""LeNet-style encoder and classification heads for MultiFashion (36x36 grayscale, 2 tasks)."""

from __future__ import annotations

from torch import nn

from mtnorm.models.factory import norm_layer


def _conv_block(cin: int, cout: int, norm: str) -> nn.Sequential:
    # bias is redundant before a norm that re-centres; kept only without one
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=5, bias=norm == "none"),
        norm_layer(norm, cout, dims=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class LeNetEncoder(nn.Sequential):
    """Two 5x5 conv blocks (conv, norm, ReLU, max-pool) and a two-layer MLP with norms.

    Args:
        in_channels: image channels.
        width: channels of the first conv; the second has ``2 * width``.
        hidden: width of both MLP layers (the representation the heads read).
        image_size: input side length (36 for MultiFashion).
        norm: the kind handed to :func:`~mtnorm.models.factory.norm_layer`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        hidden: int = 128,
        image_size: int = 36,
        norm: str = "bn",
    ) -> None:
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for two 5x5 conv + pool blocks")
        super().__init__(
            _conv_block(in_channels, width, norm),
            _conv_block(width, 2 * width, norm),
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden, bias=norm == "none"),
            norm_layer(norm, hidden, dims=1),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=norm == "none"),
            norm_layer(norm, hidden, dims=1),
            nn.ReLU(inplace=True),
        )
        self.out_features = hidden


def linear_heads(tasks: list[str] | tuple[str, ...], in_features: int, classes: int) -> dict[str, nn.Module]:
    """One linear classifier per task."""
    return {t: nn.Linear(in_features, classes) for t in tasks}
