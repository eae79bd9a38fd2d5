#!/usr/bin/env bash
# Regenerate the gRPC Python code from proto/specsplit.proto (needs grpcio-tools, a dev dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/specsplit/transport/pb
python -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/specsplit.proto
# generated modules import each other as top-level; make the import package-relative
sed -i 's/^import specsplit_pb2 as/from specsplit.transport.pb import specsplit_pb2 as/' "$out/specsplit_pb2_grpc.py"
# and let the message classes name their real module, so they pickle (Ray Serve's gRPC proxy
# pickles the request it hands a replica)
sed -i "s/(DESCRIPTOR, 'specsplit_pb2', _globals)/(DESCRIPTOR, 'specsplit.transport.pb.specsplit_pb2', _globals)/" "$out/specsplit_pb2.py"
echo "generated into $out"
