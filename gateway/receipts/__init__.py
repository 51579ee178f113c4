"""Receipts after signing: the signer, the durable SQLite outbox the gateway
commits every receipt to before answering, and the shipper that appends them
to the transparency log and records each verified proof. The receipt format
itself is `verifier.receipt` (pure, shared with clients). It imports `tlog`'s
pure formats and `gateway.upstream.client` (HTTP/1.1 connections); never the
API pipeline or the demo.
"""
