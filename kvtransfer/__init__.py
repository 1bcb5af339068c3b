"""KV-cache handoff between a prefill worker and a decode worker.

layout (KVLayout), sink (KVSink, KVRefused), states (TransferState, TransferResult), wire (frames,
checksums), sender (TransferBackend.open -> Transfer), receiver (KVReceiver), grpc_backend
(GrpcTransferBackend, start_kv_server), bearer (the transfer token in gRPC metadata), inprocess
(InProcessBackend), array_sink (ArraySink), bench.
The protocol is documented in protos/disagg/v1/kvtransfer.proto.
"""
