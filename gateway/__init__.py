"""The attested OpenAI-compatible gateway (server side; runs inside a dstack TEE).

One sub-package per concern:

- `api`: the HTTP API and the request pipeline (ASGI app, the named steps of a
  model call, config, API keys, rate limits and budgets, router, errors, the
  `serve` and `verify-routes` commands);
- `identity`: the gateway's own TEE identity (keys derived from dstack KMS,
  building its attestation document, the dstack guest-agent simulator);
- `upstream`: reaching providers (pooled HTTP/1.1 client with the TLS pin
  checked before any byte is written, the lease adapter);
- `verification`: proving a provider before use (one evidence kind per
  module, policies, leases);
- `receipts`: signing receipts, the durable outbox and the shipper to the log;
- `demo`: the local demo stack and its model provider (never imported by the
  product).

Pure formats and evidence checks live on the client side (`verifier`) and are
imported from there; nothing in `verifier`, `tlog` or `witness` imports this
package.
"""
