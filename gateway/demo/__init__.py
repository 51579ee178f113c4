"""The local demo: `python -m gateway demo` (the whole stack on one machine,
no network) and its OpenAI-compatible model provider with simulated dstack
evidence. Demo only: nothing in the product imports this package.
"""
