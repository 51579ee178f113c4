"""Private AI Gateway: C2SP transparency log (RFC 6962 tree, signed notes, tiles).

Pure formats (`merkle`, `note`, `checkpoint`, `tiles`, `proof`, `batch`), the durable
storage, the sequencer and its election among PostgreSQL replicas, the HTTP
server and its metrics, the witness client, and two modules every HTTP service
of the project shares: `service` (server plumbing) and `http1` (the strict
pooled HTTP/1.1 client the log, the receipt shipper and the gateway's upstream
calls use). It imports `witness` formats (to gather
cosignatures) and never imports `gateway` or `verifier`.
"""
