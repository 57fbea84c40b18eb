"""Reinforcement learning with rollouts: prompt data (prompts.py), reward functions (rewards.py)
and the rollout batch a policy-gradient step trains on (batch.py); the task is tasks/grpo.py."""
