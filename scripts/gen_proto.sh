#!/usr/bin/env bash
# Generate the Python gRPC code for proto/modelworker/v1/worker.proto into OUT_DIR (a package).
# Usage: scripts/gen_proto.sh PYTHON OUT_DIR
set -euo pipefail
python=$1
out=$2
mkdir -p "$out"
"$python" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/modelworker/v1/worker.proto
# protoc writes absolute imports rooted at the proto path; make them relative to our package.
sed -i 's/^from modelworker\.v1 import/from . import/' "$out"/modelworker/v1/worker_pb2_grpc.py
for d in "$out" "$out/modelworker" "$out/modelworker/v1"; do
  [ -f "$d/__init__.py" ] || echo '"""Generated from proto/ by scripts/gen_proto.sh; do not edit."""' > "$d/__init__.py"
done
