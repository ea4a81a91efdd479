"""The HTTP front: the contract's RPCs as HTTP/JSON and server-sent events, and KServe's v1 explain protocol.

It runs in the gRPC server's process and event loop and calls the very handlers the gRPC server registered,
through its own `ServiceInterceptor` (protocol="http"), so HTTP callers share the scheduler's batches, the
token store, the drain, the access log and the metrics with gRPC callers. Starlette routes, served by
uvicorn inside the same loop (`server.py`); routes are generated from the contract's descriptors
(`rpc.py`), never written per RPC.
"""
