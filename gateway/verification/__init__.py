"""Proving a provider before use: one evidence kind per module (dstack, Phala,
NEAR AI, Tinfoil, NVIDIA GPU, TDX collateral, Sigstore releases), the policies a
route sets, and the leases that grant a route for a while (shared by replicas
through Redis). It imports the pure TEE checks in `verifier.tee` and
`gateway.upstream.client` (the TLS key digest); never the API, receipts,
identity or demo.
"""
