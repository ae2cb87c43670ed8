"""The stage registry (gptrl/stages/__init__.py) is the one list the launcher, pipeline, config loader, report
and memory check read: every entry resolves to a module with `run` and to a config class whose `stage` default
is its name."""
import dataclasses

import pytest

from gptrl import config as config_lib
from gptrl import report
from gptrl import stages


@pytest.mark.parametrize("name", stages.NAMES)
def test_every_stage_has_a_module_with_run_and_its_config_class(name):
  stage = stages.get(name)
  assert callable(stages.module(name).run)
  cls = config_lib.STAGE_CONFIGS[name]
  assert cls.__name__ == stage.config
  assert {f.name: f.default for f in dataclasses.fields(cls)}["stage"] == name
  if stage.init_from:
    assert stage.init_from in stages.PIPELINE_ORDER[:stages.PIPELINE_ORDER.index(name)]


def test_every_reader_uses_the_registry_order():
  assert config_lib.PIPELINE_STAGES == stages.PIPELINE_ORDER == report.STAGES
  assert config_lib.PipelineConfig().stages == stages.DEFAULT_PIPELINE
  assert list(stages.DEFAULT_PIPELINE) == [s for s in stages.PIPELINE_ORDER if s in stages.DEFAULT_PIPELINE]
  assert set(stages.POLICY_RL) <= set(stages.PIPELINE_ORDER)
  with pytest.raises(KeyError, match="unknown stage 'labell'"):
    stages.get("labell")
