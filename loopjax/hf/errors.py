"""The one error of Hugging Face import and export, reported by the CLI as a single line (exit 2)."""


class HFError(ValueError):
  """An HF directory or file that cannot be read, or an export that cannot be written; names the path and the fix."""
