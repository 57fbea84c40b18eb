"""The reward both sides of benchmarks/rl_step.py score completions with: plain Python, no jax or
torch, so the pathways_jax side (a registered `rl.rewards` entry) and the TRL worker (a
`reward_funcs` callable) import the same function."""


def space_share(text: str) -> float:
  """The share of spaces among the completion's characters (0 for an empty one): deterministic,
  cheap, and it varies between the completions of a random model, so the advantages are not 0
  (the learnable reward of tests/test_grpo.py)."""
  return text.count(' ') / max(len(text), 1)
