"""A contextual bandit that learns, per residual block, whether keeping it pays off on an image.

BlockDrop is associative reinforcement learning: each episode shows one image (the context),
the agent chooses one action (a keep/drop bit per block), and it receives one reward. There is
no state to carry over, so every method for contextual bandits applies. This file writes one
from scratch against the vector env's public API, in three parts:

1. Context. Each image becomes a tiny feature vector: its pixels average-pooled to 4x4 per
   channel, scaled to [-0.5, 0.5], plus a constant 1 (49 numbers for RGB).
2. Model. For each block i, a ridge regression predicts the gain of keeping it on this image,
   gain_i(x) = w_i . phi(x). The greedy policy keeps block i when its predicted gain is > 0.
   With probability epsilon an image gets a uniformly random action instead (epsilon-greedy).
3. Feedback. A real deployment would only see the reward of the action it took. A simulator
   can also compute what another action would have earned on the same image:
   ``envs.score_actions`` scores any actions on the current images without advancing the env.
   Each step flips one random block per image and scores that action too. The difference
   between the two rewards is the exact counterfactual gain of that block, in that context,
   and it is the regression target for that block.

The cost: two forward passes per step, the step's and the counterfactual one.

    python examples/bandit_learner.py --budget 20000
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import torch
import torch.nn.functional as F

import blockdrop_env  # noqa: F401  (registers the BlockDrop env ids)
from blockdrop_env.shapes import load_shapes


def features(images: torch.Tensor) -> torch.Tensor:
    """phi(x) (N, 49): 4x4 average-pooled pixels per channel, centred, and a constant 1."""
    pooled = F.adaptive_avg_pool2d(images.double() / 255.0, 4).flatten(1) - 0.5
    return torch.cat([pooled, torch.ones(len(images), 1, dtype=torch.float64)], dim=1)


class PerBlockRidge:
    """One ridge regression per block: gain_i(x) = w_i . phi(x), fitted from (phi, gain) pairs."""

    def __init__(self, num_blocks: int, num_features: int, ridge: float = 1.0) -> None:
        # A starts at ridge * I, so a block that was never probed predicts a gain of 0.
        self.gram = torch.eye(num_features, dtype=torch.float64).repeat(num_blocks, 1, 1) * ridge
        self.target = torch.zeros(num_blocks, num_features, dtype=torch.float64)
        self.weights = torch.zeros(num_blocks, num_features, dtype=torch.float64)

    def predict(self, phi: torch.Tensor) -> torch.Tensor:
        """Predicted gain of keeping each block, (N, K)."""
        return phi @ self.weights.T

    def update(self, phi: torch.Tensor, blocks: torch.Tensor, gains: torch.Tensor) -> None:
        """Add one observed gain of block ``blocks[n]`` on image n, then refit w = A^-1 b."""
        for block in blocks.unique():
            rows = blocks == block
            self.gram[block] += phi[rows].T @ phi[rows]
            self.target[block] += phi[rows].T @ gains[rows]
        self.weights = torch.linalg.solve(self.gram, self.target[:, :, None])[:, :, 0]


def train(envs: blockdrop_env.BlockDropVectorEnv, budget: int, epsilon: float, seed: int) -> PerBlockRidge:
    """Learn from ``budget`` images: act epsilon-greedily, probe one block per image, regress."""
    rng = torch.Generator().manual_seed(seed)
    model = PerBlockRidge(envs.num_blocks, features(envs.current_images[:1]).shape[1])
    rows = torch.arange(envs.num_envs)
    for _ in range(budget // envs.num_envs):
        phi = features(envs.current_images)
        actions = model.predict(phi) > 0
        explore = torch.rand(envs.num_envs, generator=rng) < epsilon
        random_actions = torch.rand(envs.num_envs, envs.num_blocks, generator=rng) < 0.5
        actions = torch.where(explore[:, None], random_actions, actions)

        # The counterfactual: the same images with one random block flipped, scored first,
        # because `step` replaces the current images with the next ones.
        probed = torch.randint(envs.num_blocks, (envs.num_envs,), generator=rng)
        flipped = actions.clone()
        flipped[rows, probed] = ~flipped[rows, probed]
        flipped_rewards = envs.score_actions(flipped).rewards.double()
        _, rewards, _, _, _ = envs.step(actions)

        # gain = reward with the probed block kept - reward with it dropped.
        rewards = torch.as_tensor(rewards)
        probed_kept = actions[rows, probed]
        gains = torch.where(probed_kept, rewards - flipped_rewards, flipped_rewards - rewards)
        model.update(phi, probed, gains)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Epsilon-greedy per-block contextual bandit on BlockDrop-Shapes-v0.")
    parser.add_argument("--budget", type=int, default=20_000, help="Training images (steps summed over envs).")
    parser.add_argument("--num-envs", type=int, default=256, help="Images per vector-env step.")
    parser.add_argument("--epsilon", type=float, default=0.1, help="Probability of a random action per image.")
    parser.add_argument("--checkpoint", default=None, help="ResNet checkpoint; default: the shipped ResNet-32.")
    parser.add_argument("--test-images", type=int, default=10_000, help="First N test images to evaluate on.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the image order and the exploration.")
    args = parser.parse_args()

    overrides = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    envs = gym.make_vec(
        "BlockDrop-Shapes-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point", **overrides
    )
    envs.reset(seed=args.seed)
    model = train(envs, args.budget, args.epsilon, args.seed)

    test_env = blockdrop_env.BlockDropVectorEnv(envs.model, load_shapes("test", args.test_images), num_envs=256)
    policies = {
        "bandit": lambda images: model.predict(features(images)) > 0,
        "all-blocks": lambda images: torch.ones(len(images), envs.num_blocks, dtype=torch.bool),
    }
    images_seen = args.budget // args.num_envs * args.num_envs
    print(f"trained on {images_seen} images, evaluated on {len(test_env.dataset)} test images")
    for name, policy in policies.items():
        result = test_env.evaluate(policy)
        print(
            f"{name}: accuracy {result.accuracy:.4f}, mean blocks {result.mean_blocks_used:.2f} "
            f"of {envs.num_blocks}, mean reward {result.mean_reward:.4f}"
        )
    gains = model.predict(features(test_env.dataset.images)).mean(dim=0)
    print("mean predicted gain per block on the test images:")
    print(", ".join(f"{name} {gain:+.3f}" for name, gain in zip(envs.block_names, gains.tolist())))

if __name__ == "__main__":
    main()
