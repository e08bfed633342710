"""`python -m processor`: the `swarm-aggregator` command."""

from processor.apps.cli import main

raise SystemExit(main())
