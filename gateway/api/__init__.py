"""The HTTP API and request pipeline: the ASGI app, the named steps of a model call,
config, API keys, rate limits and budgets, the state replicas share through Redis
(`shared`, `receipt_index`), routing, errors, and the `serve`, `verify-routes` and
`revoke-key` commands. It may import every other gateway sub-package except
`demo`, and the pure formats in `verifier` and `tlog`.
"""
