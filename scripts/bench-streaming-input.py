"""Peak memory of `specmoe collect --max-tokens N` on one huge single-line document, for
docs/benchmarks.md ("Streaming input").

    python scripts/bench-streaming-input.py OUT.json [--mb 50] [--max-tokens 2000]
        [--checkout DIR ...] [--repeats 1]

Writes a document of MB megabytes on one line (no newline): words separated by spaces, or
with --letters one run of letters with no space at all (one giant word for the tokenizer's
pre-tokenizer: the case where tokenising a whole document at once is slowest), then runs
`python -m specmoe collect --model olmoe-64e --text DOC --max-tokens N` once per checkout
(PYTHONPATH=DIR; default: this one), repeats interleaved, and records each child's peak RSS
(ru_maxrss from wait4) and wall time.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from specmoe.storage.scratch import scratch_dir


def write_document(path: Path, megabytes: int, letters: bool) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    separator = "" if letters else " "
    target = megabytes * 1_000_000
    with path.open("w") as handle:
        written = 0
        while written < target:
            chunk = separator.join(rng.choice(words) for _ in range(10_000)) + separator
            handle.write(chunk)
            written += len(chunk)


def run_once(checkout: Path, document: Path, out: Path, max_tokens: int) -> dict:
    command = [sys.executable, "-m", "specmoe", "collect", "--model", "olmoe-64e", "--text", str(document)]
    command += ["--max-tokens", str(max_tokens), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(checkout), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace")[-500:]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "checkout": str(checkout),
        "exit_status": os.waitstatus_to_exitcode(status),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "seconds": round(seconds, 1),
        "stderr_tail": stderr if status else "",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--checkout", type=Path, action="append")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--letters", action="store_true", help="No spaces: one giant word.")
    args = parser.parse_args()
    checkouts = args.checkout or [Path(__file__).resolve().parents[1]]
    with scratch_dir("bench-streaming") as tmp:
        document = tmp / "one-line.txt"
        write_document(document, args.mb, args.letters)
        runs = [
            run_once(checkout.resolve(), document, tmp / f"traces-{i}", args.max_tokens)
            for _ in range(args.repeats)
            for i, checkout in enumerate(checkouts)
        ]
        size = document.stat().st_size
    report = {
        "benchmark": "streaming-input",
        "document_bytes": size,
        "lines": 1,
        "spaces": not args.letters,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "command": "python scripts/bench-streaming-input.py " + " ".join(sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(runs, indent=2))
