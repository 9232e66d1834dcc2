"""The ``genbackends`` command.

Subcommands here: ``backends``, ``generate``, ``config``, ``tiny-model``. Plugins add more through
the ``genbackends_add_cli_commands`` hook (each sets ``func=callable(args) -> int``).

Bad input exits with status 1 and one line on stderr (``genbackends: error: ...``); ``--debug``
(anywhere on the command line) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from genbackends.errors import ConfigError, GenBackendsError

PROG = "genbackends"


# ---- subcommands -------------------------------------------------------------------------
def cmd_backends(args: argparse.Namespace) -> int:
    """List backends and adapters with the distribution and version they came from, then
    broken plugins with their errors."""
    from genbackends.registry import ALLOW_ENV, get_registry

    reg = get_registry()
    rows = reg.listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("KIND", "NAME", "DISTRIBUTION", "VERSION", "STATUS")
    table = [header] + [(r["kind"], r["name"], r["distribution"], r["version"], r["status"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    problems = [r for r in rows if r["error"]]
    if problems:
        print()
        for r in problems:
            print(f"{r['status']}: {r['kind']} {r['name']!r} from {r['distribution']} {r['version']}: {r['error']}")
    names = reg.allow_list_names()
    print()
    print(f"allow-list ({ALLOW_ENV} or 'plugins:' in a config) entries may be backend names "
          f"({', '.join(names['backends'])}), plugin names ({', '.join(names['plugins'])}) or "
          f"distributions ({', '.join(names['distributions'])})")
    for name in reg.unknown_allowed:
        print(f"warning: the allow-list names {name!r}, which is no installed backend, plugin or distribution")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved, validated config (includes merged, overrides applied) as YAML."""
    from genbackends.config_loader import config_to_yaml, load_config

    from genbackends.registry import get_registry

    cfg = load_config(args.config, args.set or [])
    reg = get_registry().for_config(cfg)
    reg.backend_class(cfg.backend)  # an unknown backend is an error listing the available ones
    reg.check_options(cfg)  # an options key naming no backend is an error listing the known ones
    # Every options block of a loaded backend is checked by that backend's model, so a
    # typo in `options.vllm` shows up even while `backend: hf` is selected.
    for name in cfg.options:
        if name in reg.backends and name not in reg.conflicts:
            cfg.backend_options(reg.backends[name].cls.options_model, name)
        else:
            print(f"{PROG}: warning: options.{name}: backend {name!r} is not loaded here; block not checked", file=sys.stderr)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Run a backend on prompts and write one JSON record per completion."""
    from genbackends.config_loader import load_config
    from genbackends.prompts import check_prompts, read_prompt_file
    from genbackends.registry import get_registry

    cfg = load_config(args.config, args.set or [])
    # Everything that can be checked cheaply is checked before the engine starts.
    backend = get_registry().create_backend(cfg)  # honours cfg.plugins, like the Python API
    if args.prompt:
        prompts = list(args.prompt)
    elif args.prompts or cfg.prompts.file:
        prompts = read_prompt_file(args.prompts or cfg.prompts.file)  # any suffix: text unless .jsonl
    else:
        raise GenBackendsError("no prompts: pass --prompts FILE, --prompt TEXT or set prompts.file in the config")
    check_prompts(prompts)

    from tqdm import tqdm

    from genbackends.output_files import AtomicRecordWriter

    if args.keep_partial and not args.output:
        raise GenBackendsError("--keep-partial needs --output FILE (records on stdout are streamed as they finish)")
    # The output file is prepared before the engine starts (a bad path fails at once), filled batch
    # by batch in a temporary file beside it, and renamed onto FILE only when the whole run worked.
    writer = AtomicRecordWriter(args.output, keep_partial=args.keep_partial) if args.output else None

    def on_batch(batch: list[Any]) -> None:
        if writer is not None:
            writer.write(batch)
            return
        for r in batch:
            sys.stdout.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        sys.stdout.flush()

    try:
        t0 = time.perf_counter()
        backend.setup()
        setup_s = time.perf_counter() - t0
        bar = tqdm(total=len(prompts), desc=f"generate [{cfg.backend}]", unit="prompt", file=sys.stderr,
                   disable=args.quiet)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            t1 = time.perf_counter()
            records = backend.generate(prompts, eval_mode=args.eval, progress=progress, on_batch=on_batch)
            gen_s = time.perf_counter() - t1
        finally:
            bar.close()
            backend.shutdown()
    except BaseException:  # a failure or Ctrl-C: FILE keeps what it had (see output_files)
        if writer is not None:
            writer.abort()
            print(f"{PROG}: {writer.describe_abort()}", file=sys.stderr)
        raise
    if writer is not None:
        writer.commit()
    out_tokens = sum(len(r.token_ids) for r in records)
    in_tokens = sum(len(r.prompt_token_ids) for r in records if r.index == 0)
    rate = out_tokens / gen_s if gen_s > 0 else 0.0
    print(
        f"{cfg.backend}: {len(prompts)} prompts -> {len(records)} completions, {in_tokens} prompt tokens, "
        f"{out_tokens} output tokens in {gen_s:.2f} s ({rate:.1f} output tokens/s; setup {setup_s:.2f} s)"
        + (f"; records in {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    """Write a tiny Llama/Qwen2/Qwen3 model folder (no network; deterministic in the seed)."""
    from genbackends.tiny import build_tiny_model

    print(build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed))
    return 0


# ---- parser ------------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (may use 'includes:')")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sampling.temperature=0.7 (repeatable)")


def build_parser(registry: Any = None) -> argparse.ArgumentParser:
    """The argument parser, with the commands plugins add (``registry``: where hooks come from)."""
    ap = argparse.ArgumentParser(prog=PROG, description="Pluggable generation backends for LLM RL.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("backends", help="list installed backends, adapters and broken plugins")
    p.add_argument("--json", action="store_true", help="machine-readable listing")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("generate", help="generate completions for prompts with the configured backend")
    _add_config_args(p)
    p.add_argument("--prompts", help="prompt file: text (one per line) or .jsonl with a 'prompt' field")
    p.add_argument("--prompt", action="append", help="a prompt given inline (repeatable)")
    p.add_argument("--output", "-o", help="write JSONL records here (default: stdout); replaced atomically when the "
                   "run succeeds, left untouched when it fails or is interrupted")
    p.add_argument("--keep-partial", action="store_true",
                   help="on failure or Ctrl-C keep the finished batches' records in OUTPUT.partial")
    p.add_argument("--eval", action="store_true", help="use the eval_* sampling settings")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("config", help="print the resolved, validated config (options blocks included)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("tiny-model", help="write a tiny test model folder (no network)")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    if registry is not None:
        # One impl at a time: a plugin whose command setup fails loses its commands, not ours.
        for impl in registry.hooks.genbackends_add_cli_commands.get_hookimpls():
            try:
                impl.function(subparsers=sub)
            except Exception as e:  # noqa: BLE001
                print(f"{PROG}: warning: plugin {impl.plugin_name!r} failed to add its commands: "
                      f"{type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    return ap


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``genbackends`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = None
    try:
        from genbackends.registry import get_registry

        parser = build_parser(get_registry())
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except GenBackendsError as e:
        if debug:
            raise
        text = _one_line(e)
        config = getattr(args, "config", None)
        if config and text.startswith("options.") and isinstance(e, ConfigError):
            # a backend's own check of its options block (at creation or setup): name the file
            text = f"invalid config {config}: {text}"
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - unexpected: still one line unless --debug
        if debug:
            raise
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
