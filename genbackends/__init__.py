"""genbackends: pluggable generation backends for LLM reinforcement learning.

The core imports neither vLLM nor megatron-core, so ``import genbackends`` works anywhere.
Backends and weight adapters are plugins found through the ``genbackends.plugins`` entry-point
group (see :mod:`genbackends.registry`).
"""
from genbackends.backend import GenerationBackend
from genbackends.errors import ConfigError, GenBackendsError, PluginError, PromptError, WeightSyncError
from genbackends.hookspecs import hookimpl, hookspec
from genbackends.records import GenerationRecord, RLBatch, collate_records

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GenBackendsError",
    "GenerationBackend",
    "GenerationRecord",
    "PluginError",
    "PromptError",
    "RLBatch",
    "WeightSyncError",
    "collate_records",
    "hookimpl",
    "hookspec",
    "__version__",
]
