"""List the checkpoints of a run: loopjax checkpoints WORKDIR (step, phase, size, complete); WORKDIR may be gs://."""


def add_arguments(parser):
  parser.add_argument("workdir", help="the run's directory (its checkpoints are in WORKDIR/checkpoints)")


def run(args) -> int:
  from loopjax import storage
  from loopjax.checkpoint.listing import list_checkpoints
  directory = str(storage.run_path(args.workdir) / "checkpoints")
  rows = list_checkpoints(directory)
  if not rows:
    print(f"no checkpoints in {directory}")
    return 0
  print(f"{'step':>8}  {'phase':10}  {'size':>10}  {'complete':8}  note")
  for r in sorted(rows, key=lambda r: r["step"]):
    print(f"{r['step']:>8}  {r['phase']:10}  {r['bytes'] / 2**20:>8.2f}MB  {'yes' if r['complete'] else 'NO':8}  "
          f"{r['note']}")
  return 0
