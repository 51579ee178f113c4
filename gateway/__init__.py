"""Attested OpenAI-compatible gateway: routing, upstream verification, receipts."""
