"""`python -m transports.nats`: the operators' helpers (as `swarm-aggregator nats`)."""

from transports.nats.admin import main

raise SystemExit(main())
