"""Data throughput on this machine: `prepare` (the Beam pipeline, local runner) MB/s and tokens/s with 1 and 2
worker processes, against the rate one training host consumes; then pipeline batches/s per config.

Run: python bench/bench_data.py [--mb 32] [--rounds 3]. Writes a synthetic English-like corpus to a temp dir
and prepares it with the byte tokenizer and a 4096-token BPE trained here, 1 and 2 workers interleaved
round by round (a shared machine's load drifts; interleaving exposes both counts to the same drift), then
times the grain pipeline (in-process, as the CPU run uses it) on Mano and on the prepared corpus. With 1
worker the pipeline runs inside this process; with 2, two worker processes each pay the Beam + JAX import
(seconds), which the wall-clock rates include. The consumption rate is Ouro-1.4B's on v5p-128 at 100% MFU
(loopjax compile's FLOPs count): one host's 4 chips' peak over the training FLOPs per token. Last, the
machine's own ceiling, in the same rounds: raw BPE encoding (no Beam) in 2 concurrent processes against 1.
"""

import argparse
import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from loopjax import config, metrics, preflight
from loopjax.cli import config_args
from loopjax.data import make_train_iterator, prepare
from loopjax.model import flops_per_token

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


def time_prepare(paths, out, spec, workers) -> dict:
  """Rates of one prepare run into a new directory `out`: over its wall time (start-up included) and over
  its busy time (first file started to last file finished, from the run's Beam metrics)."""
  start = time.perf_counter()
  manifest = prepare.prepare(paths, out, prepare.Options(tokenizer=spec),
                             pipeline_args=[f"--direct_num_workers={workers}"])
  wall, busy = time.perf_counter() - start, manifest["run"]["busy_seconds"]
  return {"MB/s": manifest["text_bytes"] / 1e6 / wall, "tokens/s": manifest["tokens"] / wall,
          "busy MB/s": manifest["text_bytes"] / 1e6 / busy, "busy tokens/s": manifest["tokens"] / busy}


OURO_1P4B = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ouro_1p4b.py")


def host_tokens_per_second(config_file: str = OURO_1P4B, topology: str = "v5p-128") -> float:
  """Tokens/s one host of `topology` trains on at 100% MFU: its chips' dense bf16 peak over the
  loop-aware training FLOPs per token (the count `loopjax compile` reports)."""
  cfg = config_args.load(config_file, [])
  slice_ = preflight.parse_topology(topology)
  chips_per_host = math.prod(slice_.host_bounds)
  peak = metrics.PEAK_FLOPS_PER_DEVICE[slice_.chip.kind]
  return chips_per_host * peak / flops_per_token(cfg.model, cfg.train.seq_len)


def _encode_all(spec: str, texts: list[str], seconds) -> None:
  """One process's raw tokenizer work: `texts` encoded 256 at a time on one thread, as a worker does."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  tok = tokenizers.Tokenizer.from_file(spec)
  start = time.perf_counter()
  for i in range(0, len(texts), 256):
    tok.encode_batch_fast(texts[i:i + 256], add_special_tokens=False)
  seconds.put(time.perf_counter() - start)


def machine_scaling(spec: str, texts: list[str]) -> float:
  """The machine's own ceiling for 2 workers: the aggregate rate of raw BPE encoding in 2 concurrent
  processes over 1, without Beam (a busy shared machine may not give a second process a second core)."""
  context = multiprocessing.get_context("spawn")
  rate = {}
  for n in (1, 2):
    seconds = context.Queue()
    procs = [context.Process(target=_encode_all, args=(spec, texts, seconds)) for _ in range(n)]
    for proc in procs:
      proc.start()
    for proc in procs:
      proc.join()
    rate[n] = n / max(seconds.get() for _ in procs)
  return rate[2] / rate[1]


def prepare_table(root: str, paths: list[str], bpe: str, rounds: int) -> dict[str, str]:
  """Prints the workers table (medians over rounds); the corpora of the first round by tokenizer."""
  host = host_tokens_per_second()
  with open(paths[0]) as f:
    texts = [json.loads(line)["text"] for line in itertools.islice(f, 4000)]
  runs, raw = {}, []
  for r in range(rounds):
    for name, spec in (("byte", "byte"), ("BPE 4096", bpe)):
      for workers in (1, 2):
        out = os.path.join(root, f"out-{name}-{workers}-{r}".replace(" ", ""))
        runs.setdefault((name, workers), []).append(time_prepare(paths, out, spec, workers))
        if r or workers == 2:
          shutil.rmtree(out)
    raw.append(machine_scaling(bpe, texts))
  median = {key: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for key, rs in runs.items()}
  print(f"\nOuro-1.4B on v5p-128, one host (4 chips) at 100% MFU: {host:,.0f} tokens/s")
  print("| tokenizer | workers | MB/s | tokens/s | x 1 worker | busy MB/s | busy tokens/s | busy x 1 worker "
        "| busy tokens/s / one host's |\n|---|---|---|---|---|---|---|---|---|")
  for (name, workers), m in median.items():
    one = median[(name, 1)]
    print(f"| {name} | {workers} | {m['MB/s']:.1f} | {m['tokens/s']:,.0f} | {m['tokens/s'] / one['tokens/s']:.2f} "
          f"| {m['busy MB/s']:.1f} | {m['busy tokens/s']:,.0f} | {m['busy tokens/s'] / one['busy tokens/s']:.2f} "
          f"| {m['busy tokens/s'] / host:.1f} |")
  for name in ("byte", "BPE 4096"):  # per round: both worker counts under the same load
    pairs = list(zip(runs[(name, 1)], runs[(name, 2)]))
    ratios = {k: ", ".join(f"{two[k] / one[k]:.2f}" for one, two in pairs) for k in ("tokens/s", "busy tokens/s")}
    print(f"{name}, 2 / 1 workers by round: wall {ratios['tokens/s']}; busy {ratios['busy tokens/s']}")
  print(f"raw BPE encoding without Beam, 2 / 1 processes by round: {', '.join(f'{x:.2f}' for x in raw)}")
  return {name: os.path.join(root, f"out-{name}-1-0".replace(" ", "")) for name in ("byte", "BPE 4096")}


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
  parser.add_argument("--mb", type=float, default=32.0, help="corpus size in MB")
  parser.add_argument("--files", type=int, default=8, help="input files (the unit of work of a worker)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 1 and 2 workers")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    paths = write_corpus(root, args.mb, args.files)
    bpe = train_bpe(root, paths)
    print(f"prepare, local runner (FnApiRunner), {args.mb:g} MB JSONL in {len(paths)} files, {os.cpu_count()} cores, "
          f"median of {args.rounds} interleaved rounds")
    corpus = prepare_table(root, paths, bpe, args.rounds)
    print("\npipeline, in-process (batches/s)")
    print("| source | packing | seq 128 x batch 8 | seq 512 x batch 16 |\n|---|---|---|---|")
    for source, path in (("mano", "mano"), ("byte corpus", corpus["byte"]), ("BPE corpus", corpus["BPE 4096"])):
      for packing in ("document", "concat"):
        small, large = (time_pipeline(path, s, b, packing) for s, b in ((128, 8), (512, 16)))
        print(f"| {source} | {packing} | {small:.1f} | {large:.1f} |")


if __name__ == "__main__":
  main()
