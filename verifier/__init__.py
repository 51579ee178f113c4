"""Client side: verify attestation, receipts, checkpoints and proofs; audit logs."""
