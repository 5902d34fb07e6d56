"""One process of a two-process `jax.distributed` run on localhost (tests/test_sharding.py):
    python tests/distributed_worker.py PROCESS_ID PORT MODEL_DIR OUT.json
Each process loads the model onto a (data=2) mesh spanning both processes and generates."""

from __future__ import annotations

import json
import sys

from cfjax import sharding

pid, port, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sharding.initialize(cpu=True, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                    process_id=pid)  # fmt: skip

import jax  # noqa: E402

import cfjax  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 2
lm = cfjax.load(model_dir, mesh=sharding.mesh(data=2, model=1))
traces = cfjax.generate(lm, [[1, 5, 17, 33], [1, 6, 17, 34]], key=3, max_new_tokens=20, stop_tokens=())  # fmt: skip
cf = cfjax.counterfactual(lm, traces[0], cfjax.ReplaceTokens(4, [7]))
with open(out, "w") as f:
    json.dump({"tokens": [t.tokens for t in traces], "cf": cf.tokens}, f)
