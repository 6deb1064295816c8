"""`cones2-engine serve`: the gRPC service (cones2.v1.Cones2Service) around `cones2.Engine`.

server.py wires gRPC, health, reflection, auth, TLS, metrics and draining; handlers.py registers
the RPCs with a decoder that answers undecodable bytes INVALID_ARGUMENT; service.py holds the RPC
handlers and the exception -> status mapping; worker.py the bounded queue and the batching worker
threads; validation.py turns requests into `GenerationRequest`s (through the public engine API
only); residual_store.py keeps uploaded residuals on disk. Clients: `cones2.serve.client.Client`
and `cones2-engine client`; `cones2.serve.fuzz` is a seeded fuzzer for a running server;
`cones2.serve.ray` runs the same service on Ray Serve (`serve --ray`). The engine core never
imports this package. See docs/serve.md.
"""
