"""`python -m loopjax.cli <command> [flags]`, the same as the `loopjax` executable."""

from loopjax.cli import main

if __name__ == "__main__":  # spawned worker processes (grain, prepare) import this module again
  main()
