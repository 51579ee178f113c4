"""The HTTP API and request pipeline: the ASGI app, the named steps of a model call,
config, API keys, rate limits and budgets, routing, errors, and the `serve` and
`verify-routes` commands. It may import every other gateway sub-package except
`demo`, and the pure formats in `verifier` and `tlog`.
"""
