"""Ouro-2.6B: Ouro-1.4B with the stack doubled to 48 layers (2,667,974,657 parameters)."""

from loopjax.config import load_config_file


def get_config():
  c = load_config_file("ouro_1p4b.py", relative_to=__file__)
  c.model.num_layers = 48
  return c
