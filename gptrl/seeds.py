"""The named seed streams: every random draw of a stage derives from `config.seed` plus one of these offsets, so
that no two uses share a stream and a resumed run repeats every draw. (Parameter init, dropout and the data order
use `config.seed` itself; member m of a reward-model ensemble shuffles its data with seed + m.)"""

SAMPLES = 1  # the texts pretraining and SFT sample at each eval (folded with the step)
RM_NORMALISER = 2  # the SFT replies whose reward centres the reward model (gptrl/stages/reward.py)
EVAL_PROMPTS = 7  # the order of the held-out prompts every policy evaluation uses (PPO's eval, best-of-n)
PPO_EVAL = 11  # the sampling key of PPO's held-out evaluation (folded with the prompt offset)
BEST_OF_N = 13  # best-of-n's sampling key


def stream(seed: int, offset: int) -> int:
  """The seed of stream `offset` of a run seeded with `seed`."""
  return seed + offset
