#!/usr/bin/env bash
# The import graph has no cycles and data flows one way (the contracts in .importlinter).
set -euo pipefail
cd "$(dirname "$0")/.."
lint-imports --no-cache
