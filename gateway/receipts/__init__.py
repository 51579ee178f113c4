"""Receipts after signing, and what must be logged before them: the signer, the
durable SQLite outbox the gateway commits every receipt to before answering,
the shipper that appends receipts to the transparency log and records each
verified proof, the keyset entry logged before the gateway listens
(`keysets`), each lease's evidence entry logged before the lease serves
(`evidence`), and the checked single-entry log client both use (`logclient`).
The formats themselves are pure modules in `verifier` (`receipt`,
`keyset_entry`, `evidence_entry`), shared with clients. It imports `tlog`'s
and `witness`'s pure formats and `tlog.http1` (HTTP/1.1 connections) and
nothing else of `gateway`: never the API, upstream, the verification engine or
the demo.
"""
