"""What checking trace data on read costs, for docs/guarantees.md and docs/benchmarks.md.

python scripts/bench-verification.py TRACES_DIR OUT.json [--repeats 5]
"""

import argparse
import json
from pathlib import Path

from specmoe.bench.integrity import benchmark_verification, consumer_overhead, git_commit

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", type=Path)
    parser.add_argument("json", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--consumers", default="", help="Predictors to fit and score, checked against unchecked.")
    parser.add_argument("--skip-passes", action="store_true", help="Only the consumers.")
    args = parser.parse_args()
    if args.skip_passes:
        report = {"benchmark": "verification", "traces": str(args.traces), "commit": git_commit()}
    else:
        report = benchmark_verification(args.traces, repeats=args.repeats)
    consumers = [name for name in args.consumers.split(",") if name]
    if consumers:
        report["consumers"] = consumer_overhead(args.traces, consumers, repeats=args.repeats)
    report["command"] = (
        f"python scripts/bench-verification.py {args.traces} {args.json} --repeats {args.repeats}"
        + (f" --consumers {args.consumers}" if consumers else "")
        + (" --skip-passes" if args.skip_passes else "")
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    keys = ("passes", "checked_overhead_fraction", "first_read_overhead_fraction", "consumers")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=1))
