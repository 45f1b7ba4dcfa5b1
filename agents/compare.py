"""Compare policy learners on equal budgets against static baselines, with bootstrap error bars.

Every learner implements :class:`Learner`: ``fit(problem, budget_steps, seed)`` trains on at most
``budget_steps`` env steps, counted as images classified (one per sub-environment step), and
returns a deterministic policy for evaluation. :func:`run_comparison` trains each learner with
several seeds, evaluates it on the test split, adds the static baselines and writes the tables
and the Pareto plot (see :func:`write_results`).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import torch

from agents.bandit import LinearThompsonBandit
from agents.baselines import AllBlocks, BestFixedPolicy, FirstK, RandomDrop, best_fixed_policy
from agents.evaluation import EvaluationRecord, EvaluationResult, PolicyFn, evaluate_policy
from agents.reinforce import CurriculumTrainer, TrainConfig
from agents.sb3_learners import SB3Learner
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import BlockDropResNet
from blockdrop_env.rewards import DEFAULT_PENALTY, BlockUsageReward
from blockdrop_env.vector_env import BlockDropVectorEnv

METRICS = ("accuracy", "blocks", "flops", "reward")
RANDOM_DROP_POINTS = 11
Echo = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# The learner interface


@dataclass
class LearningProblem:
    """One env configuration that learners train on: a frozen ResNet, training images, a reward.

    Attributes:
        model: The frozen ResNet.
        train_data: Images episodes are drawn from.
        penalty: A wrong prediction earns -penalty (BlockDrop's reward, Wu et al., CVPR 2018).
        batch_size: Images per env step (the vector env's ``num_envs``).
        device: Where the ResNet and the learners' networks run.
        work_dir: Directory for learners that write run files (the REINFORCE agent); None uses
            a temporary directory that is removed afterwards.
        progress: Let learners show progress bars.
    """

    model: BlockDropResNet
    train_data: ImageDataset
    penalty: float = DEFAULT_PENALTY
    batch_size: int = 64
    device: str | torch.device = "cpu"
    work_dir: Path | None = None
    progress: bool = False

    @property
    def reward(self) -> BlockUsageReward:
        """The reward function every learner and baseline is scored with."""
        return BlockUsageReward(self.penalty)

    def make_env(self, num_envs: int) -> BlockDropVectorEnv:
        """Build a fresh vector env over the training images, with every block under the agent's control."""
        return BlockDropVectorEnv(self.model, self.train_data, num_envs, reward=self.reward, device=self.device)


class Learner(Protocol):
    """Interface that the comparison needs from a learner.

    Attributes:
        name: Agent name in tables, e.g. ``"ppo"``.
        images_seen: Images classified during the last ``fit`` (at most its budget).
    """

    name: str
    images_seen: int

    def fit(self, problem: LearningProblem, budget_steps: int, seed: int) -> PolicyFn:
        """Train on at most ``budget_steps`` images and return a deterministic policy."""
        ...


@dataclass
class ReinforceLearner:
    """The reference curriculum REINFORCE agent (:mod:`agents.reinforce`) on an image budget.

    The budget becomes ``epochs = ceil(budget / N)`` passes over the first
    ``n = floor(budget / epochs / batch) * batch`` training images, so at most ``budget`` images
    are seen. The curriculum gains ``ceil(K / epochs)`` blocks per epoch, so the agent controls
    every block by the last epoch.

    Attributes:
        lr: Adam learning rate.
        alpha: Exploration bound.
        beta: Entropy bonus weight.
        validation_images: Training images the trainer evaluates after each epoch; the
            returned policy is the last epoch's, so they select nothing.
        images_seen: Images classified during the last :meth:`fit`, set by it.
    """

    lr: float = 1e-3
    alpha: float = 0.8
    beta: float = 0.1
    validation_images: int = 256
    images_seen: int = 0

    @property
    def name(self) -> str:
        """Agent name in comparison tables."""
        return "reinforce"

    def fit(self, problem: LearningProblem, budget_steps: int, seed: int) -> PolicyFn:
        """Train with curriculum REINFORCE on at most ``budget_steps`` images.

        Args:
            problem: The env configuration.
            budget_steps: Images the learner may classify.
            seed: Seed of the policy's weights, the sampling and the image order.

        Returns:
            The thresholded policy of the last epoch.
        """
        batch_size = min(problem.batch_size, budget_steps)
        epochs = math.ceil(budget_steps / len(problem.train_data))
        num_images = max(batch_size, budget_steps // epochs // batch_size * batch_size)
        train_data = problem.train_data.sample(num_images)
        with _run_directory(problem.work_dir, f"reinforce-seed{seed}") as run_dir:
            config = TrainConfig(
                run_dir=str(run_dir),
                epochs=epochs,
                batch_size=batch_size,
                lr=self.lr,
                alpha=self.alpha,
                beta=self.beta,
                penalty=problem.penalty,
                blocks_per_stage=math.ceil(problem.model.num_blocks / epochs),
                device=str(problem.device),
                seed=seed,
            )
            validation = problem.train_data.sample(self.validation_images)
            trainer = CurriculumTrainer(config, problem.model, train_data, validation, progress=problem.progress)
            trainer.fit()
        self.images_seen = epochs * trainer.steps_per_epoch * batch_size
        return _frozen_agent_policy(trainer)


@contextmanager
def _run_directory(parent: Path | None, name: str) -> Iterator[Path]:
    """Yield ``parent/name``, or a temporary directory that is removed afterwards when ``parent`` is None."""
    if parent is not None:
        yield Path(parent) / name
        return
    path = Path(tempfile.mkdtemp(prefix=f"blockdrop-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _frozen_agent_policy(trainer: CurriculumTrainer) -> PolicyFn:
    from agents.agent_checkpoint import agent_policy_fn

    return agent_policy_fn(trainer.policy, trainer.env.num_controlled)


BUILT_IN_AGENTS = ("reinforce", "bandit", "ppo", "a2c")


def resolve_learner(name: str) -> Learner:
    """Build a learner by agent name: ``reinforce``, ``bandit``, or any Stable-Baselines3
    algorithm that supports MultiBinary actions (``ppo``, ``a2c``, ...).

    Raises:
        ConfigError: if the name is unknown or names an SB3 algorithm without MultiBinary support.
    """
    key = name.strip().lower()
    if key == "reinforce":
        return ReinforceLearner()
    if key == "bandit":
        return LinearThompsonBandit()
    try:
        return SB3Learner(algorithm=key)
    except ConfigError as error:
        if str(error).startswith("unknown Stable-Baselines3"):
            raise ConfigError(
                f"unknown agent {name!r}; use reinforce, bandit or a Stable-Baselines3 algorithm "
                "with MultiBinary actions (ppo, a2c)"
            ) from None
        raise


# ---------------------------------------------------------------------------------------------
# Bootstrap confidence intervals


class ConfidenceInterval(NamedTuple):
    """Mean of some values with a bootstrap confidence interval; bounds are NaN for one value."""

    mean: float
    low: float
    high: float


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0
) -> ConfidenceInterval:
    """Percentile bootstrap confidence interval of the mean.

    With a single value there is no spread to resample, so the bounds are NaN.

    NOTE: with the 2 to 5 seeds of a typical comparison, a percentile bootstrap interval is
    narrower than the true interval. Read it as a description of the seeds' spread.

    Args:
        values: One value per seed, finite.
        confidence: Coverage in (0, 1).
        num_resamples: Bootstrap resamples, at least 1.
        seed: Seed of the resampling; the same seed gives the same bounds.

    Returns:
        The mean and the interval's bounds.

    Raises:
        ConfigError: if ``values`` is empty or not finite, or an argument is out of range.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0 or not np.isfinite(data).all():
        raise ConfigError(f"`values` must be a non-empty 1-D sequence of finite numbers, got {values!r}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"`confidence` must be in (0, 1), got {confidence!r}; e.g. 0.95")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ConfigError(f"`num_resamples` must be a positive integer, got {num_resamples!r}")
    mean = float(data.mean())
    if data.size == 1:
        return ConfidenceInterval(mean, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(num_resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return ConfidenceInterval(mean, float(low), float(high))


# ---------------------------------------------------------------------------------------------
# Evaluating policies


@dataclass
class PolicyScore:
    """Test metrics of one policy (one seed)."""

    accuracy: float
    blocks: float
    flops: float
    reward: float

    @classmethod
    def from_evaluation(cls, result: EvaluationResult, rewards: torch.Tensor) -> PolicyScore:
        """Combine :func:`evaluate_policy`'s metrics with the per-image rewards."""
        return cls(result.accuracy, result.blocks_mean, result.flops_mean, float(rewards.double().mean()))


def score_policy(
    model: BlockDropResNet,
    data: ImageDataset,
    policy_fn: PolicyFn,
    reward: BlockUsageReward,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> PolicyScore:
    """Accuracy, mean blocks, mean FLOPs and mean reward of ``policy_fn`` on ``data``."""
    evaluation = evaluate_policy(model, data, policy_fn, batch_size=batch_size, device=device, record=True)
    result, record = cast(tuple[EvaluationResult, EvaluationRecord], evaluation)
    policies = record.policies
    rewards = reward(record.correct, policies, model.policy_flops(policies), model)
    return PolicyScore.from_evaluation(result, rewards)


@dataclass
class ResultRow:
    """One line of the results table: a learner or a baseline, over its seeds.

    Attributes:
        name: Agent or baseline name, e.g. ``ppo`` or ``first-k@ppo``.
        kind: ``learner`` or ``baseline``.
        policy: Policy spec of a baseline, e.g. ``first:7``; empty for learners.
        seeds: Per-seed scores.
        images_seen: Training images per seed (learners), or images the search used.
        intervals: Mean and bootstrap interval of each metric in :data:`METRICS`.
    """

    name: str
    kind: str
    policy: str
    seeds: list[PolicyScore]
    images_seen: list[int] = field(default_factory=list)
    intervals: dict[str, ConfidenceInterval] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.intervals:
            self.intervals = {
                metric: bootstrap_ci([getattr(score, metric) for score in self.seeds]) for metric in METRICS
            }

    def flat(self) -> dict[str, Any]:
        """Flatten the row into one dict for the CSV file and the markdown table."""
        row: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "policy": self.policy,
            "num_seeds": len(self.seeds),
        }
        for metric, interval in self.intervals.items():
            row[metric] = interval.mean
            row[f"{metric}_ci_low"] = interval.low
            row[f"{metric}_ci_high"] = interval.high
        row["images_seen"] = int(np.mean(self.images_seen)) if self.images_seen else ""
        return row


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass
class CompareSettings:
    """Settings of one comparison, each a ``blockdrop compare`` option.

    Attributes:
        agents: Agent names (see :func:`resolve_learner`).
        seeds: Seeds per agent: 0, 1, ..., seeds - 1.
        budget: Training images per agent and seed.
        fixed_search_images: Training images the best-fixed-policy search evaluates on.
        eval_batch_size: Images per forward pass in evaluations.
    """

    agents: tuple[str, ...] = BUILT_IN_AGENTS
    seeds: int = 3
    budget: int = 50_000
    fixed_search_images: int = 1000
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if not self.agents:
            raise ConfigError("`agents` is empty; pass at least one of reinforce, bandit, ppo, a2c")
        for name in ("seeds", "budget", "fixed_search_images", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} ({option}) must be an integer >= 1, got {value!r}")


@dataclass
class Comparison:
    """Everything a comparison produced, as written by :func:`write_results`.

    Attributes:
        rows: Learners first, then baselines.
        curves: ``first_k`` and ``random_drop`` sweeps: lists of (parameter, PolicyScore).
        best_fixed: The best fixed policy found on the training images.
        learner_seeds: Per-learner per-seed scores, for the plot.
        context: Configuration to store in results.json.
    """

    rows: list[ResultRow]
    curves: dict[str, list[tuple[float, PolicyScore]]]
    best_fixed: BestFixedPolicy
    context: dict[str, Any] = field(default_factory=dict)


def run_comparison(
    problem: LearningProblem,
    test_data: ImageDataset,
    settings: CompareSettings,
    *,
    echo: Echo | None = None,
) -> Comparison:
    """Train every agent with every seed, evaluate it on ``test_data`` and add the baselines.

    Args:
        problem: The env configuration the learners train on.
        test_data: Images every policy is evaluated on.
        settings: Agents, seeds and budget.
        echo: Receives one progress line per agent and seed; None prints nothing.

    Returns:
        The results table, the baseline sweeps and the best fixed policy.

    Raises:
        ConfigError: if an agent name is unknown.
    """
    say = echo or (lambda line: None)
    learners = [resolve_learner(name) for name in settings.agents]
    evaluate = _scorer(problem, test_data, settings.eval_batch_size)

    learner_rows = [_train_learner(learner, problem, settings, evaluate, say) for learner in learners]

    say(f"best fixed policy: greedy search on {settings.fixed_search_images} training images")
    best = best_fixed_policy(
        problem.model,
        problem.train_data,
        problem.reward,
        max_images=settings.fixed_search_images,
        batch_size=settings.eval_batch_size,
        device=problem.device,
    )
    say(
        f"best fixed policy {best.name}: training reward {best.objective:.4f} "
        f"(all blocks {best.all_blocks_objective:.4f})"
    )
    baseline_rows = _baseline_rows(problem.model.num_blocks, best, learner_rows, settings.seeds, evaluate)
    curves = _curves(problem.model.num_blocks, evaluate)
    return Comparison(learner_rows + baseline_rows, curves, best)


def _scorer(problem: LearningProblem, test_data: ImageDataset, batch_size: int) -> Callable[[PolicyFn], PolicyScore]:
    reward = problem.reward

    def evaluate(policy_fn: PolicyFn) -> PolicyScore:
        return score_policy(problem.model, test_data, policy_fn, reward, batch_size=batch_size, device=problem.device)

    return evaluate


def _train_learner(
    learner: Learner,
    problem: LearningProblem,
    settings: CompareSettings,
    evaluate: Callable[[PolicyFn], PolicyScore],
    say: Echo,
) -> ResultRow:
    scores, images_seen = [], []
    for seed in range(settings.seeds):
        say(f"{learner.name} seed {seed}: training on {settings.budget} images")
        policy_fn = learner.fit(problem, settings.budget, seed)
        scores.append(evaluate(policy_fn))
        images_seen.append(learner.images_seen)
        score = scores[-1]
        say(
            f"{learner.name} seed {seed}: test accuracy {score.accuracy:.4f}, blocks {score.blocks:.2f}, "
            f"reward {score.reward:.4f} ({learner.images_seen} images seen)"
        )
    return ResultRow(learner.name, "learner", "", scores, images_seen)


def _baseline_rows(
    num_blocks: int,
    best: BestFixedPolicy,
    learner_rows: Sequence[ResultRow],
    seeds: int,
    evaluate: Callable[[PolicyFn], PolicyScore],
) -> list[ResultRow]:
    all_blocks = AllBlocks(num_blocks)
    rows = [
        ResultRow("all-blocks", "baseline", all_blocks.name, [evaluate(all_blocks)]),
        ResultRow("best-fixed", "baseline", best.name, [evaluate(best)], [best.num_images]),
    ]
    for learner in learner_rows:
        blocks = learner.intervals["blocks"].mean
        first_k = FirstK(num_blocks, int(round(blocks)))
        rows.append(ResultRow(f"first-k@{learner.name}", "baseline", first_k.name, [evaluate(first_k)]))
        p = min(1.0, max(0.0, blocks / num_blocks))
        random_scores = [evaluate(RandomDrop(num_blocks, p, seed)) for seed in range(seeds)]
        rows.append(ResultRow(f"random-drop@{learner.name}", "baseline", f"random:{p:.4g}", random_scores))
    return rows


def _curves(num_blocks: int, evaluate: Callable[[PolicyFn], PolicyScore]) -> dict[str, list[tuple[float, PolicyScore]]]:
    first_k = [(float(k), evaluate(FirstK(num_blocks, k))) for k in range(num_blocks + 1)]
    probabilities = np.linspace(0.0, 1.0, RANDOM_DROP_POINTS)
    random_drop = [(float(p), evaluate(RandomDrop(num_blocks, float(p), seed=0))) for p in probabilities]
    return {"first_k": first_k, "random_drop": random_drop}


# ---------------------------------------------------------------------------------------------
# Output files


RESULTS_MARKDOWN = "results.md"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PARETO_PLOT = "pareto.png"


def write_results(comparison: Comparison, out_dir: Path) -> list[Path]:
    """Write results.md, results.csv, results.json and pareto.png into ``out_dir``.

    Returns:
        The paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row.flat() for row in comparison.rows]
    paths = [out_dir / name for name in (RESULTS_MARKDOWN, RESULTS_CSV, RESULTS_JSON, PARETO_PLOT)]
    paths[0].write_text(markdown_table(rows), encoding="utf-8")
    _write_csv(paths[1], rows)
    paths[2].write_text(json.dumps(_json_report(comparison), indent=2, allow_nan=True) + "\n", encoding="utf-8")
    plot_pareto(comparison, paths[3])
    return paths


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: one line per row, each metric as ``mean [low, high]``."""
    header = ["name", "kind", "policy", "seeds", *METRICS, "images seen"]
    lines = [
        "# Comparison on equal budgets",
        "",
        "Means over seeds with 95% percentile-bootstrap intervals; `[nan, nan]` marks a single value.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["name"], row["kind"], f"`{row['policy']}`" if row["policy"] else "", str(row["num_seeds"])]
        cells += [_format_interval(row, metric) for metric in METRICS]
        cells.append(str(row["images_seen"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_interval(row: Mapping[str, Any], metric: str) -> str:
    digits = ".4g" if metric == "flops" else ".4f"
    return f"{row[metric]:{digits}} [{row[f'{metric}_ci_low']:{digits}}, {row[f'{metric}_ci_high']:{digits}}]"


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _json_report(comparison: Comparison) -> dict[str, Any]:
    return {
        **comparison.context,
        "rows": [
            {**row.flat(), "per_seed": [asdict(score) for score in row.seeds], "images_seen_per_seed": row.images_seen}
            for row in comparison.rows
        ],
        "curves": {
            name: [{"parameter": parameter, **asdict(score)} for parameter, score in points]
            for name, points in comparison.curves.items()
        },
        "best_fixed": {
            "policy": comparison.best_fixed.name,
            "training_reward": comparison.best_fixed.objective,
            "all_blocks_training_reward": comparison.best_fixed.all_blocks_objective,
            "search_images": comparison.best_fixed.num_images,
        },
    }


def plot_pareto(comparison: Comparison, path: Path) -> None:
    """Save two panels: test accuracy against mean blocks, and against mean FLOPs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    for axes, metric, label in zip(
        figure.subplots(1, 2), ("blocks", "flops"), ("mean blocks executed", "mean FLOPs (multiply-adds)")
    ):
        _plot_panel(axes, comparison, metric)
        axes.set_xlabel(label)
        axes.set_ylabel("test accuracy")
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _plot_panel(axes: Any, comparison: Comparison, metric: str) -> None:
    # Fixed colours for the baselines leave matplotlib's colour cycle to the learners.
    curve_styles = (
        ("first_k", "o-", "tab:gray", "first-K (k = 0..K)"),
        ("random_drop", "s--", "tab:brown", "random drop (p swept)"),
    )
    for name, style, colour, label in curve_styles:
        points = [score for _, score in comparison.curves[name]]
        x = [getattr(score, metric) for score in points]
        axes.plot(x, [score.accuracy for score in points], style, color=colour, ms=3, alpha=0.7, label=label)

    rows = {row.name: row for row in comparison.rows}
    for name, marker, colour in (("best-fixed", "*", "gold"), ("all-blocks", "D", "black")):
        score = rows[name].seeds[0]
        label = f"{name} ({rows[name].policy})"
        axes.plot(getattr(score, metric), score.accuracy, marker, ms=11, color=colour, mec="black", label=label)

    for row in comparison.rows:
        if row.kind == "learner":
            x = [getattr(score, metric) for score in row.seeds]
            axes.scatter(x, [score.accuracy for score in row.seeds], s=30, zorder=3, label=f"{row.name} (seeds)")
