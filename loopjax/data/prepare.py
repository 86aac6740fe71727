"""`loopjax prepare`: text / JSONL / Parquet files -> tokenized ArrayRecord shards plus a manifest.

One shard per input file, so files are tokenized in parallel and a re-run skips every shard whose
sidecar (`<shard>.done.json`) matches the input file, the options and the tokenizer, and whose bytes
still hash to the recorded sha256. A shard is written to a temporary name and renamed only when
complete; its sidecar follows the rename; the manifest, which readers require, is removed at the start
of a run and written last. So a run killed at any moment leaves nothing that passes as done.
Empty documents (and one-token documents, which have no target) are skipped and counted in the
report and the manifest; all other bad input stops the run with an error naming the file and the fix.
"""

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil

import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from loopjax.data import readers, records, tokenizer

_ENCODE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Options:
  tokenizer: str = tokenizer.BYTE  # "byte" or a path to a HF tokenizer.json
  text_field: str = "text"  # JSONL field / Parquet column holding the text
  txt_separator: str | None = None  # split .txt files into documents at this string (None: one per file)
  bos_token: str | None = None  # document-start token; None = the tokenizer's usual one, "" = none


def _fingerprint(input_path: str, options: Options, identity: dict) -> dict:
  stat = os.stat(input_path)
  return {"input": os.path.abspath(input_path), "input_bytes": stat.st_size,
          "input_mtime_ns": stat.st_mtime_ns, "text_field": options.text_field,
          "txt_separator": options.txt_separator, "tokenizer": identity}


def finished_shard(shard_path: str, fingerprint: dict | None = None) -> dict | None:
  """The sidecar summary if the shard is complete and verified (and matches fingerprint), else None."""
  try:
    with open(shard_path + records.DONE_SUFFIX) as f:
      summary = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  if fingerprint is not None and summary.get("fingerprint") != fingerprint:
    return None
  if not os.path.exists(shard_path) or records.sha256_file(shard_path) != summary.get("sha256"):
    return None
  return summary


def _write_records(input_path: str, tmp_path: str, options: Options, tok) -> dict:
  counts = {"documents": 0, "tokens": 0, "max_document_tokens": 0, "skipped_empty": 0,
            "skipped_one_token": 0, "text_bytes": 0}
  dtype = records.token_dtype(tok.vocab_size)
  writer = ArrayRecordWriter(tmp_path, "group_size:1")

  def flush(texts):
    for ids in tok.encode_batch(texts):
      ids = tokenizer.with_bos(ids, tok.bos_id)
      if len(ids) < 2:
        counts["skipped_one_token"] += 1
        continue
      writer.write(ids.astype(dtype).tobytes())
      counts["documents"] += 1
      counts["tokens"] += len(ids)
      counts["max_document_tokens"] = max(counts["max_document_tokens"], len(ids))

  texts = []
  for text in readers.read_documents(input_path, text_field=options.text_field,
                                     txt_separator=options.txt_separator):
    if text is None:
      counts["skipped_empty"] += 1
      continue
    texts.append(text)
    counts["text_bytes"] += len(text.encode("utf-8"))
    if len(texts) == _ENCODE_BATCH:
      flush(texts)
      texts = []
  flush(texts)
  writer.close()
  return counts


def prepare_shard(input_path: str, shard_path: str, options: Options) -> dict:
  """Tokenizes one input file into one shard unless a verified identical shard exists; its summary."""
  tok = tokenizer.load(options.tokenizer, options.bos_token)
  fingerprint = _fingerprint(input_path, options, tok.identity())
  done = finished_shard(shard_path, fingerprint)
  if done is not None:
    return {**done, "reused": True}
  tmp_path = f"{shard_path}.tmp-{os.getpid()}"
  try:
    counts = _write_records(input_path, tmp_path, options, tok)
    summary = {**counts, "path": os.path.basename(shard_path), "bytes": os.path.getsize(tmp_path),
               "sha256": records.sha256_file(tmp_path), "fingerprint": fingerprint}
    os.replace(tmp_path, shard_path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
  records.write_json_atomic(shard_path + records.DONE_SUFFIX, summary)
  return {**summary, "reused": False}


def _run_jobs(jobs, num_workers: int, progress: bool) -> list[dict]:
  bar = tqdm.tqdm(total=len(jobs), unit="file", desc="prepare", disable=not progress)
  if num_workers <= 0:
    results = []
    for job in jobs:
      results.append(prepare_shard(*job))
      bar.update()
  else:
    # spawn, not fork: the caller may have JAX (and its threads) loaded.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      futures = [pool.submit(prepare_shard, *job) for job in jobs]
      for _ in concurrent.futures.as_completed(futures):
        bar.update()
      results = [f.result() for f in futures]
  bar.close()
  return results


def prepare(inputs: list[str], output_dir: str, options: Options = Options(), *,
            num_workers: int = 0, progress: bool = True) -> dict:
  """Prepares `inputs` (files or directories) into `output_dir`; returns the manifest it wrote.

  num_workers: processes tokenizing files in parallel (0 = in this process).
  Raises readers.InputError / tokenizer.TokenizerError on bad input.
  """
  files = readers.expand_inputs(inputs)
  tok = tokenizer.load(options.tokenizer, options.bos_token)  # fail early, before any work
  os.makedirs(output_dir, exist_ok=True)
  manifest_path = os.path.join(output_dir, records.MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  for name in os.listdir(output_dir):  # leftovers of a killed run
    if ".tmp-" in name and name.startswith(("shard-", records.MANIFEST)):
      os.remove(os.path.join(output_dir, name))
  jobs = [(path, os.path.join(output_dir, f"shard-{i:05d}.arrayrecord"), options)
          for i, path in enumerate(files)]
  shards = _run_jobs(jobs, num_workers, progress)
  total = lambda key: sum(s[key] for s in shards)
  manifest = {
      "format": records.FORMAT, "tokenizer": tok.identity(), "dtype": records.token_dtype(tok.vocab_size).str,
      "documents": total("documents"), "tokens": total("tokens"), "text_bytes": total("text_bytes"),
      "max_document_tokens": max(s["max_document_tokens"] for s in shards),
      "skipped": {"empty_documents": total("skipped_empty"),
                  "one_token_documents": total("skipped_one_token")},
      "shards": [{k: s[k] for k in ("path", "bytes", "sha256", "documents", "tokens")}
                 | {"input": s["fingerprint"]["input"]} for s in shards],
  }
  keep_tokenizer(options.tokenizer, output_dir)
  records.write_json_atomic(manifest_path, manifest)
  return {**manifest, "reused_shards": sum(s["reused"] for s in shards)}


def keep_tokenizer(spec: str, output_dir: str):
  """A copy of an HF tokenizer.json beside the corpus (its sha256 is in the manifest), so the runs trained
  on it can ship their tokenizer (`loopjax export-hf`) without being told where it was."""
  target = os.path.join(output_dir, records.TOKENIZER)
  if spec != tokenizer.BYTE and not (os.path.exists(target) and os.path.samefile(spec, target)):
    shutil.copyfile(spec, target)


def report(manifest: dict) -> str:
  """The end-of-run summary, naming every skip so that none is silent."""
  skipped = manifest["skipped"]
  return (f"prepared {manifest['documents']} documents, {manifest['tokens']} tokens in "
          f"{len(manifest['shards'])} shards ({manifest['reused_shards']} reused, already complete); "
          f"skipped {skipped['empty_documents']} empty and {skipped['one_token_documents']} "
          "one-token documents")
