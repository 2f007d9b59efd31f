"""`specmoe` with prefetches awaiting their layer left unprotected from eviction, as before
commit 35e89de: an ablation for docs/benchmarks.md ("Where the gap to the oracle is").

    python scripts/bench-without-prefetch-protection.py bench offload ARGS...
"""

import sys

from specmoe.cli import app
from specmoe.offload.eviction import EvictionPolicy

if __name__ == "__main__":
    EvictionPolicy.protects_prefetches = False
    sys.argv = ["specmoe", *sys.argv[1:]]
    app()
