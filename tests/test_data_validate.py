"""validate_data: every bad data config is one ConfigError naming the field and the fix."""

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from loopjax import config
from loopjax.data import prepare
from loopjax.data.validate import validate_data


def corpus(tmp_path, name, tokenizer_spec="byte"):
  src = tmp_path / f"{name}.txt"
  src.write_text(f"some text for {name}")
  out = str(tmp_path / name)
  prepare.prepare([str(src)], out, prepare.Options(tokenizer=tokenizer_spec))
  return out


def test_defaults_and_a_prepared_mixture_are_valid(tmp_path):
  validate_data(config.default_config())
  c = config.default_config()
  c.data.source = f"{corpus(tmp_path, 'a')},mano"
  c.data.weights = "0.9,0.1"
  validate_data(c)


CASES = {
    "missing corpus": ({"data.source": "/nope/corpus"}, "config.data.source: '/nope/corpus' is neither"),
    "unfinished corpus": ({"data.source": "EMPTY_DIR"}, "config.data.source: EMPTY_DIR/manifest.json does "
                          "not exist"),
    "weights count": ({"data.source": "mano,capo", "data.weights": "1"}, "config.data.weights: 1 weights "
                      "for 2 sources"),
    "weights text": ({"data.weights": "a,b"}, "config.data.weights: 'a,b' is not"),
    "packing": ({"data.packing": "greedy"}, "config.data.packing: 'greedy' is not one of"),
    "loss_on": ({"data.loss_on": "some"}, "config.data.loss_on: 'some'"),
    "mano_max_ops": ({"data.mano_max_ops": 0}, "config.data.mano_max_ops: must be >= 1"),
    "hops": ({"data.multihop_max_hops": 1}, "config.data.multihop_max_hops: must be >= 2"),
    "workers": ({"data.num_workers": -1}, "config.data.num_workers: must be >= 0"),
    "vocab": ({"data.mano_max_ops": 24, "model.vocab_size": 40}, "config.model.vocab_size: 40 is smaller "
              "than the 53 token ids"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_names_field_and_fix(tmp_path, case):
  overrides, message = CASES[case]
  (tmp_path / "empty").mkdir()
  c = config.default_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value.replace("EMPTY_DIR", str(tmp_path / "empty")) if isinstance(value, str) else value
  with pytest.raises(config.ConfigError) as e:
    validate_data(c)
  assert str(e.value).startswith(message.replace("EMPTY_DIR", str(tmp_path / "empty")))
  assert ". Fix: " in str(e.value) and str(e.value).endswith(".")


def test_corpora_with_different_tokenizers_do_not_mix(tmp_path):
  words = tokenizers.Tokenizer(models.WordLevel(
      {"<|endoftext|>": 0, "[UNK]": 1, "some": 2, "text": 3, "for": 4}, unk_token="[UNK]"))
  words.pre_tokenizer = pre_tokenizers.Whitespace()
  words.save(str(tmp_path / "words.json"))
  c = config.default_config()
  c.data.source = f"{corpus(tmp_path, 'a')},{corpus(tmp_path, 'b', str(tmp_path / 'words.json'))}"
  with pytest.raises(config.ConfigError, match="config.data.source: the corpora were prepared with "
                     "different tokenizers"):
    validate_data(c)
