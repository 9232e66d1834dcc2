"""``genbackends generate -o FILE`` never damages FILE (the real console script, the hf backend on a
tiny Llama): a failed run and Ctrl-C leave an existing FILE byte for byte as it was, Ctrl-C with
``--keep-partial`` keeps the finished batches in FILE.partial, and two concurrent runs leave one
run's complete output (each run writes its own temporary file and renames it atomically)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

OLD = '{"old": "contents"}\n'


def _cli(*args: object, cwd: Path, **popen: object) -> subprocess.Popen:
    script = Path(sys.executable).with_name("genbackends")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "genbackends.cli"]
    env = dict(os.environ, GENBACKENDS_PLUGINS="hf")
    env.pop("PYTHONPATH", None)
    # A child inherits an ignored SIGINT (a library earlier in this pytest process may have set
    # SIG_IGN); a user's terminal gives the CLI the default disposition: start it with that.
    return subprocess.Popen([*base, *map(str, args)], cwd=str(cwd), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def _config(tmp_path: Path, model: Path, batch_size: int, extra: str = "") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent(f"""
        backend: hf
        model: {model}
        seq_length: 48
        device: cpu
        sampling: {{max_new_tokens: 8, temperature: 0, ignore_eos: true}}
        prompts: {{batch_size: {batch_size}}}
        """) + extra)
    return cfg


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".out.jsonl.*"))


def test_failed_run_leaves_existing_file_untouched(tiny_llama, tmp_path):
    # truncation: error rejects the long prompt after the engine started; the file keeps its bytes
    cfg = _config(tmp_path, tiny_llama, 2)
    out = tmp_path / "out.jsonl"
    out.write_text(OLD)
    long_prompt = "the cat sat on the mat " * 20
    p = _cli("generate", cfg, "-q", "-o", out, "--set", "prompts.truncation=error",
             "--prompt", "short one", "--prompt", long_prompt, cwd=tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    assert out.read_text() == OLD
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out.jsonl.partial").exists()
    assert f"genbackends: no records written; {str(out)!r} left untouched" in err, err
    assert err.strip().splitlines()[-1].startswith("genbackends: error: ") and "prompt 1" in err, err


def test_sigint_keeps_old_file_and_finished_batches(tiny_llama, tmp_path):
    batch, n_prompts = 4, 600
    cfg = _config(tmp_path, tiny_llama, batch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i} says hello\n" for i in range(n_prompts)))
    out = tmp_path / "out.jsonl"
    out.write_text(OLD)
    p = _cli("generate", cfg, "-q", "--prompts", prompts, "-o", out, "--keep-partial", cwd=tmp_path)
    # records are streamed: wait until the temporary file beside FILE holds k = 2 finished batches
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        tmp = list(tmp_path.glob(".out.jsonl.*.tmp"))
        if tmp and tmp[0].read_text().count("\n") >= 2 * batch:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted: " + p.communicate()[1]
    assert out.read_text() == OLD  # nothing touches FILE while the run is going
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert out.read_text() == OLD
    assert _leftovers(tmp_path) == []
    lines = (tmp_path / "out.jsonl.partial").read_text().splitlines()
    recs = [json.loads(line) for line in lines]  # every kept line is a complete record
    assert len(recs) >= 2 * batch and len(recs) % batch == 0 and len(recs) < n_prompts
    assert [r["prompt_index"] for r in recs] == list(range(len(recs)))
    assert [r["prompt"] for r in recs] == [f"prompt number {i} says hello" for i in range(len(recs))]
    assert all(len(r["token_ids"]) == 8 for r in recs)
    kept = f"genbackends: {len(recs)} records ({len(recs) // batch} finished batches) kept in "
    assert kept in err and f"{str(out)!r} left untouched" in err, err


def test_concurrent_runs_leave_one_complete_output(tiny_llama, tmp_path):
    cfg = _config(tmp_path, tiny_llama, 1)
    out = tmp_path / "out.jsonl"
    out.write_text(OLD)
    sets = {name: [f"{name} prompt {i}" for i in range(6)] for name in ("alpha", "beta")}
    procs = [
        _cli("generate", cfg, "-q", "-o", out, *[a for t in texts for a in ("--prompt", t)], cwd=tmp_path)
        for texts in sets.values()
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] in list(sets.values())  # exactly one run's records, complete
    assert [r["prompt_index"] for r in recs] == list(range(6))
    assert _leftovers(tmp_path) == []
