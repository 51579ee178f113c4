"""Private AI Gateway: C2SP transparency log (RFC 6962 tree, signed notes, tiles)."""
