"""The output directory of prepare: what it already holds at start-up, and the manifests written last.

A finished corpus is a directory with `manifest.json`, written after everything else (the validation
split's manifest included), so a run killed at any moment leaves nothing that passes as a corpus. The
manifest records its source (every input's path, size and mtime, the options, the tokenizer's
identity): a re-run with the same source finds its own corpus and does nothing; a run with another
source refuses to replace it. A run that met bad input writes `prepare_errors.json` instead, one entry
per failed file, and no manifest.
"""

import os

from etils import epath

from loopjax import storage
from loopjax.data import records, tokenizer
from loopjax.data.prepare import shard as shard_lib
from loopjax.data.prepare import split as split_lib
from loopjax.data.prepare.options import PrepareError

ERRORS = "prepare_errors.json"
_OURS = (records.MANIFEST, records.TOKENIZER, ERRORS, split_lib.VALIDATION)  # besides shards and temporaries


def source(fingerprints: list[dict]) -> dict:
  """What a corpus was made from, as its manifest records it: the per-file fingerprints, merged."""
  first = fingerprints[0]
  return {"options": first["options"], "tokenizer": first["tokenizer"],
          "inputs": [{k: f[k] for k in ("input", "input_bytes", "input_mtime")} for f in fingerprints]}


def _is_ours(name: str) -> bool:
  return name in _OURS or name.startswith("shard-") or ".tmp-" in name


def existing_corpus(output: str, wanted_source) -> dict | None:
  """The manifest of the corpus already at `output` if it was made from `wanted_source()`; None when
  `output` holds no corpus. PrepareError (one line) when it holds another corpus or foreign files."""
  root = storage.run_path(output)
  if root.exists() and not root.is_dir():
    raise PrepareError(f"--output {output} is a file. Fix: give a directory (new or empty)")
  if not root.exists():
    return None
  if (root / records.MANIFEST).exists():
    manifest = records.read_json(root / records.MANIFEST)
    wanted = wanted_source()
    if manifest.get("source") == wanted:
      return manifest
    differ = [k for k in ("inputs", "options", "tokenizer") if (manifest.get("source") or {}).get(k) != wanted[k]]
    raise PrepareError(f"--output {output} already holds a different corpus (its {', '.join(differ) or 'format'} "
                       "differ). Fix: choose a new --output, or delete that directory to rebuild it")
  foreign = sorted(p.name for p in root.iterdir() if not _is_ours(p.name))
  if foreign:
    raise PrepareError(f"--output {output} holds files prepare did not write ({foreign[0]!r}, ...). Fix: "
                       "choose a new or empty directory")
  return None


def clear_leftovers(output: str):
  """Removes what a killed run left that could mislead: local temporary files (gs:// has none: shards are
  uploaded under their final names) and a validation manifest without its corpus's manifest."""
  for directory in (shard_lib.split_dir(output, split_lib.TRAIN), shard_lib.split_dir(output, split_lib.VALIDATION)):
    if not directory.is_dir():
      continue
    for path in directory.iterdir():
      if ".tmp-" in path.name or (directory.name == split_lib.VALIDATION and path.name == records.MANIFEST):
        path.unlink()


def _split_manifest(summaries: list[dict], name: str, tokenizer_identity: dict) -> dict:
  shards = [s["splits"][name] | {"input": s["input"]} for s in summaries]
  total = lambda key: sum(s[key] for s in shards)  # noqa: E731
  return {
      "format": records.FORMAT, "tokenizer": tokenizer_identity,
      "dtype": records.token_dtype(tokenizer_identity["vocab_size"]).str,
      "documents": total("documents"), "records": total("records"), "tokens": total("tokens"),
      "text_bytes": total("text_bytes"), "max_document_tokens": max(s["max_document_tokens"] for s in shards),
      "shards": [{k: s[k] for k in ("path", "bytes", "sha256", "documents", "records", "tokens", "input")}
                 for s in shards],
  }


def _remove_stale_shards(directory: epath.Path, keep: set[str]):
  """Shards of an earlier, unfinished run over other inputs: not part of this corpus."""
  for path in directory.iterdir() if directory.is_dir() else ():
    if path.name.startswith("shard-") and path.name.split(".")[0] + ".arrayrecord" not in keep:
      path.unlink()


def write_corpus(output: str, summaries: list[dict], tokenizer_spec: str) -> dict:
  """The last step of a run: `prepare_errors.json` if any file failed, else the manifests (validation's,
  then the corpus's own, last). Returns what it wrote."""
  root = storage.run_path(output)
  summaries = sorted(summaries, key=lambda s: s["index"])
  failed = [{"input": s["input"], "error": s["error"]} for s in summaries if s.get("error")]
  if failed:
    records.write_json_atomic(root / ERRORS, {"errors": failed})
    return {"errors": failed}
  if (root / ERRORS).exists():
    (root / ERRORS).unlink()
  identity = summaries[0]["fingerprint"]["tokenizer"]
  manifest = _split_manifest(summaries, split_lib.TRAIN, identity)
  for name in summaries[0]["splits"]:
    _remove_stale_shards(shard_lib.split_dir(output, name), {s["splits"][name]["path"] for s in summaries})
  if split_lib.VALIDATION in summaries[0]["splits"]:
    held_out = _split_manifest(summaries, split_lib.VALIDATION, identity) | {"split": split_lib.VALIDATION}
    records.write_json_atomic(shard_lib.split_dir(output, split_lib.VALIDATION) / records.MANIFEST, held_out)
    manifest["validation"] = {"path": split_lib.VALIDATION, "documents": held_out["documents"],
                              "tokens": held_out["tokens"]}
  manifest["skipped"] = {k: sum(s["skipped"][k] for s in summaries) for k in shard_lib.SKIP_REASONS}
  manifest["source"] = source([s["fingerprint"] for s in summaries])
  _keep_tokenizer(tokenizer_spec, root)
  records.write_json_atomic(root / records.MANIFEST, manifest)
  return manifest


def _keep_tokenizer(spec: str, root: epath.Path):
  """A copy of an HF tokenizer.json beside the corpus (its sha256 is in the manifest), so the runs trained
  on it can ship their tokenizer (`loopjax export-hf`) without being told where it was."""
  target = root / records.TOKENIZER
  if spec != tokenizer.BYTE and os.fspath(storage.run_path(spec)) != os.fspath(target):
    storage.copy_file(storage.run_path(spec), target)


def report(manifest: dict, run: dict | None = None) -> str:
  """The end-of-run summary, naming every skip so that none is silent; `run`: prepare()'s "run" entry."""
  skipped = manifest["skipped"]
  bad = ", ".join(f"{skipped[k]} {k.replace('_', ' ')}" for k in shard_lib.SKIP_REASONS[2:] if skipped[k])
  files_text = f" ({run['reused']} reused, already complete)" if run else ""
  held_out = manifest.get("validation")
  return (f"prepared {manifest['documents']} documents, {manifest['tokens']} tokens in "
          f"{len(manifest['shards'])} shards{files_text}"
          + (f"; held out {held_out['documents']} documents ({held_out['tokens']} tokens) in validation/"
             if held_out else "")
          + f"; skipped {skipped['empty_documents']} empty and {skipped['one_token_documents']} one-token "
          "documents" + (f", and bad records: {bad}" if bad else ""))
