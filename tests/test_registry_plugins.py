"""The registry against real plugin distributions (pip-installed from tests/fixtures/): discovery,
listing with distribution and version, a broken plugin, a duplicate name, the allow-list, event
hooks. Nothing of the registry is mocked; distributions are made visible by putting their install
folder on sys.path (importlib.metadata reads dist-info from sys.path)."""
from __future__ import annotations

import pytest
import torch

from genbackends.config_loader import load_config
from genbackends.errors import PluginError, WeightSyncError
from genbackends.hookspecs import hookimpl
from genbackends.registry import Registry


@pytest.fixture
def with_sites(plugin_sites, monkeypatch):
    """``with_sites("echo", "broken")`` makes those distributions installed for this test."""
    monkeypatch.delenv("GENBACKENDS_PLUGINS", raising=False)

    def use(*keys: str) -> None:
        for k in keys:
            monkeypatch.syspath_prepend(str(plugin_sites[k]))

    return use


def _cfg(backend: str, **sampling):
    return load_config(base={"backend": backend, "model": "unused", "seq_length": 32,
                             "sampling": {"max_new_tokens": 8, **sampling}})


def test_builtins_listed_with_distribution_and_version():
    reg = Registry()
    rows = {r["name"]: r for r in reg.listing() if r["kind"] == "backend"}
    assert rows["hf"]["distribution"] == "genbackends" and rows["hf"]["version"] == "0.1.0"
    assert rows["hf"]["plugin"] == "hf"


def test_out_of_tree_plugin_discovered_and_used(with_sites):
    with_sites("echo")
    reg = Registry()
    info = reg.backends["echo"]
    assert (info.distribution, info.version, info.plugin) == ("genbackends-echo", "0.3.1", "echo")
    assert "hf" in reg.backends  # built-ins unaffected
    backend = reg.create_backend(_cfg("echo", n=2))
    with backend:
        records = backend.generate(["abc", "hello"])
        assert [(r.text, r.index, r.prompt_index) for r in records] == [
            ("cba", 0, 0), ("cba", 1, 0), ("olleh", 0, 1), ("olleh", 1, 1)]
        # the plugin's sync_weights runs the shared manifest validation
        backend.sync_weights({"shift": torch.tensor([1])})
        assert backend.generate(["ab"])[0].text == "cb"
        with pytest.raises(WeightSyncError, match="unknown weight name"):
            backend.sync_weights({"nope": torch.tensor([1])})


def test_plugin_options_validated_by_its_model(with_sites):
    with_sites("echo")
    reg = Registry()
    b = reg.create_backend(load_config(base={"backend": "echo", "model": "m", "seq_length": 128,
                                             "options": {"echo": {"upper": True}, "hf": {"whatever": 1}}}))
    with b:
        assert b.generate(["abc"])[0].text == "CBA"
    from genbackends.errors import ConfigError

    with pytest.raises(ConfigError, match=r"options\.echo\.uper: Extra inputs are not permitted"):
        reg.create_backend(load_config(base={"backend": "echo", "model": "m", "seq_length": 128,
                                             "options": {"echo": {"uper": True}}}))


def test_broken_plugin_reported_others_work(with_sites):
    with_sites("echo", "broken")
    reg = Registry()
    broken = {p.name: p for p in reg.broken_plugins()}
    assert "broken" in broken  # (other installed plugins may be listed too; only ours matter here)
    assert broken["broken"].distribution == "genbackends-broken"
    assert broken["broken"].error == "RuntimeError: genbackends_broken cannot start: its engine library is missing"
    assert "Traceback" in broken["broken"].traceback
    assert {"hf", "echo"} <= set(reg.backends)
    with pytest.raises(PluginError, match=r"unknown backend 'broken'; available backends: .*echo.*; plugin 'broken' "
                                          r"failed to load: RuntimeError: genbackends_broken cannot start"):
        reg.backend_class("broken")


def test_duplicate_backend_name_names_both_distributions(with_sites):
    with_sites("echo", "dup")
    reg = Registry()
    with pytest.raises(PluginError) as ei:
        reg.backend_class("echo")
    msg = str(ei.value)
    assert "'echo' is claimed by both" in msg and "genbackends-echo 0.3.1" in msg and "genbackends-dup 2.0.0" in msg
    assert reg.backend_class("hf").name == "hf"  # other names keep working
    assert [r["status"] for r in reg.listing() if r["name"] == "echo"] == ["conflict"]
    # the allow-list resolves the conflict
    assert Registry(allow=["echo", "hf"]).backend_class("echo").__module__ == "genbackends_echo.plugin"


def test_allow_list_from_env_and_argument(with_sites, monkeypatch):
    with_sites("echo", "broken")
    monkeypatch.setenv("GENBACKENDS_PLUGINS", "hf, echo")
    reg = Registry()
    assert set(reg.plugins) == {"hf", "echo"} and not reg.broken_plugins()
    only_hf = Registry(allow=["hf", "nosuch"])
    assert set(only_hf.backends) == {"hf"} and only_hf.unknown_allowed == ["nosuch"]
    with pytest.raises(PluginError, match=r"plugin 'echo' \(genbackends-echo\) is installed but not in the allow-list"):
        only_hf.backend_class("echo")


def test_unknown_backend_lists_available():
    with pytest.raises(PluginError, match=r"unknown backend 'nosuch'; available backends: .*hf"):
        Registry().backend_class("nosuch")


def test_event_hooks_reach_non_backend_plugins(with_sites):
    """A metrics plugin is a few lines: it sees generate stats and sync reports of any backend."""
    with_sites("echo")
    seen = []

    class Metrics:
        @hookimpl
        def genbackends_on_after_generate(self, backend, records, stats):
            seen.append(("generate", backend.name, len(records), stats["output_tokens"]))

        @hookimpl
        def genbackends_on_after_sync(self, backend, report):
            seen.append(("sync", backend.name, report.num_tensors))

    reg = Registry()
    reg.register_object(Metrics(), name="metrics")
    with reg.create_backend(_cfg("echo")) as b:
        b.generate(["abcd"])
        b.sync_weights({"shift": torch.tensor([0])})
    assert seen == [("generate", "echo", 1, 4.0), ("sync", "echo", 1)]
