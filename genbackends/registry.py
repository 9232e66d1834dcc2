"""The plugin registry: finds plugins through entry points and indexes what they register.

One way in: every plugin, built-in or third-party, is an entry point in the
``genbackends.plugins`` group whose target module holds ``@hookimpl`` functions. Everything goes
through pluggy's own machinery: a plugin module is registered with the plugin manager (which
checks each hookimpl's arguments against its spec and honours ``@hookimpl(specname=...)``), its
registration hooks are enumerated with ``get_hookimpls()``, and a hookimpl whose name matches no
spec (a misspelled hook) makes that plugin broken, with the error naming the hook. Loading is
forgiving per plugin (a plugin that fails is recorded with its error and the others still load)
and strict about names (two backends claiming one name is an error naming both distributions).

**Allow-lists** (``GENBACKENDS_PLUGINS=a,b`` in the environment, ``plugins: [a, b]`` in a config,
``Registry(allow=[...])``) restrict which plugins load. An entry may be a backend name (what
``backend:`` takes), a plugin (entry-point) name or a distribution name; ``genbackends backends``
shows all three. Precedence: the environment variable bounds what may load at all, a config's
``plugins:`` narrows that further (a plugin loads only if every list that is set selects it), so
an operator's ``GENBACKENDS_PLUGINS`` cannot be widened by a config file. Entries that are
neither plugin nor distribution names are looked up as backend names: the plugins the other
entries did not select are then imported to see which backends they register, and only those
registering a listed backend stay loaded.
"""
from __future__ import annotations

import difflib
import os
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from genbackends import hookspecs
from genbackends.errors import ConfigError, PluginError

ALLOW_ENV = "GENBACKENDS_PLUGINS"
_REGISTRATION_HOOKS = ("genbackends_register_backends", "genbackends_register_weight_adapters")


def _norm(name: str) -> str:
    """Distribution names compare like pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_allow(text: str | None) -> list[str] | None:
    """``"hf, echo"`` -> ``["hf", "echo"]``; empty or ``None`` -> ``None`` (no restriction)."""
    if not text or not text.strip():
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


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
class _AllowList:
    """One allow-list, split into entries that name plugins/distributions and the rest (taken
    for backend names)."""

    origin: str
    entries: list[str]
    plugin_entries: set[str] = field(default_factory=set)
    backend_entries: set[str] = field(default_factory=set)

    def selects(self, ep_name: str, dist_name: str) -> bool:
        return ep_name in self.entries or _norm(dist_name) in {_norm(e) for e in self.entries}


@dataclass
class Registry:
    """Discovered plugins, backends and weight adapters.

    ``allow``: allow-list entries (backend, plugin or distribution names; see the module
    docstring), typically a config's ``plugins``. ``use_env``: also apply
    ``GENBACKENDS_PLUGINS`` (both lists must select a plugin). ``conflicts`` maps a backend name
    claimed by several distributions to the error naming them; looking that name up raises it,
    other backends keep working. ``unknown_allowed`` lists allow-list entries that matched nothing.
    """

    allow: Iterable[str] | None = None
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    backends: dict[str, BackendInfo] = field(default_factory=dict)
    adapters: list[AdapterInfo] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)
    unknown_allowed: list[str] = field(default_factory=list)
    use_env: bool = True

    def __post_init__(self) -> None:
        self.allow = set(self.allow) if self.allow is not None else None
        self.env_allow = parse_allow(os.environ.get(ALLOW_ENV)) if self.use_env else None
        self._lists: list[_AllowList] = []
        if self.env_allow is not None:
            self._lists.append(_AllowList(ALLOW_ENV, self.env_allow))
        if self.allow is not None:
            self._lists.append(_AllowList("'plugins:'", sorted(self.allow)))
        # entry-point name -> (distribution, why, backend names found by probing)
        self._excluded: dict[str, tuple[str, str, list[str]]] = {}
        self._in_process: dict[str, tuple[Any, str, str]] = {}
        self._restricted: dict[frozenset[str], Registry] = {}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points()
        self._check_unknown_entries()

    # ---- discovery ---------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        eps = list(metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP))
        meta = []
        for ep in eps:
            dist = getattr(ep, "dist", None)
            meta.append((ep, dist.metadata["Name"] if dist is not None else "?", dist.version if dist is not None else "?"))
        names = {ep.name for ep, _, _ in meta} | {_norm(d) for _, d, _ in meta}
        for lst in self._lists:
            lst.plugin_entries = {e for e in lst.entries if e in names or _norm(e) in names}
            lst.backend_entries = set(lst.entries) - lst.plugin_entries
        for ep, dist_name, version in meta:
            # per list: selected by a plugin/distribution entry, or maybe by a backend name
            maybe = []
            skip = None
            for lst in self._lists:
                if lst.selects(ep.name, dist_name):
                    continue
                if lst.backend_entries:
                    maybe.append(lst)
                else:
                    skip = lst
                    break
            if skip is not None:
                self._excluded[ep.name] = (dist_name, f"not in the allow-list ({skip.origin})", [])
                continue
            info = PluginInfo(name=ep.name, value=ep.value, distribution=dist_name, version=version)
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
            except BaseException as e:  # noqa: BLE001 - a broken plugin must not break the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                if maybe:  # only imported to look for backend names: not selected, not broken
                    self._excluded[ep.name] = (dist_name, f"not in the allow-list ({maybe[0].origin}); it fails to import", [])
                    continue
                info.error = f"{type(e).__name__}: {e}".splitlines()[0]
                info.traceback = traceback.format_exc()
                self.plugins[ep.name] = info
                continue
            found = self._register(ep.name, module, info)
            if maybe:
                backend_names = [getattr(c, "name", "") for c in found[0]] if found is not None else []
                if not backend_names or not all(set(backend_names) & lst.backend_entries for lst in maybe):
                    if info.module is not None:
                        self.pm.unregister(module)
                    self._excluded[ep.name] = (dist_name, f"not in the allow-list ({maybe[0].origin})", backend_names)
                    continue
            self.plugins[ep.name] = info
            if found is not None:
                self._add_backends(found[0], info)
                self._add_adapters(found[1], info)

    def _register(self, name: str, plugin: Any, info: PluginInfo) -> tuple[list, list] | None:
        """Register ``plugin`` with pluggy and call its registration hooks; on any problem record
        it in ``info.error`` (plugin unregistered) and return ``None``."""
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:  # pluggy's validation: arguments not in the hook's spec, ...
            info.error = f"{type(e).__name__}: {e}".splitlines()[0]
            info.traceback = traceback.format_exc()
            return None
        info.module = plugin
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.pm.unregister(plugin)
            info.module = None
            info.error = unknown
            return None
        found: list[list] = []
        for hook_name in _REGISTRATION_HOOKS:
            items: list = []
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    items.extend(impl.function() or [])
                except Exception as e:  # noqa: BLE001 - reported per plugin, like an import error
                    info.error = f"{hook_name} raised {type(e).__name__}: {e}".splitlines()[0]
                    info.traceback = traceback.format_exc()
            found.append(items)
        return found[0], found[1]

    def _unknown_hooks(self, plugin: Any) -> str | None:
        """The error for hookimpls of ``plugin`` that match no spec (what ``pm.check_pending()``
        would raise), naming the closest known hook."""
        known = sorted(n for n in dir(hookspecs) if n.startswith("genbackends_"))
        bad = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.has_spec():
                continue
            if any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls()):
                close = difflib.get_close_matches(caller.name, known, n=1)
                bad.append(f"{caller.name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not bad:
            return None
        return f"unknown hook name {', '.join(bad)}; hooks are: {', '.join(known)}"

    def register_object(self, plugin: Any, name: str, distribution: str = "<in-process>", version: str = "") -> None:
        """Register a plugin object directly (for plugins living in the caller's own code, e.g.
        a metrics hook in a training script). Backends it registers are indexed as usual; an
        unknown hook name or a bad hook signature raises :class:`PluginError` at once.
        In-process plugins are not subject to allow-lists."""
        info = PluginInfo(name, repr(plugin), distribution, version)
        found = self._register(name, plugin, info)
        if found is None or info.error:
            if info.module is not None:
                self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r}: {info.error}")
        self.plugins[name] = info
        self._in_process[name] = (plugin, distribution, version)
        self._add_backends(found[0], info)
        self._add_adapters(found[1], info)
        for sub in self._restricted.values():
            sub.register_object(plugin, name, distribution, version)

    def _check_unknown_entries(self) -> None:
        seen_backends = set(self.backends) | {b for _, _, names in self._excluded.values() for b in names}
        unknown = set()
        for lst in self._lists:
            unknown |= {e for e in lst.backend_entries if e not in seen_backends}
        self.unknown_allowed = sorted(unknown)
        self.pm.check_pending()  # every registered hookimpl has a spec (bad ones were unregistered)

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
                    f"uninstall one or restrict plugins with {ALLOW_ENV} or 'plugins:'"
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
            excluded = [(ep, d, why) for ep, (d, why, names) in self._excluded.items() if ep == name or name in names]
            if broken:
                hint = f"; plugin {name!r} failed to load: {broken[0].error}"
            elif excluded:
                ep, dist, why = excluded[0]
                hint = f"; plugin {ep!r} ({dist}) is installed but {why}"
            elif self._excluded:  # not probed: the allow-list named plugins, not this backend
                kept_out = "; ".join(f"{ep} ({d}) {why}" for ep, (d, why, _) in sorted(self._excluded.items()))
                hint = (f"; installed but not loaded: {kept_out}; an allow-list entry may be {name!r} itself "
                        "(a backend name), a plugin or a distribution name")
            elif self.broken_plugins():
                hint = "; broken plugins: " + ", ".join(f"{p.name} ({p.error})" for p in self.broken_plugins())
            raise PluginError(f"unknown backend {name!r}; available backends: {available}{hint}") from None

    def allow_list_names(self) -> dict[str, list[str]]:
        """What an allow-list entry may name here: ``{"backends": [...], "plugins": [...],
        "distributions": [...]}`` over loaded and excluded plugins (shown by ``genbackends
        backends``)."""
        plugins = {p.name.split("@")[0] for p in self.plugins.values() if p.distribution != "<in-process>"}
        plugins |= set(self._excluded)
        dists = {p.distribution for p in self.plugins.values() if p.distribution != "<in-process>"}
        dists |= {d for d, _, _ in self._excluded.values()}
        backends = set(self.backends) | {b for _, _, names in self._excluded.values() for b in names}
        return {"backends": sorted(backends), "plugins": sorted(plugins), "distributions": sorted(dists)}

    def listing(self) -> list[dict[str, str]]:
        """Rows for ``genbackends backends``: every backend and adapter with its plugin,
        distribution and version, then broken plugins with their errors, then installed plugins
        an allow-list kept out (status ``excluded``)."""
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
        for ep, (dist, _why, _names) in sorted(self._excluded.items()):
            rows.append({"kind": "plugin", "name": ep, "plugin": ep, "distribution": dist, "version": "",
                         "status": "excluded", "error": ""})
        return rows

    def for_config(self, config: Any) -> "Registry":
        """The registry a config's ``plugins:`` allow-list selects: this one when the config sets
        none (or the same list this registry was built with), else a registry restricted to it
        (built once per list; the environment's list still bounds it; in-process plugins carried
        over)."""
        wanted = getattr(config, "plugins", None)
        if wanted is None or set(wanted) == self.allow:
            return self
        key = frozenset(wanted)
        if key not in self._restricted:
            sub = Registry(allow=wanted, use_env=self.use_env)
            for name, (obj, dist, version) in self._in_process.items():
                sub.register_object(obj, name, dist, version)
            self._restricted[key] = sub
        return self._restricted[key]

    def check_options(self, config: Any) -> None:
        """Every key of ``config.options`` must name a backend: one installed here (loaded, or
        kept out by an allow-list, or broken). A misspelled name is a :class:`ConfigError`
        naming it and listing the known backends."""
        names = self.allow_list_names()
        known = set(names["backends"]) | set(self.conflicts) | set(self._excluded)
        known |= {p.name.split("@")[0] for p in self.broken_plugins()}
        for key in getattr(config, "options", {}) or {}:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"options.{key}: no backend {key!r} is installed{hint}; known backends: "
                    f"{', '.join(sorted(set(names['backends']) | set(self.conflicts))) or 'none'}"
                )

    def create_backend(self, config: Any) -> Any:
        """Instantiate the backend named by ``config.backend`` (no engine is started yet).

        Honours the config's ``plugins:`` allow-list (see :meth:`for_config`) exactly like the
        CLI, checks that every ``options:`` key names a backend, and validates the selected
        backend's options."""
        reg = self.for_config(config)
        reg.check_options(config)
        cls = reg.backend_class(config.backend)
        return cls(config, hooks=reg.hooks)

    def weight_adapter(self, source: str, architecture: str) -> Any:
        """The adapter converting ``source`` (e.g. ``"megatron"``) weights of ``architecture``."""
        for a in self.adapters:
            if a.source == source and architecture in a.architectures:
                return a.adapter
        known = ", ".join(f"{a.source}:{'/'.join(a.architectures)}" for a in self.adapters) or "none"
        raise PluginError(f"no weight adapter for {source}:{architecture}; registered: {known}")


_default: Registry | None = None


def get_registry(refresh: bool = False, allow: Iterable[str] | None = None) -> Registry:
    """The process-wide registry (built on first use; ``GENBACKENDS_PLUGINS`` applies). ``allow``
    (e.g. a config's ``plugins``) gives the registry restricted to those entries as well, without
    replacing the shared one (``create_backend(cfg)`` does this by itself for ``cfg.plugins``)."""
    global _default
    if _default is None or refresh:
        _default = Registry()
    if allow is not None:
        return _default.for_config(_Plugins(list(allow)))
    return _default


@dataclass
class _Plugins:
    plugins: list[str]
