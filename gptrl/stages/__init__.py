"""Pipeline stages. Each module exposes `run(config)` taking its typed config from gptrl/config.py."""
