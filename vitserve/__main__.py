"""`python -m vitserve ...`: the `vitserve` command (vitserve/cli.py)."""

from vitserve.cli import main

raise SystemExit(main())
