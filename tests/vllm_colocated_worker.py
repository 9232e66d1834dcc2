"""One trainer rank of the colocated test (run by tests/test_vllm_colocated.py).

argv: model alt_model out_dir tp. Writes rank<N>.json with greedy tokens before and after a
weight sync and the sync report; before the good sync, both ranks try the same bad syncs (issue 14:
a source raising at tensor k of n across several buckets, a tensor contradicting its manifest, NaN,
Inf, an int tensor)
and record the error and the atomicity fingerprint after each."""
from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model, alt, out_dir, tp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sys.path.insert(0, os.path.dirname(__file__))
    from genbackends_vllm.colocated import init_trainer_ranks

    rank, world = init_trainer_ranks("gloo")
    if tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    from safetensors.torch import load_file

    from genbackends.registry import get_registry
    from test_sync_atomicity import BUCKET, CASES, bad_source, fingerprint
    from vllm_helpers import PROMPTS, vllm_config
    from vllm_worker_facts import shard_facts

    cfg = vllm_config(
        model,
        parallel={"tensor_parallel_size": tp, "executor": "external_launcher"},
        sampling={"ignore_eos": True, "max_new_tokens": 10, "temperature": 0.0},
        vllm={"bucket_bytes": BUCKET},
    )
    b = get_registry().create_backend(cfg)
    b.setup()
    before = [r.token_ids for r in b.generate(PROMPTS)]
    layout = b.engine_layout()
    base_w, alt_w = (load_file(os.path.join(m, "model.safetensors")) for m in (model, alt))
    bad = {"before": fingerprint(b)}
    for case in CASES:
        try:
            b.sync_weights(bad_source(case, base_w, alt_w))
            error = None
        except Exception as e:  # noqa: BLE001 - the test checks the message
            error = f"{type(e).__name__}: {e}"
        bad[case] = {"error": error, "fingerprint": fingerprint(b)}
    report = b.sync_weights(alt_w)
    after = [r.token_ids for r in b.generate(PROMPTS)]
    ids = [d["input_ids"] for d in b.build_dataset(PROMPTS)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {"before": before, "after": after, "ids": ids, "transport": report.transport,
             "sync_seconds": report.seconds, "world": world, "executor": b.replicas[0].executor_backend(),
             "layout_entries": len(layout["params"]), "worker_shards": b.run_on_workers(shard_facts),
             "bad_syncs": bad, "snapshot": {k: v for k, v in report.details.items() if k.startswith("snapshot")}}, f)
    b.shutdown()
    import torch.distributed as dist

    if dist.is_initialized():  # vLLM's shutdown may already have torn it down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
