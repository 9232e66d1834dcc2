"""Entry-point module of the ``hf`` backend (``genbackends.plugins`` group, name ``hf``).

Importing it is cheap: transformers is imported when the backend's ``setup()`` runs.
"""
from __future__ import annotations

from genbackends.hookspecs import hookimpl


@hookimpl
def genbackends_register_backends() -> list[type]:
    """The HF transformers backend."""
    from genbackends_hf.backend import HFBackend

    return [HFBackend]
