"""`cones2-engine serve`: cones2.v1.Cones2Service around `cones2.Engine`, over gRPC, HTTP/JSON and Ray Serve.

core.py is the service without a transport (validate, bounded queue, batching workers, previews,
cancellation, one exception -> status mapping, warm-up, drain); the adapters only translate:
server.py (gRPC: health, reflection, TLS, metrics; it also starts http_json.py, the HTTP/JSON API)
and ray/ (Ray Serve replica + ingress). auth.py checks the bearer token for all of them;
validation.py turns requests into `GenerationRequest`s (public engine API only); residual_store.py
keeps uploaded residuals on disk; handlers.py decodes gRPC requests without raising. Clients:
`cones2.serve.client.Client` and `cones2-engine client`. The engine core never imports this
package. See docs/serve.md.
"""
