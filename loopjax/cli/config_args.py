"""`--config FILE[:ARG]` and the `--config.a.b=VALUE` overrides applied on top of it, in order.

A value is parsed by the type of the field it replaces (bool: true/false/1/0; int; float; str; any
other type, tuples and None among them, as a Python literal), and the config stays locked: a typo in a
key or a value of the wrong type stops the command before anything runs, naming the flag and the fix.
"""

import ast
import difflib

from ml_collections import ConfigDict

from loopjax.config import ConfigError, default_config, load_config_file

PREFIX = "--config."
_BOOLS = {"true": True, "1": True, "false": False, "0": False}
_EXPECTED = {bool: "true or false (or 1 or 0)", int: "a whole number", float: "a number"}

HELP = ("a config file with get_config(), e.g. configs/smoke.py; FILE:ARG calls get_config(ARG). "
        "Any key can then be overridden, in order: --config.a.b=VALUE or --config.a.b VALUE "
        "(e.g. --config.train.steps=30); VALUE is parsed by the key's type")


def add_arguments(parser):
  parser.add_argument("--config", dest="config_file", metavar="FILE[:ARG]", required=True, help=HELP)


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """argv without its `--config.a.b` overrides, and those as (key "a.b", raw value), in order.

  Taken out before argparse sees argv, because argparse cannot declare a flag per config key.
  """
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if arg == "--":
      rest += [arg, *args]
    elif arg.startswith(PREFIX):
      key, equals, value = arg[len(PREFIX):].partition("=")
      value = value if equals else next(args, None)
      if value is None:
        raise ConfigError(f"{arg} needs a value. Fix: {arg}=VALUE")
      overrides.append((key, value))
    else:
      rest.append(arg)
  return rest, overrides


def parse_value(raw: str, kind: type):
  """`raw` as a value of type `kind`; ValueError names what `kind` accepts."""
  try:
    if kind is bool:
      return _BOOLS[raw.strip().lower()]
    if kind in (int, float):
      return kind(raw)
    if kind is str:
      return raw
    return ast.literal_eval(raw)
  except (KeyError, ValueError, SyntaxError):
    raise ValueError(_EXPECTED.get(kind, f"a Python literal of type {kind.__name__}")) from None


def load(spec: str | None, overrides: list[tuple[str, str]]) -> ConfigDict:
  """The config file `spec` ("file.py" or "file.py:ARG"; None: the defaults, for a command whose --config
  is optional), locked, with `overrides` applied in order."""
  cfg = load_config_file(spec) if spec is not None else default_config()
  cfg.lock()
  for key, raw in overrides:
    apply_override(cfg, key, raw)
  return cfg


def apply_override(cfg: ConfigDict, key: str, raw: str):
  """Sets `cfg.<key>` from its command-line text; ConfigError naming `--config.<key>` and the fix."""
  flag = PREFIX + key
  *sections, field = key.split(".")
  node = cfg
  for name in sections:
    node = node.get(name) if isinstance(node, ConfigDict) else None
  if not isinstance(node, ConfigDict) or field not in node:
    raise ConfigError(f"{flag}: no such config key. Fix: {_suggest(cfg, key)}")
  current = node[field]
  if isinstance(current, ConfigDict):
    raise ConfigError(f"{flag}: {key} is a section, not a value. Fix: set one of its keys, e.g. "
                      f"{flag}.{next(iter(current.keys()))}=...")
  example = str(current).lower() if isinstance(current, bool) else current
  try:
    node[field] = parse_value(raw, node.get_type(field))
  except ValueError as error:
    raise ConfigError(f"{flag}={raw}: not {error}. Fix: give {error}, e.g. {flag}={example}") from None
  except TypeError:
    raise ConfigError(f"{flag}={raw}: a {type(current).__name__} key cannot hold this value. "
                      f"Fix: give a {type(current).__name__}, e.g. {flag}={example}") from None


def _suggest(cfg: ConfigDict, key: str) -> str:
  close = difflib.get_close_matches(key, list(_keys(cfg)), n=1, cutoff=0.8)
  if close:
    return f"did you mean {PREFIX}{close[0]}?"
  node, path = cfg, "config"
  for name in key.split(".")[:-1]:
    if not isinstance(node.get(name), ConfigDict):
      break
    node, path = node[name], f"{path}.{name}"
  return f"use a key of {path}: {', '.join(node.keys())}"


def _keys(node: ConfigDict, prefix: str = ""):
  for name, value in node.items():
    if isinstance(value, ConfigDict):
      yield from _keys(value, f"{prefix}{name}.")
    else:
      yield prefix + name
