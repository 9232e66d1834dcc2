"""``python -m genbackends_bench CONFIG [--backends ...]``: the bench command without the core CLI."""
from genbackends_bench.cli import main

raise SystemExit(main())
