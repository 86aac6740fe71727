"""The console lines that say what a run is doing: phases starting and ending, entry transitions, compiles.

Why: a staged recipe printed eight anonymous "attention ..." / "compiled the train step ..." pairs and no
phase names, so nobody could tell from the console where a run was or what its last transition did. The
driver logs these lines (process 0 for phases; every process for compiles); phases.jsonl keeps the same
facts as data.
"""

import json

from loopjax.config import resolve_mesh_shape


def step_key(cfg, objective: str) -> str:
  """What a compiled step depends on: the segment's config less its phase's name, and its objective."""
  values = json.loads(cfg.to_json())
  values["checkpoint"]["phase"] = ""
  return json.dumps(values, sort_keys=True) + objective


def _shape(cfg) -> str:
  m, t = cfg.model, cfg.train
  return f"T={m.loop_steps}, seq {t.seq_len}, batch {t.batch_size}, {m.num_layers} layers"


def _mesh(cfg, num_devices: int) -> str:
  shape = resolve_mesh_shape(cfg.mesh, num_devices)
  return " ".join(f"{axis}={size}" for axis, size in zip(("data", "fsdp", "context", "tensor"), shape))


def entry(ph, previous, num_devices: int) -> str:
  """What entering phase `ph` after `previous` (None: the run's first phase) does to the state."""
  spec, done, mesh = ph.spec, [], _mesh(ph.segments[0].cfg, num_devices)
  if previous is not None and _mesh(previous.segments[-1].cfg, num_devices) != mesh:
    done.append(f"state moved onto mesh {mesh}")
  if previous is not None and previous.spec.objective == "gate" and spec.objective != "gate":
    done.append("left the gate stage")
  if spec.upscale.layers:
    done.append(f"upscaled {ph.layers_before} -> {spec.upscale.layers} layers ({spec.upscale.mapping})")
  if spec.optimizer_on_entry == "reset" and spec.objective == "lm" and previous is not None:
    done.append("optimizer state reset")
  if spec.objective == "gate" and (previous is None or previous.spec.objective != "gate"):
    done.append("gate stage (Stage II): only the exit gate trains")
  return "; ".join(done)


def phase_start(plan, ph, step: int, num_devices: int) -> str:
  """"phase 1b (2/6) starts at step 8 of 34: steps 9-14, T=4, seq 32, ...; entry: upscaled 2 -> 4 layers"."""
  first = ph.segments[0].cfg
  verb = "resumes" if ph.start < step else "starts"
  line = (f"phase {ph.spec.name} ({ph.index + 1}/{len(plan)}) {verb} at step {step} of {plan.total_steps}: "
          f"steps {ph.start + 1}-{ph.end}, {_shape(first)}")
  batches = sorted({s.cfg.train.batch_size for s in ph.segments})
  if len(batches) > 1:
    line += f" (batch ramps {' -> '.join(map(str, batches))})"
  line += f", mesh {_mesh(first, num_devices)}"
  previous = plan[ph.index - 1] if ph.index else None
  what = entry(ph, previous, num_devices) if ph.start == step else ""
  return line + (f"; on entry: {what}" if what else "")


def phase_end(ph, step: int, seconds: float, tokens: int, last: dict) -> str:
  """"phase 1b done at step 14: 6 steps, 1,536 tokens in 12.3 s, loss 3.2100"."""
  line = f"phase {ph.spec.name} done at step {step}: {ph.end - ph.start} steps, {tokens:,} tokens in {seconds:.1f} s"
  if "loss" in last:
    line += f", loss {last['loss']:.4f}"
  return line


def compile_line(cfg, asked: str, seconds: float) -> str:
  """One line per compiled step shape: the phase, its shape and the attention core that runs (`cfg`: the
  segment's, with model.attention resolved from what the config `asked`)."""
  return (f"phase {cfg.checkpoint.phase}: compiled the train step ({_shape(cfg)}, attention "
          f"{cfg.model.attention} (model.attention={asked})) in {seconds:.1f} s")
