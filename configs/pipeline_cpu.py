"""The whole InstructGPT pipeline on 2 CPU cores in one command: pretrain -> SFT -> label -> reward -> best-of-n ->
PPO, then an HTML report (about 30 minutes).

  python -m gptrl.launch --config configs/pipeline_cpu.py
  -> runs/pipeline_cpu/{pretrain,sft,label,reward,bon,ppo}/ and runs/pipeline_cpu/report.html

Re-running the same command after an interruption skips the finished stages and resumes the interrupted one.
Each stage's settings are those of its own config file (configs/<stage>_cpu.py), pretraining and SFT shortened
here; override any of them as `--config.<stage>.<key>=value`, e.g.
`--config.ppo.train.steps=40`. Run only some stages, starting from an existing run:

  python -m gptrl.launch --config configs/pipeline_cpu.py --config.stages="('sft','label','reward','ppo')" \\
      --config.sft.init.checkpoint=runs/pretrain_cpu

The other policy optimisers run on the same SFT model, reward model and eval prompts when named in `stages`
(each about as long as PPO), and the report puts them all on one gold-versus-KL figure:

  python -m gptrl.launch --config configs/pipeline_cpu.py \
      --config.stages="('pretrain','sft','label','reward','bon','ppo','grpo','rloo','rsft','dpo')"

The loop (InstructGPT's "iterative improvement"): a second round takes feedback on the PPO policy, from users
simulated by the labelling judge talking to it through gptrl.serve (or, with feedback.sources, from real users'
feedback folders of `python -m gptrl.serve`), retrains SFT on the demonstrations + the new ones and the reward
model on the comparisons + the new ones, then continues PPO from round 1's policy; the report compares the rounds
(about 20 more minutes):

  python -m gptrl.launch --config configs/pipeline_cpu.py --config.rounds=2
  -> runs/pipeline_cpu/round2/{feedback,sft,reward,ppo}/

Variants after the colon: `tiny` (every stage's toy variant; seconds per stage, for smoke tests).
"""
import os

import ml_collections

from gptrl import config as config_lib


def _stage_config(name: str, variant: str) -> ml_collections.ConfigDict:
  """configs/<name>_cpu.py's config (the same file `--config configs/<name>_cpu.py` runs)."""
  return config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}_cpu.py"),
                                     variant)


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/pipeline_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  c = config_lib.as_configdict(config_lib.PipelineConfig)  # by default every stage, then report.html
  c.workdir = "runs/pipeline_cpu" if not variant else "runs/pipeline_cpu_tiny"

  for name in config_lib.PIPELINE_STAGES:
    c[name] = _stage_config(name, variant)
  # The pipeline sets each stage's workdir (<workdir>/<stage>) and wires its inputs to the earlier stages'
  # sub-folders. A stage whose input stage is left out of `stages` reads the path set here instead, which must
  # then be given: "<stage>" stands for "the pipeline's own", and is refused if that stage does not run.
  c.sft.init.checkpoint = "<pretrain>"
  for name in ("label", "reward", "bon", "ppo", "grpo", "rloo", "rsft", "dpo"):
    c[name].init.checkpoint = "<sft>"
  for name in ("bon", "ppo", "grpo", "rloo", "rsft", "dpo"):  # (DPO's only scores its evals)
    c[name].reward_model.checkpoint = "<reward>"
  # (Best-of-n, GRPO, RLOO, RS-FT and DPO take PPO's held-out prompts, reply length, temperature and judges:
  # gptrl/stages/pipeline.py.)
  c.reward.data.sources = c.dpo.data.sources = ("<label>/comparisons.jsonl",)
  c.feedback.init.checkpoint = "<ppo>"  # (later rounds serve the previous round's policy)

  if not variant:
    # Pretraining and SFT shorter than their stand-alone configs, so that the pipeline takes about 30 minutes on
    # 2 cores; measured times are in README.
    c.pretrain.train.steps = 240
    c.sft.train.steps = 150
  return c
