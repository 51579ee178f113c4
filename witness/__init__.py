"""C2SP tlog-witness: cosigns only checkpoints consistent with what it saw before."""
