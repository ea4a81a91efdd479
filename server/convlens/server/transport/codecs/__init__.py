"""Protobuf messages <-> domain objects, one module per RPC; `common` holds the shared pieces.

Pure conversion: no decisions, no compute. Request converters raise InvalidArgument naming the field;
response builders encode pictures as PNG here, so the servicer never touches pixels.
"""
