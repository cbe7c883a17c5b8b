#!/usr/bin/env bash
# One hash of the sources seqfuse._C is built from (csrc/, setup.py), run in
# the repository root: scripts/gpu_prepare.sh writes it beside a prebuilt
# extension, scripts/gpu_check.sh uses that extension only when they match.
set -euo pipefail
find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
