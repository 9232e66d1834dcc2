"""Entry-point module (``genbackends.plugins`` group, name ``torchkv``); cheap to import."""
from genbackends import hookimpl


@hookimpl
def genbackends_register_backends():
    from genbackends_example_torchkv.backend import TorchKVBackend

    return [TorchKVBackend]
