#!/usr/bin/env bash
# Quick start, step 1: install dependencies, build, and run the main job on the embedded
# default model. Extra arguments go to `moert generate` (e.g. --model DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec "$MOERT_BUILD/cli/moert" generate "$@"
