"""Backbones, heads and the registry of multi-task methods built on them."""

from mtnorm.models.factory import NORM_KINDS, norm_layer
from mtnorm.models.lenet import LeNetEncoder, linear_heads
from mtnorm.models.lora import LoRALinear, add_lora, lora_parameters, merge_lora
from mtnorm.models.methods import (
    MultiTaskNet,
    SingleTaskNets,
    UnknownMethodError,
    available_methods,
    build_method,
    count_parameters,
    default_norm_lr_mult,
    register_method,
)
from mtnorm.models.resnet import ResNet18, ResNet50
from mtnorm.models.segnet import DenseHead, PooledHead, SegNet
from mtnorm.models.segnet_mtan import MTANSegNet
from mtnorm.models.toy import ToyEncoder, make_toy
from mtnorm.models.vit import timm_backbone

__all__ = [
    "NORM_KINDS",
    "DenseHead",
    "LeNetEncoder",
    "LoRALinear",
    "MTANSegNet",
    "MultiTaskNet",
    "PooledHead",
    "ResNet18",
    "ResNet50",
    "SegNet",
    "SingleTaskNets",
    "ToyEncoder",
    "UnknownMethodError",
    "add_lora",
    "available_methods",
    "build_method",
    "count_parameters",
    "default_norm_lr_mult",
    "linear_heads",
    "lora_parameters",
    "make_toy",
    "merge_lora",
    "norm_layer",
    "register_method",
    "timm_backbone",
]
