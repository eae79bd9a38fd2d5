#!/usr/bin/env bash
# Regenerate the gRPC Python code from proto/specsplit.proto (needs grpcio-tools, a dev dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/specsplit/transport/pb
python -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/specsplit.proto
# generated modules import each other as top-level; make the import package-relative
sed -i 's/^import specsplit_pb2 as/from specsplit.transport.pb import specsplit_pb2 as/' "$out/specsplit_pb2_grpc.py"
echo "generated into $out"
