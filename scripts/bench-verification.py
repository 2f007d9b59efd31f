"""What checking trace data on read costs, for docs/guarantees.md and docs/benchmarks.md.

python scripts/bench-verification.py TRACES_DIR OUT.json [--repeats 5]
"""

import argparse
import json
from pathlib import Path

from specmoe.bench.integrity import benchmark_verification

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", type=Path)
    parser.add_argument("json", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    report = benchmark_verification(args.traces, repeats=args.repeats)
    report["command"] = f"python scripts/bench-verification.py {args.traces} {args.json} --repeats {args.repeats}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("passes", "checked_overhead_fraction", "first_read_overhead_fraction")}))
