"""The plugin registry: finds plugins through entry points and indexes what they register.

One way in: every plugin, built-in or third-party, is an entry point in the
``genbackends.plugins`` group whose target module holds ``@hookimpl`` functions. Loading is
forgiving per plugin (a plugin that fails to import is recorded with its error and the others
still load) and strict about names (two backends claiming one name is an error naming both
distributions).

``GENBACKENDS_PLUGINS`` (comma-separated entry-point names) restricts which plugins load; the
same allow-list can be passed as ``Registry(allow=[...])``.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from genbackends import hookspecs
from genbackends.errors import PluginError

ALLOW_ENV = "GENBACKENDS_PLUGINS"


@dataclass
class PluginInfo:
    """One entry point of the plugin group and what became of it."""

    name: str
    value: str
    distribution: str
    version: str
    error: str | None = None
    module: Any = None
    traceback: str | None = None


@dataclass
class BackendInfo:
    """A registered backend class and where it came from."""

    name: str
    cls: type
    plugin: str
    distribution: str
    version: str


@dataclass
class AdapterInfo:
    """A registered weight adapter and where it came from."""

    source: str
    architectures: list[str]
    adapter: Any
    plugin: str
    distribution: str
    version: str


@dataclass
class Registry:
    """Discovered plugins, backends and weight adapters.

    ``allow``: plugin (entry-point) names to load; ``None`` means the ``GENBACKENDS_PLUGINS``
    environment variable if set, else every plugin. ``conflicts`` maps a backend name claimed by
    several distributions to the error naming them; looking that name up raises it, other backends
    keep working.
    """

    allow: Iterable[str] | None = None
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    backends: dict[str, BackendInfo] = field(default_factory=dict)
    adapters: list[AdapterInfo] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)
    unknown_allowed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.allow is None and os.environ.get(ALLOW_ENV):
            self.allow = [s.strip() for s in os.environ[ALLOW_ENV].split(",") if s.strip()]
        self.allow = set(self.allow) if self.allow is not None else None
        self._excluded: dict[str, str] = {}  # entry-point name -> distribution, skipped by allow-list
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points()
        self._collect()
        if self.allow is not None:
            self.unknown_allowed = sorted(n for n in self.allow if n not in self.plugins)

    # ---- discovery ---------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            if self.allow is not None and ep.name not in self.allow:
                self._excluded[ep.name] = dist_name
                continue
            info = PluginInfo(
                name=ep.name,
                value=ep.value,
                distribution=dist_name,
                version=dist.version if dist is not None else "?",
            )
            if ep.name in self.plugins:
                other = self.plugins[ep.name]
                info.error = (
                    f"plugin name {ep.name!r} is registered by both {other.distribution} "
                    f"{other.version} and {info.distribution} {info.version}; the second was not loaded"
                )
                self.plugins[f"{ep.name}@{info.distribution}"] = info
                continue
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
                info.module = module
            except BaseException as e:  # noqa: BLE001 - a broken plugin must not break the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                info.error = f"{type(e).__name__}: {e}".splitlines()[0]
                info.module = None
                info.traceback = traceback.format_exc()
            self.plugins[ep.name] = info

    def register_object(self, plugin: Any, name: str, distribution: str = "<in-process>", version: str = "") -> None:
        """Register a plugin object directly (for plugins living in the caller's own code, e.g.
        a metrics hook in a training script). Backends it registers are indexed as usual."""
        self.pm.register(plugin, name=name)
        self.plugins[name] = PluginInfo(name, repr(plugin), distribution, version, module=plugin)
        self._collect_from(name, plugin)

    def _collect(self) -> None:
        for name, info in list(self.plugins.items()):
            if info.module is not None:
                self._collect_from(name, info.module)

    def _collect_from(self, plugin_name: str, module: Any) -> None:
        info = self.plugins[plugin_name]
        for hook_name, sink in (
            ("genbackends_register_backends", self._add_backends),
            ("genbackends_register_weight_adapters", self._add_adapters),
        ):
            impl = getattr(module, hook_name, None)
            if impl is None:
                continue
            try:
                items = impl() or []
                sink(items, info)
            except Exception as e:  # noqa: BLE001 - reported per plugin, like an import error
                info.error = f"{hook_name} raised {type(e).__name__}: {e}".splitlines()[0]
                info.traceback = traceback.format_exc()

    def _add_backends(self, classes: list[type], info: PluginInfo) -> None:
        for cls in classes:
            name = getattr(cls, "name", "")
            if not name:
                info.error = f"backend class {cls.__qualname__} has no 'name'"
                continue
            if name in self.backends:
                other = self.backends[name]
                if other.cls is cls:
                    continue
                self.conflicts[name] = (
                    f"backend name {name!r} is claimed by both {other.distribution} {other.version} "
                    f"(plugin {other.plugin!r}) and {info.distribution} {info.version} (plugin {info.name!r}); "
                    f"uninstall one or restrict plugins with {ALLOW_ENV}"
                )
                continue
            self.backends[name] = BackendInfo(name, cls, info.name, info.distribution, info.version)

    def _add_adapters(self, adapters: list[Any], info: PluginInfo) -> None:
        for a in adapters:
            self.adapters.append(
                AdapterInfo(a.source, list(a.architectures), a, info.name, info.distribution, info.version)
            )

    # ---- lookup ------------------------------------------------------------------------
    @property
    def hooks(self) -> Any:
        """The pluggy hook relay (``registry.hooks.genbackends_on_after_sync(...)``)."""
        return self.pm.hook

    def broken_plugins(self) -> list[PluginInfo]:
        """Plugins that failed to load, with their errors."""
        return [p for p in self.plugins.values() if p.error]

    def backend_class(self, name: str) -> type:
        """The backend class registered under ``name``; unknown names list the available ones
        (and say why a plugin of that name is missing, if one is)."""
        if name in self.conflicts:
            raise PluginError(self.conflicts[name])
        try:
            return self.backends[name].cls
        except KeyError:
            available = ", ".join(sorted(n for n in self.backends if n not in self.conflicts)) or "none"
            hint = ""
            broken = [p for p in self.broken_plugins() if p.name == name or p.name.startswith(f"{name}@")]
            if broken:
                hint = f"; plugin {name!r} failed to load: {broken[0].error}"
            elif name in self._excluded:
                hint = f"; plugin {name!r} ({self._excluded[name]}) is installed but not in the allow-list ({ALLOW_ENV} or 'plugins:')"
            elif self.broken_plugins():
                hint = "; broken plugins: " + ", ".join(f"{p.name} ({p.error})" for p in self.broken_plugins())
            raise PluginError(f"unknown backend {name!r}; available backends: {available}{hint}") from None

    def listing(self) -> list[dict[str, str]]:
        """Rows for ``genbackends backends``: every backend and adapter with its plugin,
        distribution and version, then broken plugins with their errors."""
        rows = []
        for b in sorted(self.backends.values(), key=lambda b: b.name):
            rows.append({"kind": "backend", "name": b.name, "plugin": b.plugin, "distribution": b.distribution,
                         "version": b.version, "status": "conflict" if b.name in self.conflicts else "ok",
                         "error": self.conflicts.get(b.name, "")})
        for a in self.adapters:
            rows.append({"kind": "adapter", "name": f"{a.source}:{'/'.join(a.architectures)}", "plugin": a.plugin,
                         "distribution": a.distribution, "version": a.version, "status": "ok", "error": ""})
        for p in self.broken_plugins():
            rows.append({"kind": "plugin", "name": p.name, "plugin": p.name, "distribution": p.distribution,
                         "version": p.version, "status": "broken", "error": p.error or ""})
        return rows

    def create_backend(self, config: Any) -> Any:
        """Instantiate the backend named by ``config.backend`` (no engine is started yet)."""
        cls = self.backend_class(config.backend)
        return cls(config, hooks=self.hooks)

    def weight_adapter(self, source: str, architecture: str) -> Any:
        """The adapter converting ``source`` (e.g. ``"megatron"``) weights of ``architecture``."""
        for a in self.adapters:
            if a.source == source and architecture in a.architectures:
                return a.adapter
        known = ", ".join(f"{a.source}:{'/'.join(a.architectures)}" for a in self.adapters) or "none"
        raise PluginError(f"no weight adapter for {source}:{architecture}; registered: {known}")


_default: Registry | None = None


def get_registry(refresh: bool = False, allow: Iterable[str] | None = None) -> Registry:
    """The process-wide registry (built on first use). ``allow`` (e.g. a config's ``plugins``)
    builds a registry restricted to those plugins instead, without replacing the shared one."""
    global _default
    if allow is not None:
        return Registry(allow=allow)
    if _default is None or refresh:
        _default = Registry()
    return _default
