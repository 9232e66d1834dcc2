"""The genbackends conformance kit: a pytest plugin that checks any backend against the contract
(``docs/writing-a-backend.md``) with a tiny model and a float64 transformers reference.

Run it::

    pytest -p genbackends.testing --pyargs genbackends.testing.suite \\
        --genbackends-backend NAME [--genbackends-model TINY_DIR] [--genbackends-set KEY=VALUE ...]
    python -m genbackends.testing --backend NAME [--model TINY_DIR] [--set KEY=VALUE ...]

``-p genbackends.testing`` loads the options and fixtures (:mod:`genbackends.testing.plugin`);
the checks live in :mod:`genbackends.testing.suite`. Needs transformers (the reference).
"""
from genbackends.testing.plugin import (  # noqa: F401 - pytest finds hooks and fixtures by name here
    CHECKS,
    HookRecorder,
    KitSettings,
    genbackends_backend,
    genbackends_config,
    genbackends_kit,
    genbackends_model_dir,
    genbackends_recorder,
    genbackends_reference,
    genbackends_registry,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
)
