"""Print the parameter count of a config: loopjax params --config configs/ouro_1p4b.py.

The total first, then where it sits (the looped stack, embeddings, LM head, the rest), and for a staged
recipe each phase's total (an upscale changes it).
"""

from loopjax.cli import config_args


def add_arguments(parser):
  config_args.add_arguments(parser)


def run(args) -> int:
  import jax

  from loopjax.model import model_kind
  from loopjax.train.state import count_params, model_graph
  from flax import nnx
  cfg = args.config
  print(f"parameters  {count_params(cfg.model):,}")
  groups = nnx.to_pure_dict(model_graph(cfg.model)[1])
  stack = model_kind(cfg.model.kind).stack_key
  for name, tree in groups.items():
    label = f"{name} ({cfg.model.num_layers} layers, run T={cfg.model.loop_steps} times)" if name == stack else name
    print(f"  {label:40s} {sum(x.size for x in jax.tree.leaves(tree)):>16,}")
  layers = cfg.model.num_layers
  for ph in cfg.phases:  # of the model's fields only the layer count changes between phases (an upscale)
    layers = ph.upscale.layers or layers
    model = cfg.model.copy_and_resolve_references()
    model.num_layers = layers
    print(f"  phase {ph.name:34s} {count_params(model):>16,}  ({layers} layers)")
  return 0
