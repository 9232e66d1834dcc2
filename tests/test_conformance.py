"""The conformance kit (genbackends.testing) run the way a backend author runs it: pytest in a
subprocess with ``-p genbackends.testing``, against a real backend and the tiny Llama.

hf, vllm and the example third-party backend (examples/third_party_backend, pip-installed) pass
every check; the echo fixture plugin passes the checks a model-free toy can (it declares the rest
with ``--genbackends-skip``); the deliberately broken fixture backend (tests/fixtures/
broken_backend_plugin) fails, with messages that say what to fix. One engine per backend.
"""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
KIT = ["-p", "genbackends.testing", "--pyargs", "genbackends.testing.suite"]
N_CHECKS = 14  # tests in genbackends/testing/suite.py
# What the echo toy cannot do: it ignores the model (its tokens are the prompt's characters
# reversed, logprobs 0, no sampling, no stop strings) and takes only its own 'shift' weight. It
# also reports finish_reason 'length' for completions shorter than max_new_tokens ('records').
ECHO_SKIPS = "records,tokens,greedy,logprobs,sampling,stop,sync_apply"


@pytest.fixture(scope="module")
def kit_sites(plugin_sites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example backend and the broken fixture backend, each pip-installed (real wheel build,
    real entry points) into its own folder; plus conftest's echo plugin site."""
    import shutil

    root = tmp_path_factory.mktemp("kit_sites")
    sources = {"torchkv": _REPO / "examples" / "third_party_backend",
               "kitbroken": _REPO / "tests" / "fixtures" / "broken_backend_plugin"}
    sites, procs = {"echo": plugin_sites["echo"]}, []
    for key, folder in sources.items():
        src = root / f"src_{key}"
        shutil.copytree(folder, src)  # keep build debris out of the repo
        sites[key] = root / f"site_{key}"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
               "--target", str(sites[key]), str(src)]
        procs.append((key, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for key, p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"pip install of {key} failed:\n{out}"
    return sites


@pytest.fixture(scope="module")
def run_kit(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """``run_kit(backend, *args, site=None, module=False)`` -> CompletedProcess of the kit in a
    fresh Python, with only that backend's plugin allowed."""
    cwd = tmp_path_factory.mktemp("kit_cwd")

    def run(backend: str, *args: str, site: Path | None = None, module: bool = False) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        # keep what the environment itself puts on the path (the GPU bundle's /tmp/site), add the
        # plugin's own site in front
        paths = [str(site)] if site is not None else []
        paths += [x for x in env.pop("PYTHONPATH", "").split(os.pathsep) if x]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env["GENBACKENDS_PLUGINS"] = backend
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # one intra-op thread: on a busy 2-core CI machine torch's spinning OpenMP workers cost
        # more CPU than the kit's tiny forwards (torchkv run: 37 s CPU with the default, 11 s with 1)
        env["OMP_NUM_THREADS"] = "1"
        if module:  # the python -m genbackends.testing wrapper
            cmd = [sys.executable, "-m", "genbackends.testing", "--backend", backend, "--model", str(tiny_llama), *args,
                   "-p", "no:cacheprovider", "-q", "--tb=line"]
        else:
            cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *KIT, "--genbackends-backend", backend,
                   "--genbackends-model", str(tiny_llama), "-q", "--tb=line", *args]
        t0, cpu0 = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd), timeout=600)
        # the kit's cost per backend (shown with -s / -rA): wall time and CPU seconds of the subprocess
        print(f"conformance kit {backend}: {time.perf_counter() - t0:.1f} s wall, {_children_cpu() - cpu0:.1f} s CPU")
        return proc

    return run


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _summary(proc: subprocess.CompletedProcess) -> dict[str, int]:
    last = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    assert last, f"no pytest summary line:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last[-1])}


def _assert_all_pass(proc: subprocess.CompletedProcess, passed: int = N_CHECKS, skipped: int = 0) -> None:
    counts = _summary(proc)
    assert proc.returncode == 0 and counts.get("passed") == passed and counts.get("skipped", 0) == skipped, (
        f"kit result {counts} (rc {proc.returncode}), expected {passed} passed, {skipped} skipped:\n{proc.stdout[-6000:]}"
    )


def test_kit_passes_hf(run_kit) -> None:
    _assert_all_pass(run_kit("hf", "--genbackends-set", "device=cpu"))


def test_kit_passes_vllm(run_kit) -> None:
    _assert_all_pass(run_kit("vllm", "--genbackends-set", "options.vllm.enforce_eager=true",
                             "--genbackends-set", "cache.kv_cache_memory_bytes=33554432"))


def test_kit_passes_example_backend(run_kit, kit_sites) -> None:
    # through the python -m wrapper, as examples/third_party_backend/README.md shows
    _assert_all_pass(run_kit("torchkv", "--set", "device=cpu", site=kit_sites["torchkv"], module=True))


def test_kit_echo_fixture_passes_the_checks_that_apply(run_kit, kit_sites) -> None:
    n_skipped = 7  # one test per skipped check name (the rejected-sync checks still run)
    proc = run_kit("echo", "--genbackends-skip", ECHO_SKIPS, "-rs", site=kit_sites["echo"])
    _assert_all_pass(proc, passed=N_CHECKS - n_skipped, skipped=n_skipped)
    assert "skipped by --genbackends-skip" in proc.stdout


def test_kit_fails_broken_backend_and_says_what_to_fix(run_kit, kit_sites) -> None:
    proc = run_kit("kitbroken", "--genbackends-set", "device=cpu", site=kit_sites["kitbroken"])
    assert proc.returncode == 1, f"the broken backend passed the kit:\n{proc.stdout[-4000:]}"
    out = proc.stdout
    expected = {
        # bug 1: completions of a prompt in reverse index order
        "test_ordering_n_and_indices": "records are not in prompt order then completion index",
        # bug 2: logprobs scaled
        "test_sampled_logprobs_are_raw_log_softmax": "logprobs must be the raw log_softmax of the model's logits",
        # bug 3: a rejected sync half-applies
        "test_rejected_sync_unknown_name_changes_nothing": "after a rejected sync (unknown name) outputs must be unchanged",
    }
    for test, message in expected.items():
        assert re.search(rf"FAILED \S*{test}\b", out), f"{test} did not fail:\n{out[-4000:]}"
        assert message in out, f"no {message!r} in the kit's report:\n{out[-4000:]}"
    # what a correct backend gets right still passes here (the kit blames only the bugs)
    for test in ("test_record_fields", "test_prompt_tokens_and_text", "test_shutdown"):
        assert not re.search(rf"FAILED \S*{test}\b", out), f"{test} failed for a bug it is not about:\n{out[-4000:]}"


def test_kit_rejects_unknown_check_name(run_kit) -> None:
    proc = run_kit("hf", "--genbackends-skip", "greedy,bogus")
    assert proc.returncode != 0
    assert "--genbackends-skip: unknown check(s) bogus" in proc.stderr + proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_kit_passes_on_gpu(run_kit, backend: str) -> None:
    """On CUDA: sleep levels 1 and 2 are declared there, so the kit also checks sleep(2) ->
    wake_up(["weights"]) -> sync -> wake_up(["kv_cache"]). fp32 weights; GPU kernels (TF32,
    other reduction orders) need a looser logprob tolerance than the CPU: vLLM 0.24 on the H200
    differed from the float64 reference by up to 6.5e-3 (2026-12-02), so 1e-2."""
    # and two identical greedy calls differed by 3e-5 there (not bitwise repeatable)
    args = ["--genbackends-set", "device=cuda", "--genbackends-logprob-tol", "1e-2", "--genbackends-repeat-tol", "1e-4"]
    if backend == "vllm":
        args += ["--genbackends-set", "options.vllm.enforce_eager=true", "--genbackends-set", "cache.gpu_memory_utilization=0.3"]
    _assert_all_pass(run_kit(backend, *args))
