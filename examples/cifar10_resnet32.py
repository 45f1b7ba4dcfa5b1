"""BlockDrop on real CIFAR-10 with the public pre-trained ResNet-32, as one resumable command.

Stages, each writing its outputs under ``--work-dir`` and skipped when they exist, so running
the same command again resumes after the last finished stage (an interrupted training stage
continues from its last.pt):

0. Adapt the ResNet to the JPEG images (``agents.pretrain.pretrain`` from ``--resnet``), and
   record the full network's test accuracy before and after.
1. Curriculum REINFORCE on the frozen adapted ResNet (``agents.reinforce.train``).
2. Joint fine-tuning of the policy and the ResNet (``agents.finetune.finetune``), then (2b)
   the ResNet alone, trained for the blocks the now frozen policy keeps (``agents.pretrain.pretrain``
   with ``agent``): joint training samples actions far from the thresholded ones used at test time.
3. Evaluation on every test image: accuracy, blocks and FLOPs (mean and std), unique policies.
4. Static baselines on the adapted ResNet: first-K and random-drop curves, the best fixed policy.
5. CPU latency of policy + kept blocks against the full network, at batch 1 and 256.
6. Pictures: images with the fewest and most blocks, per-block usage, blocks per class, Pareto.

The report goes to ``OUT_DIR/cifar10-resnet32.md`` and ``OUT_DIR/cifar10-resnet32/`` (plots and
results.json).

    python examples/cifar10_resnet32.py
    python examples/cifar10_resnet32.py --max-train-images 256 --max-test-images 128 \\
        --pretrain-epochs 1 --reinforce-epochs 1 --finetune-epochs 1 --refine-epochs 1 --work-dir /tmp/smoke --out-dir /tmp/smoke-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.agent_checkpoint import agent_policy_fn, load_agent, read_agent_checkpoint
from agents.baselines import AllBlocks, BestFixedPolicy, FirstK, RandomDrop, best_fixed_policy
from agents.compare import Comparison, PolicyScore, ResultRow, plot_pareto, score_policy
from agents.evaluation import EvaluationRecord, EvaluationResult, PolicyFn, evaluate_policy
from agents.finetune import FinetuneConfig, finetune
from agents.pretrain import PRECISIONS, PretrainConfig, PretrainResult, pretrain
from agents.reinforce import TrainConfig, train
from blockdrop_env.checkpoints import atomic_torch_save, load_resnet
from blockdrop_env.data import ImageDataset, check_same_classes, load_image_folder
from blockdrop_env.errors import BlockDropError, ConfigError
from blockdrop_env.resnet import BlockDropResNet
from blockdrop_env.rewards import BlockUsageReward

NAME = "cifar10-resnet32"
AGENT_FILE = "agent.pt"
NOTES_FILE = "notes.md"
CHECK_IMAGE_COUNTS = (1000, 2000, 10_000)
STAGES = ("pretrain", "reinforce", "finetune", "refine", "evaluate", "baselines", "latency", "pictures")

# Throughputs of ResNet-32 on 2 AMD EPYC cores with no other load, images per second, from the
# stage times of the run in docs/results/cifar10-resnet32.md. The estimate is only as good as
# these, and REINFORCE speeds up as the policy drops blocks.
PRETRAIN_IMAGES_PER_SECOND = 350.0  # bfloat16 autocast with stochastic depth
REINFORCE_IMAGES_PER_SECOND = 330.0
FINETUNE_IMAGES_PER_SECOND = 205.0  # channels-last
REFINE_IMAGES_PER_SECOND = 590.0  # bfloat16 autocast, about 9 of 15 blocks run
EVAL_IMAGES_PER_SECOND = 1250.0  # channels-last, a mix of all and about 9 blocks
DECODE_IMAGES_PER_SECOND = 6000.0  # JPEG decoding of the 32x32 images, one thread

# Options that may differ when a run resumes; any other change needs a new --work-dir.
RESUMABLE_OPTIONS = ("device", "work_dir", "out_dir")


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class Recipe:
    """Everything the pipeline does, one field per command-line option."""

    data_dir: str = "../shared/data/cifar10-jpeg"
    resnet: str = "../shared/models/resnet32-d509ac18.th"
    work_dir: str = "runs/cifar10-resnet32"
    out_dir: str = "docs/results"
    pretrain_epochs: int = 4
    pretrain_batch_size: int = 128
    pretrain_stochastic_depth: float = 0.5
    pretrain_precision: str = "bfloat16"
    penalty: float = 1.0
    reinforce_epochs: int = 6
    blocks_per_stage: int = 3
    finetune_epochs: int = 26
    finetune_images: int = 25_000
    refine_epochs: int = 4
    refine_lr: float = 0.01
    batch_size: int = 256
    max_train_images: int | None = None
    max_test_images: int | None = None
    fixed_search_images: int = 1000
    latency_images: int = 100
    device: str = "cpu"
    seed: int = 0


HELP = {
    "data_dir": "ImageFolder tree with train/ and test/ (the CIFAR-10 JPEG images).",
    "resnet": "Pre-trained CIFAR ResNet-32 checkpoint to adapt.",
    "work_dir": "Directory of the run directories and stage results; reuse it to resume.",
    "out_dir": "Where the markdown report and its folder of plots and results.json go.",
    "pretrain_epochs": "Epochs adapting the ResNet to the JPEG training images (stage 0).",
    "pretrain_batch_size": "Images per SGD step in stage 0.",
    "pretrain_stochastic_depth": "Survival probability of the last block under stochastic depth in stage 0; 1 turns it off.",
    "pretrain_precision": "Stage 0 arithmetic: bfloat16 autocast, or float32 on CPUs without native bfloat16.",
    "penalty": "Reward of a wrong prediction is -penalty, in training (stages 1 and 2) and in every reported reward.",
    "reinforce_epochs": "Epochs of curriculum REINFORCE, curriculum included (stage 1).",
    "blocks_per_stage": "Blocks the agent gains per curriculum epoch (stage 1).",
    "finetune_epochs": "Epochs of joint fine-tuning (stage 2).",
    "finetune_images": "Fixed random subset of training images used for joint fine-tuning.",
    "refine_epochs": "Epochs training the ResNet for the blocks the frozen policy keeps, on every training image (stage 2b); 0 skips it.",
    "refine_lr": "Peak SGD learning rate of stage 2b (cosine decay to 0).",
    "batch_size": "Images per step in stages 1 and 2, and per forward pass in evaluations.",
    "max_train_images": "Use a fixed random subset of N training images everywhere (smoke runs).",
    "max_test_images": "Use a fixed random subset of N test images everywhere (smoke runs).",
    "fixed_search_images": "Training images the best-fixed-policy search evaluates each candidate on.",
    "latency_images": "Images timed one at a time at batch 1 (stage 5).",
    "device": "Where training and evaluation run; latency is always measured on the CPU.",
    "seed": "Seed of every stage.",
}


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """Build the recipe from the command line; every field of :class:`Recipe` is an option."""
    parser = argparse.ArgumentParser(
        description="BlockDrop on CIFAR-10 with a pre-trained ResNet-32: every stage, resumable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for item in fields(Recipe):
        kind: type = str
        if "int" in str(item.type):
            kind = int
        elif "float" in str(item.type):
            kind = float
        parser.add_argument("--" + item.name.replace("_", "-"), type=kind, default=item.default, help=HELP[item.name])
    recipe = Recipe(**vars(parser.parse_args(argv)))
    for item in fields(Recipe):
        value = getattr(recipe, item.name)
        if isinstance(value, int) and item.name not in ("seed", "refine_epochs") and value < 1:
            raise ConfigError(f"--{item.name.replace('_', '-')} must be a positive integer, got {value}")
    if recipe.refine_epochs < 0:
        raise ConfigError(f"--refine-epochs must be >= 0, got {recipe.refine_epochs}; pass 0 to skip stage 2b")
    if not 0 < recipe.refine_lr < float("inf"):
        raise ConfigError(f"--refine-lr must be a finite number > 0, got {recipe.refine_lr}; pass a learning rate such as 0.01")
    if not recipe.penalty >= 0:
        raise ConfigError(f"--penalty must be >= 0, got {recipe.penalty}; pass a non-negative number such as 1")
    # Checked here as well as in stage 0, so that a bad value never reaches recipe.json.
    if recipe.pretrain_precision not in PRECISIONS:
        raise ConfigError(f"--pretrain-precision must be one of {', '.join(PRECISIONS)}, got {recipe.pretrain_precision!r}")
    if not 0 < recipe.pretrain_stochastic_depth <= 1:
        raise ConfigError(
            f"--pretrain-stochastic-depth must be a survival probability in (0, 1], got {recipe.pretrain_stochastic_depth}; "
            "1 turns stochastic depth off"
        )
    return recipe


def command_line(recipe: Recipe) -> str:
    """Return the command line that reruns this recipe, with every option spelled out."""
    options = []
    for name, value in asdict(recipe).items():
        if value is not None:
            options += ["--" + name.replace("_", "-"), str(value)]
    return "python examples/cifar10_resnet32.py " + shlex.join(options)


def check_same_recipe(recipe: Recipe, work_dir: Path) -> None:
    """Save the recipe in a new work directory, or check that it matches the saved one.

    Raises:
        ConfigError: if the work directory contains a run with other settings.
    """
    path = work_dir / "recipe.json"
    current = asdict(recipe)
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = [
            f"--{key.replace('_', '-')} {saved.get(key)!r} before, {value!r} now"
            for key, value in current.items()
            if key not in RESUMABLE_OPTIONS and saved.get(key) != value
        ]
        if changed:
            raise ConfigError(
                f"{work_dir} contains a run with other settings ({'; '.join(changed)}); rerun with the "
                "saved settings to resume it, or pass a new --work-dir"
            )
    work_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Time estimate


def estimate_seconds(
    recipe: Recipe, num_train: int, num_test: int, num_blocks: int, num_decoded: int
) -> dict[str, float]:
    """Expected seconds per stage from the throughputs above (an estimate, not a measurement).

    ``num_decoded`` is the size of both splits before subsetting: every stage that loads the
    data decodes all of it.
    """
    evaluation = num_test / EVAL_IMAGES_PER_SECOND
    finetune_images = min(recipe.finetune_images, num_train)
    pretrain_images = num_train // recipe.pretrain_batch_size * recipe.pretrain_batch_size
    search_images = min(recipe.fixed_search_images, num_train)
    search_evaluations = num_blocks * (num_blocks + 1) // 2 + 1
    curve_points = (num_blocks + 1) + 11 + 3
    return {
        "decode": 3 * num_decoded / DECODE_IMAGES_PER_SECOND,
        "pretrain": recipe.pretrain_epochs * pretrain_images / PRETRAIN_IMAGES_PER_SECOND
        + (recipe.pretrain_epochs + 1) * evaluation,
        "reinforce": recipe.reinforce_epochs * (num_train / REINFORCE_IMAGES_PER_SECOND + evaluation),
        "finetune": recipe.finetune_epochs * (finetune_images / FINETUNE_IMAGES_PER_SECOND + evaluation),
        "refine": recipe.refine_epochs * pretrain_images / REFINE_IMAGES_PER_SECOND
        + (recipe.refine_epochs + 1) * evaluation * (recipe.refine_epochs > 0),
        "evaluate": 4 * evaluation,
        "baselines": curve_points * evaluation + search_evaluations * search_images / EVAL_IMAGES_PER_SECOND,
        "latency": 2 * recipe.latency_images * 0.01 + 20 * 256 / EVAL_IMAGES_PER_SECOND,
    }


def print_estimate(estimate: dict[str, float]) -> None:
    """Print the estimated total and per-stage minutes."""
    total = sum(estimate.values())
    parts = ", ".join(f"{stage} {seconds / 60:.1f}" for stage, seconds in estimate.items())
    print(f"estimated time on 2 idle CPU cores: {total / 60:.1f} min ({parts} min)", flush=True)


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping


def run_stage(index: int | str, name: str, work_dir: Path, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` unless ``work_dir/stages/<name>.json`` exists; store its result and time there."""
    marker = work_dir / "stages" / f"{name}.json"
    if marker.exists():
        print(f"stage {index} ({name}): done before, skipped", flush=True)
        return json.loads(marker.read_text(encoding="utf-8"))
    print(f"stage {index} ({name}): running", flush=True)
    started = time.perf_counter()
    result = body()
    result["seconds"] = time.perf_counter() - started
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    print(f"stage {index} ({name}): finished in {result['seconds']:.1f} s", flush=True)
    return result


def show_progress() -> bool:
    """Show progress bars only when stderr is a terminal, so logs and pipes stay clean."""
    return sys.stderr.isatty()


@dataclass
class Pipeline:
    """The recipe, the loaded splits and the paths every stage shares."""

    recipe: Recipe
    train_data: ImageDataset
    test_data: ImageDataset

    @property
    def work_dir(self) -> Path:
        """Directory of the run directories and stage results."""
        return Path(self.recipe.work_dir)

    @property
    def figures_dir(self) -> Path:
        """Folder of the report's plots and results.json."""
        return Path(self.recipe.out_dir) / NAME

    @property
    def adapted_resnet(self) -> Path:
        """The ResNet adapted to the JPEG images by stage 0."""
        return self.work_dir / "pretrain" / "model.pt"

    @property
    def final_agent(self) -> Path:
        """The agent the report evaluates: stage 2b's, or stage 2's when 2b is skipped."""
        if self.recipe.refine_epochs > 0:
            return self.work_dir / "refine" / "agent.pt"
        return self.work_dir / "finetune" / "last.pt"

    @property
    def reward(self) -> BlockUsageReward:
        """Reward of stages 1 and 2: 1 - (blocks / K)² if correct, else -penalty."""
        return BlockUsageReward(self.recipe.penalty)

    def evaluate(
        self, model: BlockDropResNet, policy_fn: PolicyFn
    ) -> tuple[EvaluationResult, EvaluationRecord]:
        """Evaluate on every test image, keeping per-image records."""
        result = evaluate_policy(
            model, self.test_data, policy_fn, batch_size=self.recipe.batch_size, device=self.recipe.device, record=True
        )
        return result  # type: ignore[return-value]  # record=True returns the pair

    def score(self, model: BlockDropResNet, policy_fn: PolicyFn) -> PolicyScore:
        """Accuracy, mean blocks, mean FLOPs and mean reward on the test images."""
        return score_policy(
            model, self.test_data, policy_fn, self.reward, batch_size=self.recipe.batch_size, device=self.recipe.device
        )


# ---------------------------------------------------------------------------------------------
# Stages 0-2: training


def train_resnet(pipeline: Pipeline, name: str, **settings: Any) -> PretrainResult:
    """Run ``agents.pretrain.pretrain`` in ``work_dir/name`` on the pipeline's splits, resuming it if started."""
    recipe = pipeline.recipe
    run_dir = pipeline.work_dir / name
    config = PretrainConfig(
        dataset="imagefolder",
        data_dir=recipe.data_dir,
        batch_size=recipe.pretrain_batch_size,
        precision=recipe.pretrain_precision,
        eval_batch_size=recipe.batch_size,
        device=recipe.device,
        seed=recipe.seed,
        **settings,
    )
    # The splits are passed in, already cut to the subsets every stage uses.
    return pretrain(
        config,
        run_dir,
        train_data=pipeline.train_data,
        test_data=pipeline.test_data,
        resume=(run_dir / "last.pt").exists(),
        progress=show_progress(),
    )


def stage_pretrain(pipeline: Pipeline) -> dict[str, Any]:
    """Stage 0: fine-tune the pre-trained ResNet on the JPEG training images."""
    recipe = pipeline.recipe
    result = train_resnet(
        pipeline,
        "pretrain",
        init=recipe.resnet,
        epochs=recipe.pretrain_epochs,
        stochastic_depth=recipe.pretrain_stochastic_depth,
    )
    return {
        "model": str(result.model_path),
        "original_accuracy": result.initial_accuracy,
        "adapted_accuracy": result.final_accuracy,
        "train_images_per_second": result.train_images_per_second,
    }


def stage_reinforce(pipeline: Pipeline) -> dict[str, Any]:
    """Stage 1: curriculum REINFORCE on the frozen adapted ResNet."""
    recipe = pipeline.recipe
    run_dir = pipeline.work_dir / "reinforce"
    config = TrainConfig(
        resnet=str(pipeline.adapted_resnet),
        dataset="imagefolder",
        data_dir=recipe.data_dir,
        run_dir=str(run_dir),
        epochs=recipe.reinforce_epochs,
        batch_size=recipe.batch_size,
        epochs_per_stage=1,
        blocks_per_stage=recipe.blocks_per_stage,
        penalty=recipe.penalty,
        max_train_images=recipe.max_train_images,
        max_test_images=recipe.max_test_images,
        device=recipe.device,
        seed=recipe.seed,
    )
    rows = train(config, resume=(run_dir / "last.pt").exists(), progress=show_progress())
    return {"run_dir": str(run_dir), "last_epoch": rows[-1]}


def stage_finetune(pipeline: Pipeline) -> dict[str, Any]:
    """Stage 2: train the policy and the ResNet jointly, starting from stage 1."""
    recipe = pipeline.recipe
    run_dir = pipeline.work_dir / "finetune"
    # Start from last.pt, not the run's best.pt, because best.pt is chosen by test reward.
    config = FinetuneConfig(
        from_run=str(pipeline.work_dir / "reinforce" / "last.pt"),
        run_dir=str(run_dir),
        epochs=recipe.finetune_epochs,
        batch_size=recipe.batch_size,
        max_train_images=min(recipe.finetune_images, recipe.max_train_images or recipe.finetune_images),
        max_test_images=recipe.max_test_images,
        device=recipe.device,
        seed=recipe.seed,
    )
    rows = finetune(config, resume=(run_dir / "last.pt").exists(), progress=show_progress())
    return {"run_dir": str(run_dir), "last_epoch": rows[-1]}


def stage_refine(pipeline: Pipeline) -> dict[str, Any]:
    """Stage 2b: train the ResNet for the blocks the fine-tuned policy keeps, the policy frozen.

    Joint fine-tuning trains the ResNet on sampled actions, which the exploration bound keeps
    far from the thresholded ones the agent runs at test time.
    """
    recipe = pipeline.recipe
    if recipe.refine_epochs == 0:
        return {"skipped": True}
    result = train_resnet(
        pipeline,
        "refine",
        agent=str(pipeline.work_dir / "finetune" / "last.pt"),
        epochs=recipe.refine_epochs,
        lr=recipe.refine_lr,
    )
    return {
        "agent": str(result.agent_path),
        "accuracy_before": result.initial_accuracy,
        "accuracy_after": result.final_accuracy,
        "train_images_per_second": result.train_images_per_second,
    }


# ---------------------------------------------------------------------------------------------
# Stage 3: evaluation


def stage_evaluate(pipeline: Pipeline) -> dict[str, Any]:
    """Stage 3: evaluate the agents of stages 1 and 2, and all blocks, on every test image."""
    # Use the last epoch's agents, here and in stage 2. best.pt is chosen by test reward, so it
    # would make the test numbers optimistic.
    device = pipeline.recipe.device
    blockdrop, finetuned, info = load_agent(pipeline.final_agent, device)
    curriculum, adapted, curriculum_info = load_agent(pipeline.work_dir / "reinforce" / "last.pt", device)
    rows = {"blockdrop": (finetuned.model, agent_policy_fn(blockdrop, info.num_controlled))}
    if pipeline.recipe.refine_epochs > 0:
        joint, joint_model, joint_info = load_agent(pipeline.work_dir / "finetune" / "last.pt", device)
        rows["joint_finetune_only"] = (joint_model.model, agent_policy_fn(joint, joint_info.num_controlled))
    rows |= {
        "curriculum_only": (adapted.model, agent_policy_fn(curriculum, curriculum_info.num_controlled)),
        "all_blocks_finetuned": (finetuned.model, AllBlocks(finetuned.model.num_blocks)),
        "all_blocks_adapted": (adapted.model, AllBlocks(adapted.model.num_blocks)),
    }
    results: dict[str, Any] = {}
    (pipeline.work_dir / "stages").mkdir(parents=True, exist_ok=True)
    for name, (model, policy_fn) in rows.items():
        result, record = pipeline.evaluate(model, policy_fn)
        rewards = pipeline.reward(record.correct, record.policies, model.policy_flops(record.policies), model)
        results[name] = {**result.to_dict(), "reward": float(rewards.double().mean())}
        if name == "blockdrop":
            torch.save(
                {"policies": record.policies, "correct": record.correct, "predictions": record.predictions},
                pipeline.work_dir / "stages" / "blockdrop_record.pt",
            )
    return results


# ---------------------------------------------------------------------------------------------
# Stage 4: static baselines on the adapted ResNet


def stage_baselines(pipeline: Pipeline, learned_blocks: float) -> dict[str, Any]:
    """Stage 4: first-K, random-drop and best-fixed policies on the adapted ResNet."""
    model = load_resnet(pipeline.adapted_resnet).model
    num_blocks = model.num_blocks
    first_k = [{"parameter": k, **asdict(pipeline.score(model, FirstK(num_blocks, k)))} for k in range(num_blocks + 1)]
    random_drop = [
        {"parameter": float(p), **asdict(pipeline.score(model, RandomDrop(num_blocks, float(p), pipeline.recipe.seed)))}
        for p in np.linspace(0.0, 1.0, 11)
    ]
    # A random subset, because the first images of a class-sorted ImageFolder split are one class.
    search_data = pipeline.train_data.sample(pipeline.recipe.fixed_search_images)
    recipe = pipeline.recipe
    best = best_fixed_policy(
        model, search_data, pipeline.reward, max_images=None, batch_size=recipe.batch_size, device=recipe.device
    )
    k = int(round(learned_blocks))
    p = min(1.0, learned_blocks / num_blocks)
    return {
        "first_k_curve": first_k,
        "random_drop_curve": random_drop,
        "first_k_at_learned": {"parameter": k, **asdict(pipeline.score(model, FirstK(num_blocks, k)))},
        "random_drop_at_learned": {"parameter": p, **asdict(pipeline.score(model, RandomDrop(num_blocks, p, recipe.seed)))},
        "best_fixed": {
            "policy": best.name,
            "training_reward": best.objective,
            "search_images": best.num_images,
            **asdict(pipeline.score(model, best)),
        },
    }


# ---------------------------------------------------------------------------------------------
# Stage 5: latency


def stage_latency(pipeline: Pipeline) -> dict[str, Any]:
    """Stage 5: median CPU time of policy + kept blocks and of the full network."""
    policy, loaded, info = load_agent(pipeline.final_agent, "cpu")
    model = loaded.model.eval()
    policy_fn = agent_policy_fn(policy, info.num_controlled)
    images = pipeline.test_data.images

    def blockdrop(batch: torch.Tensor) -> torch.Tensor:
        return model(model.preprocess(batch), policy_fn(batch), mode="sparse")

    def full(batch: torch.Tensor) -> torch.Tensor:
        return model(model.preprocess(batch), mode="full")

    count = min(pipeline.recipe.latency_images, len(images))
    single = [images[i : i + 1] for i in range(count)]
    batches = [images[i : i + 256] for i in range(0, min(len(images), 5 * 256), 256)]
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    for name, function in (("blockdrop", blockdrop), ("full", full)):
        result[f"{name}_batch1_ms"] = median_milliseconds(function, single)
        result[f"{name}_batch256_ms"] = median_milliseconds(function, batches)
    result["batch256_size"] = int(batches[0].shape[0])
    return result


def median_milliseconds(function: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]) -> float:
    """Median wall time of ``function`` over ``inputs``, after two untimed warm-up calls."""
    times = []
    with torch.inference_mode():
        for batch in inputs[:2]:
            function(batch)
        for batch in inputs:
            started = time.perf_counter()
            function(batch)
            times.append(time.perf_counter() - started)
    return 1000.0 * float(np.median(times))


# ---------------------------------------------------------------------------------------------
# Stage 6: pictures


def stage_pictures(pipeline: Pipeline, evaluation: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """Stage 6: draw the plots into the report's folder; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    record = torch.load(pipeline.work_dir / "stages" / "blockdrop_record.pt", weights_only=True)
    figures = pipeline.figures_dir
    figures.mkdir(parents=True, exist_ok=True)
    blocks = record["policies"].sum(dim=1)
    paths = {
        "fewest_most_blocks": plot_extreme_images(pipeline.test_data, blocks, figures / "fewest_most_blocks.png"),
        "block_usage": plot_block_usage(evaluation["blockdrop"]["block_usage"], figures / "block_usage.png"),
        "blocks_per_class": plot_blocks_per_class(pipeline.test_data, blocks, figures / "blocks_per_class.png"),
        "pareto": plot_tradeoff(evaluation, baselines, figures / "pareto.png"),
    }
    return {name: str(path) for name, path in paths.items()}


def new_figure(width: float, height: float) -> Any:
    """Create a matplotlib figure on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_extreme_images(data: ImageDataset, blocks: torch.Tensor, path: Path, per_row: int = 8) -> Path:
    """Draw the test images with the fewest and the most blocks, one row each."""
    order = torch.argsort(blocks, stable=True)
    count = min(per_row, len(order))
    rows = {"fewest blocks": order[:count], "most blocks": order.flip(0)[:count]}
    figure = new_figure(1.4 * count, 3.6)
    for row, (title, indices) in enumerate(rows.items()):
        for column, index in enumerate(indices.tolist()):
            axes = figure.add_subplot(2, count, row * count + column + 1)
            axes.imshow(data.images[index].permute(1, 2, 0).numpy())
            axes.set_title(f"{data.classes[data.labels[index]]}\n{int(blocks[index])} blocks", fontsize=7)
            axes.axis("off")
        figure.text(0.01, 0.75 - 0.47 * row, title, rotation=90, fontsize=9, va="center")
    figure.tight_layout(rect=(0.03, 0, 1, 1))
    figure.savefig(path, dpi=120)
    return path


def plot_block_usage(usage: list[float], path: Path) -> Path:
    """Draw the fraction of test images that execute each block."""
    figure = new_figure(7, 3)
    axes = figure.subplots()
    axes.bar(range(len(usage)), usage, color="tab:blue")
    axes.set_xticks(range(len(usage)))
    axes.set_xlabel("residual block (execution order)")
    axes.set_ylabel("fraction of test images")
    axes.set_ylim(0, 1.05)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_blocks_per_class(data: ImageDataset, blocks: torch.Tensor, path: Path) -> Path:
    """Draw the mean blocks executed per class."""
    means = [float(blocks[data.labels == label].double().mean()) for label in range(data.num_classes)]
    figure = new_figure(7, 3)
    axes = figure.subplots()
    axes.bar(data.classes, means, color="tab:green")
    axes.set_ylabel("mean blocks executed")
    axes.tick_params(axis="x", labelrotation=45, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_tradeoff(evaluation: dict[str, Any], baselines: dict[str, Any], path: Path) -> Path:
    """Accuracy against blocks and FLOPs, drawn by ``agents.compare.plot_pareto``."""

    def score(row: dict[str, Any]) -> PolicyScore:
        return PolicyScore(row["accuracy"], row["blocks"], row["flops"], row["reward"])

    def measured(row: dict[str, Any]) -> PolicyScore:
        return PolicyScore(row["accuracy"], row["blocks_mean"], row["flops_mean"], row["reward"])

    best = baselines["best_fixed"]
    keep = tuple(bit == "1" for bit in best["policy"].removeprefix("fixed:"))
    rows = [
        ResultRow("blockdrop", "learner", "", [measured(evaluation["blockdrop"])]),
        ResultRow("curriculum only", "learner", "", [measured(evaluation["curriculum_only"])]),
        ResultRow("all-blocks", "baseline", "all", [measured(evaluation["all_blocks_adapted"])]),
        ResultRow("best-fixed", "baseline", best["policy"], [score(best)]),
    ]
    curves = {
        "first_k": [(row["parameter"], score(row)) for row in baselines["first_k_curve"]],
        "random_drop": [(row["parameter"], score(row)) for row in baselines["random_drop_curve"]],
    }
    plot_pareto(Comparison(rows, curves, BestFixedPolicy(keep)), path)
    return path


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    """Describe the machine and software the run used."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def percent(value: float) -> str:
    """Format a fraction as a percentage with two decimals."""
    return f"{100 * value:.2f}%"


def evaluation_table(evaluation: dict[str, Any], pretrain_result: dict[str, Any]) -> list[str]:
    """Build the markdown table of stage 3, with the original network's accuracy."""
    lines = [
        "| policy | ResNet | accuracy | blocks (mean ± std) | FLOPs (mean ± std) | unique policies |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "blockdrop": ("BlockDrop (stages 1-2b, final agent)", "fine-tuned for the policy"),
        "joint_finetune_only": ("BlockDrop before stage 2b (stages 1-2)", "fine-tuned with the policy"),
        "curriculum_only": ("curriculum REINFORCE only (stage 1)", "adapted, frozen"),
        "all_blocks_finetuned": ("all blocks", "of the final agent"),
        "all_blocks_adapted": ("all blocks", "adapted (stage 0)"),
    }
    for name, (policy, network) in labels.items():
        if name not in evaluation:
            continue
        row = evaluation[name]
        lines.append(
            f"| {policy} | {network} | {percent(row['accuracy'])} | {row['blocks_mean']:.2f} ± {row['blocks_std']:.2f} "
            f"of {row['num_blocks']} | {row['flops_mean'] / 1e6:.1f}M ± {row['flops_std'] / 1e6:.1f}M "
            f"({row['flops_mean'] / row['flops_full']:.0%}) | {row['unique_policies']} |"
        )
    original = pretrain_result.get("original_accuracy")
    if original is not None:
        num_blocks = evaluation["all_blocks_adapted"]["num_blocks"]
        lines.append(f"| all blocks | original (`--resnet`), before stage 0 | {percent(original)} | {num_blocks} | | 1 |")
    return lines


def baseline_table(baselines: dict[str, Any]) -> list[str]:
    """Build the markdown table of stage 4."""
    lines = ["| baseline on the adapted ResNet | accuracy | mean blocks | mean FLOPs |", "|---|---|---|---|"]
    named = [
        (f"first-K, k = {baselines['first_k_at_learned']['parameter']}", baselines["first_k_at_learned"]),
        (f"random drop, keep p = {baselines['random_drop_at_learned']['parameter']:.3f}", baselines["random_drop_at_learned"]),
        (f"best fixed policy `{baselines['best_fixed']['policy']}`", baselines["best_fixed"]),
    ]
    named += [(f"first-K, k = {row['parameter']}", row) for row in baselines["first_k_curve"]]
    for label, row in named:
        lines.append(f"| {label} | {percent(row['accuracy'])} | {row['blocks']:.2f} | {row['flops'] / 1e6:.1f}M |")
    return lines


def goals(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Check the run against its goals; return (goal, measured, required, met) rows."""
    stages = results["stages"]
    learned = stages["evaluate"]["blockdrop"]
    reference = stages["pretrain"]["adapted_accuracy"]
    num_blocks = learned["num_blocks"]
    baselines = stages["baselines"]
    total = sum(results["stage_seconds"].values())
    rows = [
        (
            "accuracy >= adapted full network - 0.5 points",
            percent(learned["accuracy"]),
            f">= {percent(reference - 0.005)}",
            learned["accuracy"] >= reference - 0.005,
        ),
        (
            "mean blocks <= 60% of all",
            f"{learned['blocks_mean']:.2f} of {num_blocks} ({learned['blocks_mean'] / num_blocks:.1%})",
            f"<= {0.6 * num_blocks:.1f}",
            learned["blocks_mean"] <= 0.6 * num_blocks,
        ),
    ]
    for name, label in (("first_k_curve", "first-K"), ("random_drop_curve", "random-drop")):
        curve = interpolate_accuracy(baselines[name], learned["blocks_mean"])
        rows.append(
            (
                f"above the {label} curve at the same mean blocks",
                percent(learned["accuracy"]),
                f"> {percent(curve)}",
                learned["accuracy"] > curve,
            )
        )
    rows.append(("whole pipeline <= 2 hours", f"{total / 60:.1f} min", "<= 120 min", total <= 7200))
    return rows


def interpolate_accuracy(curve: list[dict[str, Any]], blocks: float) -> float:
    """Interpolate a baseline curve's accuracy linearly at ``blocks`` mean blocks."""
    points = sorted((row["blocks"], row["accuracy"]) for row in curve)
    return float(np.interp(blocks, [b for b, _ in points], [a for _, a in points]))


def goal_table(results: dict[str, Any]) -> list[str]:
    """Build the markdown table of the goals, each met or missed."""
    lines = ["| goal | measured | required | verdict |", "|---|---|---|---|"]
    for goal, measured, required, met in goals(results):
        lines.append(f"| {goal} | {measured} | {required} | {'met' if met else '**missed**'} |")
    return lines


def time_row(stage: str, seconds: float, estimated: float | None) -> str:
    """Format one row of the time table; stages without an estimate show a dash."""
    estimate_cell = "-" if estimated is None else f"{estimated:.0f}"
    return f"| {stage} | {seconds:.0f} | {estimate_cell} |"


def notes(figures: Path) -> list[str]:
    """Return the hand-written findings in ``figures/notes.md``, kept when the report is rewritten."""
    path = figures / NOTES_FILE
    if not path.exists():
        return []
    return [path.read_text(encoding="utf-8").rstrip(), ""]


def write_report(pipeline: Pipeline, results: dict[str, Any], estimate: dict[str, float]) -> Path:
    """Write the markdown report and results.json; return the report's path."""
    recipe = pipeline.recipe
    figures = pipeline.figures_dir
    figures.mkdir(parents=True, exist_ok=True)
    (figures / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    latency = results["latency"]
    pictures = {name: path for name, path in results["stages"]["pictures"].items() if name != "seconds"}
    lines = [
        "# BlockDrop on CIFAR-10 (JPEG) with a pre-trained ResNet-32",
        "",
        f"{len(pipeline.train_data)} training and {len(pipeline.test_data)} test images. Written by:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "## Goals",
        "",
        *goal_table(results),
        "",
        "The curve values are interpolated linearly at the agent's mean blocks; the baseline table "
        "below lists the nearest measured points.",
        "",
        "## Test results",
        "",
        *evaluation_table(results["stages"]["evaluate"], results["stages"]["pretrain"]),
        "",
        "The final agent (policy network and fine-tuned ResNet) is "
        f"[`{NAME}/{AGENT_FILE}`]({NAME}/{AGENT_FILE}); this reproduces its row:",
        "",
        "```bash",
        f"blockdrop evaluate --checkpoint {Path(recipe.out_dir) / NAME / AGENT_FILE} --dataset imagefolder \\",
        f"    --data-dir {recipe.data_dir} --split test --json",
        "```",
        "",
        *baseline_table(results["stages"]["baselines"]),
        "",
        "## CPU latency (median milliseconds per call)",
        "",
        f"| | batch 1 | batch {latency['batch256_size']} |",
        "|---|---|---|",
        f"| policy + kept blocks | {latency['blockdrop_batch1_ms']:.2f} | {latency['blockdrop_batch256_ms']:.1f} |",
        f"| full network | {latency['full_batch1_ms']:.2f} | {latency['full_batch256_ms']:.1f} |",
        "",
        f"torch threads: {latency['threads']}.",
        "",
        *notes(figures),
        "## Pictures",
        "",
        *[f"![{name}]({NAME}/{Path(path).name})" for name, path in pictures.items()],
        "",
        "## Time per stage",
        "",
        "| stage | measured (s) | estimated (s) |",
        "|---|---|---|",
        *[time_row(stage, seconds, estimate.get(stage)) for stage, seconds in results["stage_seconds"].items()],
        f"| total | {sum(results['stage_seconds'].values()):.0f} | {sum(estimate.values()):.0f} |",
        "",
        "A training stage resumed after a kill counts the epochs of every call; the other stages count "
        "the call that finished them; decode is the last call's. The estimates come from the throughput "
        "constants at the top of the script, which were set from the stage times of the recorded run.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in results["machine"].items()],
        "",
    ]
    path = Path(recipe.out_dir) / f"{NAME}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Main


def load_splits(recipe: Recipe) -> tuple[ImageDataset, ImageDataset, int]:
    """Both splits, cut to the fixed random subsets that agents.reinforce.train also takes.

    Returns:
        The two subsets and the number of images decoded.
    """
    progress = show_progress()
    train_data = load_image_folder(recipe.data_dir, "train", progress=progress)
    test_data = load_image_folder(recipe.data_dir, "test", progress=progress)
    check_same_classes(train_data, test_data)
    decoded = len(train_data) + len(test_data)
    return train_data.sample(recipe.max_train_images), test_data.sample(recipe.max_test_images), decoded


def run(recipe: Recipe) -> Path:
    """Run every stage that has not finished yet and write the report."""
    work_dir = Path(recipe.work_dir)
    check_same_recipe(recipe, work_dir)
    started = time.perf_counter()
    train_data, test_data, decoded = load_splits(recipe)
    decode_seconds = time.perf_counter() - started
    pipeline = Pipeline(recipe, train_data, test_data)
    num_blocks = load_resnet(recipe.resnet).model.num_blocks
    estimate = estimate_seconds(recipe, len(train_data), len(test_data), num_blocks, decoded)
    print_estimate(estimate)

    stages: dict[str, dict[str, Any]] = {}
    stages["pretrain"] = run_stage(0, "pretrain", work_dir, lambda: stage_pretrain(pipeline))
    stages["reinforce"] = run_stage(1, "reinforce", work_dir, lambda: stage_reinforce(pipeline))
    stages["finetune"] = run_stage(2, "finetune", work_dir, lambda: stage_finetune(pipeline))
    stages["refine"] = run_stage("2b", "refine", work_dir, lambda: stage_refine(pipeline))
    stages["evaluate"] = run_stage(3, "evaluate", work_dir, lambda: stage_evaluate(pipeline))
    learned_blocks = stages["evaluate"]["blockdrop"]["blocks_mean"]
    stages["baselines"] = run_stage(4, "baselines", work_dir, lambda: stage_baselines(pipeline, learned_blocks))
    stages["latency"] = run_stage(5, "latency", work_dir, lambda: stage_latency(pipeline))
    stages["pictures"] = run_stage(
        6, "pictures", work_dir, lambda: stage_pictures(pipeline, stages["evaluate"], stages["baselines"])
    )
    drawn = [Path(path).name for name, path in stages["pictures"].items() if name != "seconds"]
    if not all((pipeline.figures_dir / name).exists() for name in drawn):
        # A finished run rewritten into another --out-dir: draw the plots there too.
        stages["pictures"].update(stage_pictures(pipeline, stages["evaluate"], stages["baselines"]))

    results = {
        "command": command_line(recipe),
        "recipe": asdict(recipe),
        "machine": machine(),
        "estimated_seconds": estimate,
        "stages": stages,
        "latency": stages["latency"],
        "stage_seconds": {
            "decode": decode_seconds,
            **{stage: stage_seconds(pipeline, stage, stages[stage]) for stage in STAGES},
        },
        "agent": str(export_agent(pipeline)),
        "checks": first_images_checks(pipeline),
    }
    return write_report(pipeline, results, estimate)


def stage_seconds(pipeline: Pipeline, name: str, result: dict[str, Any]) -> float:
    """Return the seconds a stage took over all calls, counting the epochs of killed calls too.

    The stage's own result stores only the time of the call that finished it.
    """
    metrics = pipeline.work_dir / name / "metrics.jsonl"
    if not metrics.exists():
        return float(result["seconds"])
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    epochs = sum(row.get("time/epoch_seconds", 0.0) for row in rows)
    return max(float(result["seconds"]), epochs)


def export_agent(pipeline: Pipeline) -> Path:
    """Save the final agent without its optimiser and RNG state, small enough to commit."""
    state = read_agent_checkpoint(pipeline.final_agent)
    state.pop("training", None)
    path = pipeline.figures_dir / AGENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)
    return path


def first_images_checks(pipeline: Pipeline) -> dict[str, dict[str, float]]:
    """Compute the final agent's accuracy and mean blocks on the first N test images from stage 3's record.

    ``blockdrop evaluate --num-images N`` evaluates the same images, so these let a test check
    the exported agent without evaluating all of them.
    """
    if pipeline.recipe.max_test_images is not None:
        return {}  # The first images of a random subset are not the split's first images.
    record = torch.load(pipeline.work_dir / "stages" / "blockdrop_record.pt", weights_only=True)
    checks = {}
    for count in CHECK_IMAGE_COUNTS:
        count = min(count, len(record["correct"]))
        checks[str(count)] = {
            "accuracy": float(record["correct"][:count].double().mean()),
            "blocks_mean": float(record["policies"][:count].sum(dim=1).double().mean()),
        }
    return checks


def print_summary(report: Path, results_path: Path) -> None:
    """Print the headline numbers and where the report is."""
    results = json.loads(results_path.read_text(encoding="utf-8"))
    evaluation = results["stages"]["evaluate"]
    for name in ("blockdrop", "joint_finetune_only", "curriculum_only", "all_blocks_finetuned", "all_blocks_adapted"):
        if name not in evaluation:
            continue
        row = evaluation[name]
        print(
            f"{name}: accuracy {row['accuracy']:.4f}, blocks {row['blocks_mean']:.2f} ± {row['blocks_std']:.2f}, "
            f"flops {row['flops_mean']:.4g} ± {row['flops_std']:.4g}, unique policies {row['unique_policies']}"
        )
    pretrain_result = results["stages"]["pretrain"]
    original, adapted = pretrain_result["original_accuracy"], pretrain_result["adapted_accuracy"]
    print(f"all blocks: original accuracy {original:.4f}, adapted {adapted:.4f}")
    print(f"report: {report}")
    print(f"results: {results_path}")


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline; return 0, or 2 after printing a one-line error for invalid input."""
    try:
        recipe = parse_recipe(argv)
        report = run(recipe)
    except BlockDropError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print_summary(report, Path(recipe.out_dir) / NAME / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
