"""Proving a provider before use: one evidence kind per module (dstack, Phala,
NEAR AI, Tinfoil, NVIDIA GPU, TDX collateral, Sigstore releases), the policies a
route sets, and the leases that grant a route for a while (shared by replicas
through Redis). It imports the pure TEE checks in `verifier.tee` and
`tlog.http1` (the TLS key digest) and nothing else of `gateway`: never the
API, upstream, receipts, identity or demo.
"""
