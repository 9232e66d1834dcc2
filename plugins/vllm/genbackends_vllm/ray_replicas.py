"""Engine replicas as Ray actors (``parallel.replica_placement: ray``).

Each actor holds one in-process :class:`~genbackends_vllm.engine.LocalEngine`; actors are
spread over the cluster's nodes (``SPREAD``), so replicas scale past one machine. The driver
talks to them through :class:`RayReplica`, which has the same methods the backend calls on a
local engine. Weight syncs put each bucket into Ray's object store once and every actor loads it
in its own process. (A TP group spanning nodes is vLLM's own Ray executor instead:
``parallel.executor: ray``, GPUs only.)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from genbackends_vllm.options import RayOptions


class _EngineActor:
    """Runs inside the Ray actor process."""

    def __init__(self, engine_kwargs: dict[str, Any]):
        from genbackends_vllm.engine import LocalEngine

        self.engine = LocalEngine(engine_kwargs, in_process=True).start()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.engine, method)(*args, **kwargs)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RayReplica:
    """Driver-side handle of one actor replica."""

    def __init__(self, actor: Any):
        self.actor = actor

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(self.actor.call.remote(method, *args, **kwargs))

    def transport_kind(self) -> str:
        return "ray"

    def generate(self, token_ids: Sequence[Sequence[int]], params: Sequence[Any], use_tqdm: bool = False) -> list[Any]:
        return self._call("generate", [list(t) for t in token_ids], list(params), use_tqdm)

    def beam_search(self, token_ids: Sequence[Sequence[int]], params: Any) -> list[Any]:
        return self._call("beam_search", [list(t) for t in token_ids], params)

    def run_on_workers(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        return self._call("run_on_workers", fn, *args, **kwargs)

    def param_layout(self) -> list[Any]:
        return self._call("param_layout")

    def load_bucket(self, pairs: Any, transport: str) -> None:
        # ``pairs`` may be an ObjectRef (put once for all replicas); Ray resolves it in the actor.
        self._call("load_bucket", pairs, "inprocess")

    def reload_from_path(self, path: str) -> None:
        self._call("reload_from_path", path)

    def reset_prefix_cache(self) -> None:
        self._call("reset_prefix_cache")

    def sleep(self, level: int) -> None:
        self._call("sleep", level)

    def wake_up(self, tags: list[str] | None) -> None:
        self._call("wake_up", tags)

    def executor_backend(self) -> str:
        return self._call("executor_backend")

    def node_id(self) -> str:
        import ray

        return ray.get(self.actor.node_id.remote())

    def shutdown(self) -> None:
        import ray

        try:
            ray.get(self.actor.call.remote("shutdown"), timeout=60)
        finally:
            ray.kill(self.actor)


_started_ray = False


def start_ray_replicas(engine_kwargs: dict[str, Any], count: int, opts: RayOptions) -> list[RayReplica]:
    """Start ``count`` actor replicas (joining ``opts.address``, or a local 127.0.0.1 cluster)."""
    global _started_ray
    import ray

    if not ray.is_initialized():
        kw: dict[str, Any] = dict(opts.init_kwargs)
        if opts.address:
            kw["address"] = opts.address
        else:
            kw.setdefault("_node_ip_address", "127.0.0.1")
            kw.setdefault("num_cpus", max(1, int(round(count * opts.num_cpus_per_replica))))
            kw.setdefault("include_dashboard", False)
        kw.setdefault("log_to_driver", False)
        ray.init(**kw)
        _started_ray = True
    cls = ray.remote(_EngineActor)
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    actors = [
        cls.options(
            num_cpus=opts.num_cpus_per_replica, num_gpus=opts.num_gpus_per_replica,
            scheduling_strategy="SPREAD", runtime_env=env,
        ).remote(engine_kwargs)
        for _ in range(count)
    ]
    replicas = [RayReplica(a) for a in actors]
    try:
        for r in replicas:  # surfaces start-up errors (bad path, memory) here
            r.executor_backend()
    except Exception:
        for r in replicas:
            ray.kill(r.actor)
        raise
    return replicas


def shutdown_ray_if_started() -> None:
    """Stop the local Ray cluster if :func:`start_ray_replicas` started it."""
    global _started_ray
    import ray

    if _started_ray and ray.is_initialized():
        ray.shutdown()
    _started_ray = False
