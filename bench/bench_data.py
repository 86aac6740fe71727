"""Data throughput on this machine: `prepare` MB/s of text, and pipeline batches/s per config.

Run: python bench/bench_data.py [--mb 16]. Writes a synthetic English-like corpus to a temp dir,
prepares it with the byte tokenizer and a 4096-token BPE trained here, then times the grain pipeline
(in-process, as the CPU run uses it) on Mano and on the prepared corpus. Compare the batches/s with the
train step's steps/s: the pipeline should be at least 5x faster.
"""

import argparse
import itertools
import json
import os
import tempfile
import time

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from loopjax import config
from loopjax.data import make_train_iterator, prepare

WORDS = ("the a loop step model token layer depth shared weights exit gate learns reasons answer "
         "of in to and is was for with on as by at from that this which").split()


def write_corpus(root: str, megabytes: float, files: int = 4) -> list[str]:
  rng = np.random.default_rng(0)
  paths = []
  for i in range(files):
    path = os.path.join(root, f"part{i}.jsonl")
    with open(path, "w") as f:
      written = 0
      while written < megabytes * 1e6 / files:
        line = json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(50, 400)))) + "."})
        f.write(line + "\n")
        written += len(line) + 1
    paths.append(path)
  return paths


def train_bpe(root: str, paths: list[str]) -> str:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  with open(paths[0]) as f:
    sample = [json.loads(line)["text"] for line in itertools.islice(f, 2000)]
  tok.train_from_iterator(sample, trainers.BpeTrainer(
      vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = os.path.join(root, "bpe4096.json")
  tok.save(path)
  return path


def time_prepare(paths, out, spec, workers) -> float:
  start = time.perf_counter()
  manifest = prepare.prepare(paths, out, prepare.Options(tokenizer=spec), num_workers=workers, progress=False)
  return manifest["text_bytes"] / 1e6 / (time.perf_counter() - start)


def time_pipeline(source: str, seq_len: int, batch: int, packing: str, seconds: float = 3.0) -> float:
  c = config.default_config().data
  c.source, c.packing = source, packing
  it = make_train_iterator(c, seq_len=seq_len, global_batch=batch, seed=0)
  next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    n += 1
  return n / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mb", type=float, default=16.0, help="corpus size in MB")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    paths = write_corpus(root, args.mb)
    bpe = train_bpe(root, paths)
    print(f"prepare, {args.mb:g} MB JSONL in {len(paths)} files (MB/s of text)")
    print(f"| tokenizer | workers | MB/s |\n|---|---|---|")
    for name, spec in (("byte", "byte"), ("BPE 4096", bpe)):
      for workers in (0, 2):
        out = os.path.join(root, f"out-{name}-{workers}".replace(" ", ""))
        print(f"| {name} | {workers} | {time_prepare(paths, out, spec, workers):.1f} |")
    corpus = {"byte": os.path.join(root, "out-byte-0"), "BPE": os.path.join(root, "out-BPE4096-0")}
    print("\npipeline, in-process (batches/s)")
    print("| source | packing | seq 128 x batch 8 | seq 512 x batch 16 |\n|---|---|---|---|")
    for source, path in (("mano", "mano"), ("byte corpus", corpus["byte"]), ("BPE corpus", corpus["BPE"])):
      for packing in ("document", "concat"):
        small, large = (time_pipeline(path, s, b, packing) for s, b in ((128, 8), (512, 16)))
        print(f"| {source} | {packing} | {small:.1f} | {large:.1f} |")


if __name__ == "__main__":
  main()
