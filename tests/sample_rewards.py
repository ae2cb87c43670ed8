"""Reward functions for tests of rewards as code (gptrl/rewards.py): named as `sample_rewards:<function>`."""

NOT_A_FUNCTION = 3


def good_share(prompts, replies):
  """The share of a reply's words that are "7" (the synthetic task's preferred token, decoded as its id)."""
  del prompts
  return [r.split().count("7") / max(len(r.split()), 1) for r in replies]


def prompt_words(prompts, replies):
  """The number of words in each reply's last prompt turn (checks that prompts arrive as role/content turns)."""
  del replies
  return [len(p[-1]["content"].split()) for p in prompts]


def one_short(prompts, replies):
  del prompts
  return [0.0] * (len(replies) - 1)


def not_finite(prompts, replies):
  del prompts
  return [float("nan")] * len(replies)


def raises(prompts, replies):
  raise KeyError("no such rule")
