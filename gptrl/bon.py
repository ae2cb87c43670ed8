"""Best-of-n against a reward model: `python -m gptrl.bon` is `python -m gptrl.launch` for the "bon" stage.

  python -m gptrl.bon                                          # configs/bon_cpu.py: runs/sft_cpu + runs/reward_cpu
  python -m gptrl.bon --config configs/bon_cpu.py --config.bon.samples=128 --config.workdir=runs/bon_128

Writes `<workdir>/bon.json`: for n = 1, 2, 4, ..., N, the gold (the RM's labeller), proxy (the RM's) and
watch-judge scores of the RM's pick among n replies of the SFT policy to each held-out prompt, averaged over
every n-subset of N samples, at KL(n) = log n - (n-1)/n (gptrl/stages/bon.py). For one prompt at a time, with
any chat checkpoint: `python -m gptrl.sample --best-of N --reward-model RUN --prompt TEXT`.
"""
from __future__ import annotations

import sys

DEFAULT_CONFIG = "configs/bon_cpu.py"


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    argv[1:1] = ["--config", DEFAULT_CONFIG]
  from gptrl import launch  # pylint: disable=import-outside-toplevel
  launch.main(argv, expect_stage="bon", prog="gptrl.bon")


if __name__ == "__main__":
  main()
