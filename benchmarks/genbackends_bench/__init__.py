"""genbackends_bench: run registered generation backends (and raw vLLM) on the same work.

Each backend runs in its own subprocess (:mod:`genbackends_bench.worker`) so start time, peak
memory and accelerator memory are measured per backend, not polluted by the one before. The
parent (:mod:`genbackends_bench.runner`) builds the model folder and the workload once, collects
the workers' JSON, computes ratios against baselines measured in the same run and writes JSON, a
markdown table and a PNG plot (:mod:`genbackends_bench.report`).

CLI: ``genbackends bench CONFIG --backends vllm,hf,raw-vllm`` (or ``python -m genbackends_bench``).
"""
from genbackends_bench.config import BenchConfig, load_bench_config

__all__ = ["BenchConfig", "load_bench_config"]
