"""`cones2-engine serve`: the gRPC service (cones2.v1.Cones2Service) around `cones2.Engine`.

server.py wires gRPC, health, reflection, auth, TLS and metrics; service.py holds the RPC handlers
and the exception -> status mapping; worker.py the bounded queue and the batching worker threads;
validation.py turns requests into `GenerationRequest`s; residual_store.py keeps uploaded residuals
on disk. Clients: `cones2.serve.client.Client` and `cones2-engine client`. See docs/serve.md.
"""
