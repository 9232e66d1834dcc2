"""genbackends' HF transformers backend (``backend: hf``): the reference implementation of the
backend contract, on ``transformers`` ``generate``. See :mod:`genbackends_hf.backend`."""
