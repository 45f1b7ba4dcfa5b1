"""BlockDrop as a Gymnasium environment: choose which residual blocks of a ResNet to run per image.

Importing the package registers the environment id ``BlockDrop-v0`` with Gymnasium.
"""

from blockdrop_env.checkpoints import (
    CHECKPOINT_FORMATS,
    LoadedResNet,
    detect_format,
    load_resnet,
    save_resnet,
)
from blockdrop_env.data import ImageDataset, load_dataset
from blockdrop_env.env import BlockDropEnv
from blockdrop_env.errors import BlockDropError, CheckpointError, ConfigError, DatasetError
from blockdrop_env.registration import ENV_ID, register_envs
from blockdrop_env.resnet import (
    BlockDropResNet,
    CifarResNet,
    FlopsTable,
    ImageNetResNet,
    Normalization,
    build_resnet,
)
from blockdrop_env.rewards import BlockUsageReward, FlopsReward, RewardFunction
from blockdrop_env.vector_env import BlockDropVectorEnv

register_envs()

__all__ = [
    "CHECKPOINT_FORMATS",
    "ENV_ID",
    "BlockDropEnv",
    "BlockDropError",
    "BlockDropResNet",
    "BlockDropVectorEnv",
    "BlockUsageReward",
    "CheckpointError",
    "CifarResNet",
    "ConfigError",
    "DatasetError",
    "FlopsReward",
    "FlopsTable",
    "ImageDataset",
    "ImageNetResNet",
    "LoadedResNet",
    "Normalization",
    "RewardFunction",
    "build_resnet",
    "detect_format",
    "load_dataset",
    "load_resnet",
    "register_envs",
    "save_resnet",
]

__version__ = "0.1.0"
