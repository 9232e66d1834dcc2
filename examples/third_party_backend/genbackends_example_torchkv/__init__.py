"""Example third-party genbackends backend ``torchkv`` (see docs/writing-a-backend.md)."""
