#!/usr/bin/env bash
# Install and run the whole service on its embedded default: SQLite in ./radvlm-data, no Redis.
# Settings come from RADVLM_* variables or RADVLM_CONFIG_FILE (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh model
exec .venv/bin/radvlm-pacs serve "$@"
