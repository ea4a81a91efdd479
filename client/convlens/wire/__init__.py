"""Wire-format helpers shared by the SDK and the server (no torch, no server, no SDK imports).

`convlens.wire.tensors`: numpy <-> convlens.v1.Tensor. Both `convlens.client` and `convlens.server` import
it; neither depends on the other.
"""
