#!/usr/bin/env bash
# Install everything the tests need from scratch, then run the whole suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test,serve,bench || exit 1
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
exit $rc
