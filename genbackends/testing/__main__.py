"""``python -m genbackends.testing --backend NAME [--model DIR] [--set K=V] [-- pytest args]``:
runs the conformance suite in pytest and exits with its status."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    import pytest

    p = argparse.ArgumentParser(prog="python -m genbackends.testing", description=__doc__)
    p.add_argument("--backend", required=True, help="registered backend name")
    p.add_argument("--model", help="tiny HF model folder (default: a tiny Llama built on the fly)")
    p.add_argument("--config", help="YAML config merged over the kit's defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--logprob-tol", type=float, help="absolute logprob tolerance vs float64 (default 1e-3)")
    p.add_argument("--skip", action="append", default=[], metavar="CHECK[,CHECK]", help="checks that do not apply")
    args, rest = p.parse_known_args(argv)
    # this package is imported already (we run inside it), so pytest cannot assert-rewrite the
    # plugin module; the checks themselves live in the suite module, which it does rewrite
    quiet = ["-W", "ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning"]
    cmd = [*quiet, "-p", "genbackends.testing", "--pyargs", "genbackends.testing.suite", "--genbackends-backend", args.backend]
    if args.model:
        cmd += ["--genbackends-model", args.model]
    if args.config:
        cmd += ["--genbackends-config", args.config]
    for s in args.set:
        cmd += ["--genbackends-set", s]
    if args.logprob_tol is not None:
        cmd += ["--genbackends-logprob-tol", str(args.logprob_tol)]
    for s in args.skip:
        cmd += ["--genbackends-skip", s]
    return int(pytest.main(cmd + [a for a in rest if a != "--"]))


if __name__ == "__main__":
    sys.exit(main())
