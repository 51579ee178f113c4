"""C2SP tlog-witness: cosigns only checkpoints consistent with what it saw before.

The cosignature and request formats are pure. The server imports `tlog`'s
formats and its shared plumbing (`tlog.service`), never the log's own server,
and never imports `gateway` or `verifier`.
"""
