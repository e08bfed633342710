"""The applications built on the core: the command line, the demo, the load generator,
the live view of a worker's metrics and the study of the aggregation rules.

The core (`processor/`) imports nothing from here, and no transport: the worker is handed
one. These modules may use both.
"""
