"""`loopjax train` as one of several JAX processes on localhost: python _multiprocess_train.py ID COUNT PORT ARGS...

Each process gets 4 fake CPU devices (set before any backend use) and joins the others through
jax.distributed, so the run sees one global mesh of 4 * COUNT devices.
"""

import sys

import jax

if __name__ == "__main__":
  process_id, count, port = (int(x) for x in sys.argv[1:4])
  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                             process_id=process_id)
  from loopjax import cli
  sys.argv = ["loopjax", "train", *sys.argv[4:]]
  cli.main()
