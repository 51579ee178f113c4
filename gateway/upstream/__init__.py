"""Reaching providers: `client` forwards model calls over `tlog.http1` (the pooled
HTTP/1.1 client whose TLS pin is checked on the handshake before any request
byte is written) and maps failures to stable error codes, and the lease adapter
turns verification outcomes into the facts a receipt records. It imports
`gateway.verification` (leases) and `gateway.api.errors`/`config` types only; it
never imports the pipeline, receipts or demo.
"""
