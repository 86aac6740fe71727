"""Print a config's resolved keys and values: loopjax config --config configs/smoke.py [--config.a.b=V ...].

`--keys` lists every key instead, with its default and the comment that documents it in
loopjax/config.py (or config_longrun.py, config_checkpoint.py): the reference of what can be overridden.
"""

import json
import pathlib
import re

from loopjax.cli import config_args

# `  m.vocab_size = 512  # comment` inside default_config(), and `c.model = m = ...` naming a section.
_KEY = re.compile(r"^\s+(\w+)\.(\w+) = (.*?)(?:\s+#\s*(.*))?$")
_SECTION = re.compile(r"^\s+c\.(\w+) = (\w+) = ")


def add_arguments(parser):
  parser.add_argument("--config", dest="config_file", metavar="FILE[:ARG]", default=None,
                      help=config_args.HELP + " (default: loopjax's defaults)")
  parser.add_argument("--keys", action="store_true", help="list every key with its default and its documentation")


def run(args) -> int:
  rows = list(_flat(args.config))
  if args.keys:
    documented = key_help()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
      print(f"{key:{width}s}  {_show(value)}" + (f"  # {documented[key]}" if documented.get(key) else ""))
    return 0
  for key, value in rows:
    print(f"{key} = {_show(value)}")
  return 0


def _show(value) -> str:
  return json.dumps(value) if isinstance(value, (str, float, int, bool, list, dict)) or value is None else repr(value)


def _flat(node, prefix: str = ""):
  """(dotted key, value) in definition order; a recipe's phases as phases[i].<field>."""
  for name, value in node.items():
    if name == "phases" and not prefix:
      for i, ph in enumerate(value):
        for key, v in _flat(ph, f"phases[{i}]."):
          yield key, v
    elif hasattr(value, "items"):
      yield from _flat(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}", value


def key_help() -> dict[str, str]:
  """Dotted key -> its comment in the source (the comment lines above a key and the one after it)."""
  from loopjax import config, config_checkpoint, config_longrun
  helps, sections, pending = {}, {"t": "train", "k": "checkpoint"}, []
  for module in (config, config_longrun, config_checkpoint):
    for line in pathlib.Path(module.__file__).read_text().splitlines():
      if m := _SECTION.match(line):
        sections[m.group(2)] = m.group(1)
      elif line.strip().startswith("#"):
        pending.append(line.strip().lstrip("#").strip())
      elif (m := _KEY.match(line)) and m.group(1) in sections:
        helps[f"{sections[m.group(1)]}.{m.group(2)}"] = " ".join(pending + [m.group(4) or ""]).strip()
        pending = []
      else:
        pending = []
  return helps
