"""Stable-Baselines3 PPO on the native BlockDrop vector env.

The vector env classifies all N images of a step with one block-sparse forward;
``SB3VecEnvAdapter`` presents it as an SB3 ``VecEnv``, and ``SmallImageCNN`` replaces SB3's
``NatureCNN``, which needs images of at least 36x36. After training, the deterministic policy
(keep block i when its Bernoulli mode is 1) is evaluated once on every test image.

    python examples/ppo_sb3.py --timesteps 50000 --num-envs 64
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO

import blockdrop_env  # noqa: F401  (registers the BlockDrop env ids)
from blockdrop_env.sb3 import SB3VecEnvAdapter, SmallImageCNN
from blockdrop_env.shapes import load_shapes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PPO (Stable-Baselines3) on BlockDrop-Shapes-v0.")
    parser.add_argument("--timesteps", type=int, default=50_000, help="Training images (env steps summed over envs).")
    parser.add_argument("--num-envs", type=int, default=64, help="Images per vector-env step.")
    parser.add_argument("--checkpoint", default=None, help="ResNet checkpoint; default: the shipped ResNet-32.")
    parser.add_argument("--test-images", type=int, default=10_000, help="First N test images to evaluate on.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the networks, the sampling and the image order.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    overrides = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    envs = gym.make_vec(
        "BlockDrop-Shapes-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point", **overrides
    )
    adapter = SB3VecEnvAdapter(envs)
    adapter.seed(args.seed)

    # Every episode is one step, so a rollout of n_steps per env needs no long horizon;
    # SB3's default of 2048 steps per env would spend the whole budget on one update.
    n_steps = max(1, min(16, args.timesteps // args.num_envs))
    agent = PPO(
        "CnnPolicy",
        adapter,
        n_steps=n_steps,
        batch_size=min(64, n_steps * args.num_envs),
        seed=args.seed,
        device="cpu",
        policy_kwargs={"features_extractor_class": SmallImageCNN},
    )
    agent.learn(args.timesteps)

    def ppo_policy(images: torch.Tensor) -> torch.Tensor:
        actions, _ = agent.predict(images.cpu().numpy(), deterministic=True)
        return torch.as_tensor(np.asarray(actions)).bool()

    def all_blocks(images: torch.Tensor) -> torch.Tensor:
        return torch.ones(images.shape[0], envs.num_blocks, dtype=torch.bool)

    test_data = load_shapes("test", args.test_images)
    test_env = blockdrop_env.BlockDropVectorEnv(envs.model, test_data, num_envs=256)
    print(f"trained on {agent.num_timesteps} images, evaluated on {len(test_data)} test images")
    for name, policy in (("ppo", ppo_policy), ("all-blocks", all_blocks)):
        result = test_env.evaluate(policy)
        print(
            f"{name}: accuracy {result.accuracy:.4f}, mean blocks {result.mean_blocks_used:.2f} "
            f"of {envs.num_blocks}, mean reward {result.mean_reward:.4f}"
        )


if __name__ == "__main__":
    main()
