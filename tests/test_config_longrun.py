"""The long-run keys (loopjax/config_longrun.py): every bad value is one ConfigError naming the field and the
fix, before anything is built; configs saved by an older loopjax still load."""

import pytest

from helpers import tiny_config
from loopjax.config import ConfigError, config_from_dict, validate


@pytest.mark.parametrize("field,value,message", [
    ("trackers", "tensorboard,comet", r"config\.train\.trackers: 'comet' is not a tracker\. Fix: list some of "
                                      r"tensorboard, jsonl, wandb, mlflow"),
    ("profile_steps", "100-105", r"config\.train\.profile_steps: '100-105' is not START:END .*Fix: e\.g\. "),
    ("profile_steps", "5:5", r"config\.train\.profile_steps: '5:5' is not START:END with 1 <= START < END"),
    ("profile_steps", "0:3", r"config\.train\.profile_steps: '0:3'"),
    ("step_timeout", -1.0, r"config\.train\.step_timeout: must be >= 0 seconds, got -1\.0\. Fix: give seconds, 0 "),
    ("step_timeout", float("nan"), r"config\.train\.step_timeout: must be >= 0 seconds, got nan"),
])
def test_a_bad_long_run_key_is_one_error_naming_it(field, value, message):
  cfg = tiny_config()
  cfg.train[field] = value
  with pytest.raises(ConfigError, match=f"^{message}") as error:
    validate(cfg, 1)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("field,value", [("trackers", "jsonl,tensorboard,wandb,mlflow"), ("profile_steps", "10:15"),
                                         ("step_timeout", float("inf")), ("step_timeout", 600.0)])
def test_good_values_pass(field, value):
  cfg = tiny_config()
  cfg.train[field] = value
  validate(cfg, 1)


def test_a_config_saved_with_the_old_profile_keys_still_loads():
  saved = tiny_config().to_dict()
  del saved["train"]["profile_steps"]
  saved["train"].update(profile_start=10, profile_steps=5)
  assert config_from_dict(saved).train.profile_steps == "10:15"
  saved["train"].update(profile_start=0, profile_steps=0)
  assert config_from_dict(saved).train.profile_steps == ""
