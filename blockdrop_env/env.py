"""The single-image BlockDrop environment and the simulator it shares with the vector env.

:class:`BlockDropSimulator` contains what both environments need: the frozen ResNet, the images,
the reward function, the curriculum and the augmentation. It checks actions, forces the
curriculum's blocks on, runs one block-sparse forward for a batch and scores it.
:class:`BlockDropEnv` wraps it as a one-step Gymnasium episode per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError, DatasetError
from blockdrop_env.resnet import BlockDropResNet, prefer_channels_last
from blockdrop_env.rewards import DEFAULT_PENALTY, BlockUsageReward, RewardFunction

SAMPLING_MODES = ("shuffle", "sequential")
CROP_PADDING = 4

ResetReturn: TypeAlias = tuple[np.ndarray, dict[str, Any]]
"""``(observation, info)`` returned by :meth:`BlockDropEnv.reset`."""

StepReturn: TypeAlias = tuple[np.ndarray, float, bool, bool, dict[str, Any]]
"""``(observation, reward, terminated, truncated, info)`` returned by :meth:`BlockDropEnv.step`."""

ModelSource: TypeAlias = "BlockDropResNet | str | Path"
DatasetSource: TypeAlias = "ImageDataset | str"
ActionLike: TypeAlias = "np.ndarray | torch.Tensor | Sequence[Any]"


class ActionScores(NamedTuple):
    """Outcome of executing one policy per image; every field is a tensor on the env device.

    Attributes:
        rewards: float32 (B,).
        correct: bool (B,), prediction equals label.
        predictions: int64 (B,), argmax of the logits.
        blocks_used: int64 (B,), blocks executed.
        flops: float64 (B,), multiply-adds spent per image.
        policy: bool (B, K), the executed policy after the curriculum forced blocks on.
    """

    rewards: torch.Tensor
    correct: torch.Tensor
    predictions: torch.Tensor
    blocks_used: torch.Tensor
    flops: torch.Tensor
    policy: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Argument resolution


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that it exists on this machine.

    Raises:
        ConfigError: if the name is invalid or CUDA is requested but unavailable.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"`device` must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"`device` is {device!r} but torch.cuda.is_available() is False; pass device='cpu'"
        )
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"`device` must be 'cpu' or 'cuda[:N]', got {device!r}")
    return parsed


def resolve_model(checkpoint: ModelSource) -> BlockDropResNet:
    """Return ``checkpoint`` itself if it is a network, else load it from the file.

    Raises:
        ConfigError: if ``checkpoint`` is neither a BlockDropResNet nor a path.
    """
    if isinstance(checkpoint, BlockDropResNet):
        return checkpoint
    if isinstance(checkpoint, (str, Path)):
        from blockdrop_env.checkpoints import load_resnet

        return load_resnet(checkpoint).model
    raise ConfigError(
        f"`checkpoint` must be a BlockDropResNet or a checkpoint path, got "
        f"{type(checkpoint).__name__}"
    )


def resolve_dataset(dataset: DatasetSource, data_dir: str | Path | None, split: str) -> ImageDataset:
    """Return ``dataset`` itself if it is an ImageDataset, else load it by name.

    Raises:
        ConfigError: if a name is given without ``data_dir``, or ``dataset`` has another type.
    """
    if isinstance(dataset, ImageDataset):
        return dataset
    if isinstance(dataset, str):
        # The built-in shapes set is generated in memory, so it needs no directory.
        if data_dir is None and dataset != "shapes":
            raise ConfigError(
                f"`data_dir` is required when `dataset` is a name ({dataset!r}); pass the "
                "directory that holds the images"
            )
        from blockdrop_env.data import load_dataset

        return load_dataset(dataset, data_dir, split)
    raise ConfigError(
        f"`dataset` must be an ImageDataset or a dataset name, got {type(dataset).__name__}"
    )


def check_compatible(model: BlockDropResNet, dataset: ImageDataset) -> None:
    """Check that the network can classify the dataset's images.

    Raises:
        DatasetError: if the class counts or image sizes differ.
    """
    if dataset.num_classes != model.num_classes:
        raise DatasetError(
            f"dataset {dataset.name!r} has {dataset.num_classes} classes but the model "
            f"{type(model).__name__} outputs {model.num_classes} logits; pass the split and "
            "checkpoint of the same task"
        )
    if dataset.image_size != tuple(model.input_size):
        raise DatasetError(
            f"dataset {dataset.name!r} has {dataset.image_size[0]}x{dataset.image_size[1]} "
            f"images but the model was built for {model.input_size[0]}x{model.input_size[1]}; "
            "resize the images or build the model with a matching `input_size`"
        )
    if len(dataset) == 0:
        raise DatasetError(f"dataset {dataset.name!r} has no images")


def resolve_reward(reward: RewardFunction | None, penalty: float | None) -> RewardFunction:
    """Pick the reward function: ``reward`` if given, else :class:`BlockUsageReward` with ``penalty``.

    Raises:
        ConfigError: if both are given, or ``reward`` is not callable.
    """
    if reward is None:
        return BlockUsageReward(DEFAULT_PENALTY if penalty is None else penalty)
    if penalty is not None:
        raise ConfigError(
            "pass either `reward` or `penalty`, not both; set the penalty on the reward "
            "function, e.g. reward=FlopsReward(penalty=5)"
        )
    if not callable(reward):
        raise ConfigError(f"`reward` must be callable, got {type(reward).__name__}")
    return reward


def check_sampling(sampling: str) -> str:
    """Check the sampling mode name.

    Raises:
        ConfigError: if ``sampling`` is not one of :data:`SAMPLING_MODES`.
    """
    if sampling not in SAMPLING_MODES:
        raise ConfigError(
            f"`sampling` must be one of {SAMPLING_MODES}, got {sampling!r}; use 'shuffle' for "
            "training and 'sequential' for one ordered pass when evaluating"
        )
    return sampling


# ---------------------------------------------------------------------------------------------
# Action checking


def _action_to_numpy(action: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(action)
    except (ValueError, TypeError):
        raise ConfigError(
            f"`{name}` must be an array of 0/1 numbers, got a ragged or invalid "
            f"{type(action).__name__}"
        ) from None
    if array.dtype.kind not in "biuf":
        raise ConfigError(
            f"`{name}` must contain numbers 0/1 (bool, int or float), got dtype {array.dtype}; "
            "pass a numeric array with one entry per residual block"
        )
    return array


def _first_invalid_value(values: np.ndarray) -> str:
    flat = values.reshape(-1)
    bad = flat[~((flat == 0) | (flat == 1))]
    return repr(bad[0].item()) if bad.size else "none"


def validate_action(action: ActionLike, shape: tuple[int, ...], name: str = "action") -> np.ndarray:
    """Check an action of 0/1 entries and return it as a bool array.

    Args:
        action: numpy array, nested list or torch tensor; bool, integer or float entries.
        shape: Expected shape, e.g. ``(K,)`` or ``(N, K)``.
        name: Argument name used in error messages.

    Raises:
        ConfigError: on a wrong shape, a non-numeric dtype, or an entry other than 0 or 1
            (NaN and 0.5 included).
    """
    if isinstance(action, torch.Tensor):
        action = action.detach().cpu().numpy()
    array = _action_to_numpy(action, name)
    if array.shape != shape:
        raise ConfigError(
            f"`{name}` must have shape {shape}, got {array.shape}; pass one 0/1 entry per "
            "residual block" + (" and one row per image" if len(shape) == 2 else "")
        )
    if array.dtype == np.bool_:
        return array
    if not ((array == 0) | (array == 1)).all():
        raise ConfigError(
            f"`{name}` entries must be 0 or 1, got {_first_invalid_value(array)}; threshold "
            "probabilities first, e.g. (probs >= 0.5)"
        )
    return array != 0


# ---------------------------------------------------------------------------------------------
# Simulator


class BlockDropSimulator:
    """The engine behind both environments: curriculum, augmentation and batched scoring.

    Args:
        model: The ResNet; moved to ``device`` and put in eval mode (in place).
        dataset: Images and labels; kept on the CPU and copied to ``device`` per batch.
        reward: Reward function (see :mod:`blockdrop_env.rewards`).
        num_controlled: Trailing blocks under the agent's control; None means all K.
        augment: Random crop with 4-pixel zero padding and horizontal flip on drawn images.
        device: Where the forward pass runs.

    Raises:
        DatasetError: if the dataset does not fit the model.
        ConfigError: if ``num_controlled`` is out of range.
    """

    def __init__(
        self,
        model: BlockDropResNet,
        dataset: ImageDataset,
        *,
        reward: RewardFunction,
        num_controlled: int | None,
        augment: bool,
        device: torch.device,
    ) -> None:
        check_compatible(model, dataset)
        self.model = prefer_channels_last(model.to(device).eval(), device)
        self.dataset = dataset
        self.reward = reward
        self.augment = bool(augment)
        self.device = device
        self._labels = dataset.labels.to(device)
        self._forced = torch.zeros(model.num_blocks, dtype=torch.bool, device=device)
        self.set_curriculum(model.num_blocks if num_controlled is None else num_controlled)

    @property
    def num_blocks(self) -> int:
        """K, the number of residual blocks."""
        return self.model.num_blocks

    @property
    def num_controlled(self) -> int:
        """How many trailing blocks the agent decides on; the others always run."""
        return self._num_controlled

    def set_curriculum(self, num_controlled: int) -> None:
        """Let the agent control the last ``num_controlled`` blocks and force the rest on.

        Raises:
            ConfigError: if ``num_controlled`` is not an integer in 1..K.
        """
        k = self.num_blocks
        valid_int = isinstance(num_controlled, (int, np.integer)) and not isinstance(
            num_controlled, (bool, np.bool_)
        )
        if not valid_int or not 1 <= num_controlled <= k:
            raise ConfigError(
                f"`num_controlled` must be an integer in 1..{k} (how many trailing blocks the "
                f"agent controls), got {num_controlled!r}"
            )
        self._num_controlled = int(num_controlled)
        # As in the BlockDrop release's curriculum, the first K - k blocks are forced on.
        self._forced.zero_()
        self._forced[: k - self._num_controlled] = True

    def draw_images(self, indices: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        """Gather images (B, 3, H, W) onto the device, augmented when ``rng`` is given."""
        index = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        images = self.dataset.images.index_select(0, index).to(self.device)
        if self.augment and rng is not None:
            images = random_crop_flip(images, rng)
        return images

    def factors_at(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Return the dataset's per-image factors (e.g. ``difficulty``) at ``indices``, or {} if it has none."""
        if not self.dataset.factors:
            return {}
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return {name: values[index].numpy() for name, values in self.dataset.factors.items()}

    def labels_at(self, indices: np.ndarray) -> torch.Tensor:
        """Labels (B,) on the device for dataset ``indices``."""
        return self._labels[torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.device)]

    def score(self, images: torch.Tensor, labels: torch.Tensor, keep: np.ndarray) -> ActionScores:
        """Run one block-sparse forward for the batch and score it.

        Args:
            images: uint8 (B, 3, H, W) on the device.
            labels: int64 (B,) on the device.
            keep: bool (B, K) actions, already validated.
        """
        policy = torch.from_numpy(keep).to(self.device) | self._forced
        with torch.inference_mode():
            logits = self.model(self.model.preprocess(images), policy, mode="sparse")
        # Outside inference mode, so callers may use these tensors in autograd graphs.
        predictions = logits.argmax(dim=1).clone()
        correct = predictions == labels
        flops = self.model.policy_flops(policy)
        rewards = self.reward(correct, policy, flops, self.model).to(torch.float32)
        blocks_used = policy.sum(dim=1)
        return ActionScores(rewards, correct, predictions, blocks_used, flops, policy)


def random_crop_flip(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Randomly crop each image after 4-pixel zero padding and flip half of them horizontally.

    Args:
        images: uint8 (B, 3, H, W).
        rng: Source of the crop offsets and flips, so a seeded env repeats them.

    Returns:
        A new uint8 tensor of the same shape.
    """
    batch, _, height, width = images.shape
    pad = CROP_PADDING
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = torch.from_numpy(rng.integers(0, 2 * pad + 1, size=(batch, 2))).to(images.device)
    flips = torch.from_numpy(rng.random(batch) < 0.5).to(images.device)
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device).expand(batch, width)
    columns = torch.where(flips[:, None], columns.flip(1), columns) + offsets[:, 1:]
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(3, device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], columns[:, None, None, :]]


class IndexSampler:
    """Stream of dataset indices: a fresh permutation per epoch, or one ordered pass that wraps.

    Args:
        size: Number of images.
        sampling: ``"shuffle"`` or ``"sequential"``.
    """

    def __init__(self, size: int, sampling: str) -> None:
        self.size = size
        self.sampling = check_sampling(sampling)
        self._order = np.arange(size)
        self._cursor = size if sampling == "shuffle" else 0

    def restart(self) -> None:
        """Start over: the first image for ``"sequential"``, a new permutation for ``"shuffle"``."""
        self._cursor = self.size if self.sampling == "shuffle" else 0

    def next(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Return the next ``count`` indices, starting a new epoch when one runs out."""
        chunks = []
        while count > 0:
            if self._cursor == self.size:
                self._start_epoch(rng)
            take = min(count, self.size - self._cursor)
            chunks.append(self._order[self._cursor : self._cursor + take])
            self._cursor += take
            count -= take
        return np.concatenate(chunks)

    def _start_epoch(self, rng: np.random.Generator) -> None:
        if self.sampling == "shuffle":
            self._order = rng.permutation(self.size)
        self._cursor = 0


# ---------------------------------------------------------------------------------------------
# The single environment


class SimulatorViews:
    """Read-only views of a :class:`BlockDropSimulator` shared by the single and the vector env."""

    simulator: BlockDropSimulator

    @property
    def model(self) -> BlockDropResNet:
        """The ResNet that classifies the images."""
        return self.simulator.model

    @property
    def dataset(self) -> ImageDataset:
        """The images and labels episodes are drawn from."""
        return self.simulator.dataset

    @property
    def num_blocks(self) -> int:
        """K, the number of residual blocks (length of one action)."""
        return self.simulator.num_blocks

    @property
    def block_names(self) -> list[str]:
        """Name of each residual block in action order, e.g. ``layer3.1``."""
        return list(self.model.block_names)

    @property
    def num_controlled(self) -> int:
        """How many trailing blocks the agent controls."""
        return self.simulator.num_controlled

    @property
    def device(self) -> torch.device:
        """Where images live and the forward pass runs."""
        return self.simulator.device


class BlockDropEnv(SimulatorViews, gym.Env[np.ndarray, np.ndarray]):
    """Choose which residual blocks of a frozen ResNet to run for one image.

    ## Description

    BlockDrop (Wu, Nagarajan et al., CVPR 2018) as a contextual bandit: each episode shows one
    image, the agent responds with one on/off decision per residual block of a pre-trained
    ResNet, the network classifies the image executing only the kept blocks, and the reward
    trades correctness against the blocks used. A dropped block passes its input through its
    shortcut, so every policy yields a prediction.

    ## Action Space

    ``MultiBinary(K)``: bit i = 1 executes residual block i in execution order, named in
    ``env.block_names`` (``layer1.0`` ... ``layer3.4`` for a CIFAR ResNet-32, K = 15). numpy
    or list actions of bool, int or float 0/1 entries are accepted (Stable-Baselines3 sends
    float32). During a curriculum stage only the last ``num_controlled`` bits count; the
    first K - num_controlled blocks always run.

    ## Observation Space

    ``Box(0, 255, (3, H, W), uint8)``: the image as stored (after augmentation if enabled).
    Normalisation for the ResNet happens inside the env; the agent's network normalises its
    own input.

    ## Rewards

    By default the paper's: ``1 - (blocks used / K)**2`` if the prediction is correct and
    ``-penalty`` if not (:class:`~blockdrop_env.rewards.BlockUsageReward`). Pass any
    :class:`~blockdrop_env.rewards.RewardFunction` as ``reward``, e.g. ``FlopsReward``.

    ## Starting State

    ``reset`` draws the next image: from a fresh permutation per pass over the dataset for
    ``sampling="shuffle"``, or in dataset order for ``sampling="sequential"``, which wraps
    around to the first image after the last. A seeded ``reset`` restarts the order. Pass
    ``options={"index": i}`` to show image i, and ``options={"num_controlled": k}`` to change
    the curriculum.

    ## Episode End

    Every ``step`` terminates (``terminated=True``): the episode is one decision about one
    image. ``truncated`` is always False because there is no time limit to reach. Call
    ``reset`` before the next ``step``.

    ## Arguments

    * ``checkpoint``: a :class:`BlockDropResNet` or a checkpoint path.
    * ``dataset``: an :class:`ImageDataset` or a name (``"cifar10"``, ``"cifar100"``,
      ``"imagefolder"``) loaded from ``data_dir`` / ``split``.
    * ``penalty`` or ``reward``: the paper's reward with that penalty, or another function.
    * ``num_controlled``: trailing blocks the agent controls (1..K, default K).
    * ``sampling``: ``"shuffle"`` (default) or ``"sequential"``.
    * ``augment``: random crop (4-pixel zero padding) and horizontal flip; off by default.
    * ``device``: ``"cpu"`` or ``"cuda"``.
    * ``render_mode``: None or ``"rgb_array"`` (returns the current image as (H, W, 3)).

    ## Version History

    * v0: first version.

    Raises:
        ConfigError: on an invalid argument.
        DatasetError: if the dataset's classes or image size do not match the model.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        checkpoint: ModelSource,
        dataset: DatasetSource,
        *,
        data_dir: str | Path | None = None,
        split: str = "test",
        penalty: float | None = None,
        reward: RewardFunction | None = None,
        num_controlled: int | None = None,
        sampling: str = "shuffle",
        augment: bool = False,
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ConfigError(f"`render_mode` must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        check_sampling(sampling)
        self.simulator = BlockDropSimulator(
            resolve_model(checkpoint),
            resolve_dataset(dataset, data_dir, split),
            reward=resolve_reward(reward, penalty),
            num_controlled=num_controlled,
            augment=augment,
            device=resolve_device(device),
        )
        self._sampler = IndexSampler(len(self.simulator.dataset), sampling)
        height, width = self.simulator.dataset.image_size
        self.observation_space = spaces.Box(0, 255, (3, height, width), np.uint8)
        self.action_space = spaces.MultiBinary(self.num_blocks)
        self._image: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._observation: np.ndarray | None = None
        self._index = -1
        self._needs_reset = True

    # -- read-only views for agents --------------------------------------------------------------

    @property
    def current_image(self) -> torch.Tensor:
        """The current image as a uint8 tensor (3, H, W) on the env device.

        Raises:
            ResetNeeded: before the first ``reset``.
        """
        if self._image is None:
            raise ResetNeeded("no image yet; call `env.reset()` first")
        return self._image[0]

    # -- Gymnasium API ----------------------------------------------------------------------------

    def set_curriculum(self, num_controlled: int) -> None:
        """Let the agent control the last ``num_controlled`` blocks; the others always run.

        Raises:
            ConfigError: if ``num_controlled`` is not an integer in 1..K.
        """
        self.simulator.set_curriculum(num_controlled)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetReturn:
        """Show the next image.

        Args:
            seed: Reseeds the env's generator and restarts the image order.
            options: ``{"num_controlled": k}`` changes the curriculum; ``{"index": i}`` shows
                dataset image i instead of the next one.

        Returns:
            The image and ``info`` with ``index`` (position in the dataset) and ``label``.

        Raises:
            ConfigError: on an unknown option or an out-of-range value.
        """
        super().reset(seed=seed)
        if seed is not None:
            self._sampler.restart()
        index = self._apply_options(options or {})
        if index is None:
            index = int(self._sampler.next(1, self.np_random)[0])
        self._index = index
        self._image = self.simulator.draw_images(np.array([index]), self.np_random)
        self._labels = self.simulator.labels_at(np.array([index]))
        # A copy, so an agent that edits its observation cannot change the dataset.
        self._observation = self._image[0].cpu().numpy().copy()
        self._needs_reset = False
        return self._observation, {"index": index, "label": self._label(), **self._factors()}

    def step(self, action: ActionLike) -> StepReturn:
        """Classify the current image with the blocks ``action`` keeps and end the episode.

        Args:
            action: K entries of 0/1.

        Returns:
            The same image, the reward, ``terminated=True``, ``truncated=False`` and ``info``
            with ``correct``, ``prediction``, ``label``, ``blocks_used``, ``flops``, ``policy``
            (the executed policy, int8 (K,), after the curriculum forced blocks on) and
            ``index``.

        Raises:
            ResetNeeded: before the first ``reset`` or after the episode ended.
            ConfigError: if ``action`` is not K entries of 0/1.
        """
        self._check_can_step()
        keep = validate_action(action, (self.num_blocks,))
        scores = self.simulator.score(self._image, self._current_labels(), keep[None])
        self._needs_reset = True
        info = {
            "correct": bool(scores.correct[0]),
            "prediction": int(scores.predictions[0]),
            "label": self._label(),
            "blocks_used": int(scores.blocks_used[0]),
            "flops": float(scores.flops[0]),
            "policy": scores.policy[0].cpu().numpy().astype(np.int8),
            "index": self._index,
            **self._factors(),
        }
        # A fresh array: Gymnasium requires that step and reset never return shared data.
        return self._observation.copy(), float(scores.rewards[0]), True, False, info

    def _factors(self) -> dict[str, float]:
        return {name: float(values[0]) for name, values in self.simulator.factors_at(np.array([self._index])).items()}

    def score_actions(self, actions: ActionLike) -> ActionScores:
        """Score other actions on the current image without advancing the env or its RNG.

        Self-critical baselines use this: the reward of the thresholded policy on the same
        image the sampled action was taken on.

        Args:
            actions: One action (K,) or several (M, K) to try on the current image.

        Returns:
            :class:`ActionScores` with M rows (1 for a single action), tensors on the device.

        Raises:
            ResetNeeded: before the first ``reset``.
            ConfigError: if ``actions`` is not (K,) or (M, K) of 0/1 entries.
        """
        if self._image is None:
            raise ResetNeeded("no image to score yet; call `env.reset()` first")
        keep = self._validate_many(actions)
        count = keep.shape[0]
        images = self._image.expand(count, -1, -1, -1)
        return self.simulator.score(images, self._current_labels().expand(count), keep)

    def render(self) -> np.ndarray | None:
        """Return the current image as (H, W, 3) uint8 for ``render_mode="rgb_array"``."""
        if self.render_mode != "rgb_array" or self._observation is None:
            return None
        return np.ascontiguousarray(self._observation.transpose(1, 2, 0))

    # -- helpers ------------------------------------------------------------------------------------

    def _apply_options(self, options: dict[str, Any]) -> int | None:
        unknown = set(options) - {"num_controlled", "index"}
        if unknown:
            raise ConfigError(
                f"unknown reset option(s) {sorted(unknown)}; supported: 'num_controlled', 'index'"
            )
        if "num_controlled" in options:
            self.set_curriculum(options["num_controlled"])
        if "index" not in options:
            return None
        index = options["index"]
        size = len(self.dataset)
        if not isinstance(index, (int, np.integer)) or not 0 <= index < size:
            raise ConfigError(f"`options['index']` must be an integer in 0..{size - 1}, got {index!r}")
        return int(index)

    def _check_can_step(self) -> None:
        if self._image is None:
            raise ResetNeeded("cannot call `step` before `reset`; call `env.reset()` first")
        if self._needs_reset:
            raise ResetNeeded(
                "the episode ended with the previous `step` (one image per episode); call "
                "`env.reset()` before the next `step`"
            )

    def _validate_many(self, actions: ActionLike) -> np.ndarray:
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        array = _action_to_numpy(actions, "actions")
        shape = (array.shape[0], self.num_blocks) if array.ndim == 2 else (self.num_blocks,)
        return validate_action(array, shape, "actions").reshape(-1, self.num_blocks)

    def _current_labels(self) -> torch.Tensor:
        if self._labels is None:
            raise ResetNeeded("no image yet; call `env.reset()` first")
        return self._labels

    def _label(self) -> int:
        return int(self.dataset.labels[self._index])
