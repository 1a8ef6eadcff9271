"""One host of the JAX tests in test_grain_jax.py (run as a script, not collected, so that the test
process never starts a JAX backend, which warns at every later fork):
``python jax_host.py PROCESSES PROCESS_ID PORT DATASET OUT``. With 2 processes it joins a
two-process JAX job on localhost (CPU, gloo collectives); with 1 it is the whole job. It reads its part with ``ds.shard(jax.process_index(), jax.process_count())``
and the seed every host shares, makes global arrays with ``jax.make_array_from_process_local_data``
and writes, per step, the global batch as every host sees it (``process_allgather``)."""

import sys

import jax
import numpy as np

import shardfeed

BATCH, STEPS, SEED = 8, 5, 13


def main() -> None:
    processes, process_id, port, path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=processes,
                                   process_id=process_id)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    try:
        mesh = Mesh(np.array(jax.devices()), ("data",))
        sharding = NamedSharding(mesh, PartitionSpec("data"))
        ds = shardfeed.open(path)
        part = ds.shard(jax.process_index(), jax.process_count())
        xs, labels = [], []
        for step, (x, y) in enumerate(part.batches(BATCH, inputs="x", targets="label", seed=SEED, epochs=1)):
            if step == STEPS:
                break
            global_x = jax.make_array_from_process_local_data(sharding, x)
            global_y = jax.make_array_from_process_local_data(sharding, y)
            assert global_x.shape == (BATCH * jax.process_count(),) + x.shape[1:], global_x.shape
            xs.append(np.asarray(multihost_utils.process_allgather(global_x, tiled=True)))
            labels.append(np.asarray(multihost_utils.process_allgather(global_y, tiled=True)))
        np.savez(out, x=np.stack(xs), label=np.stack(labels), index=jax.process_index(), count=jax.process_count())
    finally:
        if processes > 1:
            jax.distributed.shutdown()


if __name__ == "__main__":
    main()
