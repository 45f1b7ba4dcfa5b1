"""A random agent on BlockDrop-Shapes-v0: the Gymnasium loop in its plainest form.

Each episode shows one image of the built-in shapes set; the agent keeps each residual block
with probability 1/2, and the env reports the reward, whether the prediction was correct, the
blocks used and the image's difficulty factor.

    python examples/random_agent.py --episodes 200
"""

import argparse

import gymnasium as gym
import numpy as np

import blockdrop_env  # noqa: F401  (registers the BlockDrop env ids)

parser = argparse.ArgumentParser(description="Random agent on BlockDrop-Shapes-v0.")
parser.add_argument("--episodes", type=int, default=100, help="Episodes to run (one image each).")
parser.add_argument("--checkpoint", default=None, help="ResNet checkpoint; default: the shipped ResNet-32.")
args = parser.parse_args()

env = gym.make("BlockDrop-Shapes-v0", **({"checkpoint": args.checkpoint} if args.checkpoint else {}))
env.action_space.seed(0)
rewards, correct, blocks, difficulty = [], [], [], []
observation, info = env.reset(seed=0)
for _ in range(args.episodes):
    observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
    rewards.append(reward)
    correct.append(info["correct"])
    blocks.append(info["blocks_used"])
    difficulty.append(info["difficulty"])
    observation, info = env.reset()  # every episode ends after one step

correct_mask = np.array(correct)
difficulty = np.array(difficulty)
print(f"episodes: {args.episodes}")
print(f"mean reward: {np.mean(rewards):.4f}")
print(f"accuracy: {correct_mask.mean():.4f}")
print(f"mean blocks used: {np.mean(blocks):.2f} of {env.action_space.n}")
print(f"mean difficulty: {difficulty.mean():.4f}")
for name, mask in (("correct", correct_mask), ("wrong", ~correct_mask)):
    print(f"mean difficulty of {name} images: {difficulty[mask].mean() if mask.any() else float('nan'):.4f}")
