import os

if os.environ.get("NATSEXP_PATCH"):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import realpatch  # noqa: F401
