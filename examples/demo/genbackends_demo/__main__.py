"""``python -m genbackends_demo``: the demo without the core CLI."""
from genbackends_demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
