"""Private AI Gateway: C2SP transparency log (RFC 6962 tree, signed notes, tiles).

Pure formats (`merkle`, `note`, `checkpoint`, `tiles`, `proof`, `batch`), the durable
storage, the sequencer and its election among PostgreSQL replicas, the HTTP
server and its metrics, and `service`: the plumbing every HTTP service of the
project shares. It imports `witness` formats (to gather
cosignatures) and never imports `gateway` or `verifier`.
"""
