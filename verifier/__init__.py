"""Client side: everything a user or auditor runs to check the gateway and the log.

The verifying client for the stock OpenAI SDK (`client`, its httpx
`transport` and TLS `pinning`), the CLI (`python -m verifier`), the log
auditor and monitor, and the pure formats both sides share: receipts
(`receipt`), ACI E2EE (`aci`, `aci_v2`), server-sent events (`sse`) and TEE
evidence (`tee`). Runs on the base dependencies alone (`cryptography`,
`rfc8785`, `httpx`, `pyhpke`; `dcap-qvl` only for real TDX quotes). It may
import `tlog` and `witness` pure formats; it never imports `gateway` or any
server framework (aiohttp, orjson, uvicorn, redis, psycopg).
"""

from importlib import metadata as _metadata

DISTRIBUTION = "private-ai-gateway"


def version() -> str:
    """The installed distribution's version (what `--version` prints), or "unknown"
    when the code runs from a checkout that was never installed."""
    try:
        return _metadata.version(DISTRIBUTION)
    except _metadata.PackageNotFoundError:
        return "unknown"
