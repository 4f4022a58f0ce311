"""Model families. Importing this package registers every model."""

from ._base import GraphNet
from ._convert import convert_torchvision_state_dict, load_torchvision_state_dict, torchvision_reference
from .mobilenetv2 import MobileNetV2
from .randwire import RandWire, SepConvNode
from .regnet import REGNET_PARAMS, RegNet
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "GraphNet",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "MobileNetV2",
    "RegNet",
    "RandWire",
    "SepConvNode",
    "REGNET_PARAMS",
    "convert_torchvision_state_dict",
    "load_torchvision_state_dict",
    "torchvision_reference",
]
