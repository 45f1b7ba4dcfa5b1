"""BlockDrop as a Gymnasium environment: choose which residual blocks of a ResNet to run per image."""

from blockdrop_env.errors import BlockDropError, CheckpointError, ConfigError, DatasetError
from blockdrop_env.resnet import (
    BlockDropResNet,
    CifarResNet,
    FlopsTable,
    ImageNetResNet,
    Normalization,
    build_resnet,
)

__all__ = [
    "BlockDropError",
    "BlockDropResNet",
    "CheckpointError",
    "CifarResNet",
    "ConfigError",
    "DatasetError",
    "FlopsTable",
    "ImageNetResNet",
    "Normalization",
    "build_resnet",
]

__version__ = "0.1.0"
