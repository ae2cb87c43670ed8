"""gptrl: a JAX-native training stack for the InstructGPT pipeline (pretrain -> SFT -> RM -> PPO)."""

__version__ = "0.1.0"
