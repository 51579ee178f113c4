"""`python -m gateway COMMAND ...` (serve, demo, verify-routes, verify-evidence, revoke-key; also
installed as `pag-gateway`): dispatch to the command's module; `--version` prints the
installed version."""

from __future__ import annotations

import sys

USAGE = """usage: python -m gateway [--version] COMMAND [ARGS]

commands:
  serve --config FILE --listen HOST:PORT     run the gateway
  demo --data DIR --listen HOST:PORT          run the whole local demo stack
  verify-routes --config FILE                 verify every route's provider now
  verify-evidence --log URL --vkey VKEY --index N [--witness VKEY ...]
                  [--allow-simulated] [--collateral FILE]
                                              re-verify a logged pag-evidence/1 entry
  revoke-key --config FILE --sha256 HEX [--undo]
                                              revoke an API key on every replica ([shared])
"""


def main(argv: list[str]) -> int:
    """Run one command; its exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from verifier import version

        print(f"pag-gateway {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from gateway.api import server
        return server.main(rest)
    if cmd == "demo":
        from gateway.demo import stack as demo
        return demo.main(rest)
    if cmd == "verify-routes":
        from gateway.api import verify_routes
        return verify_routes.main(rest)
    if cmd == "verify-evidence":
        from gateway.api import verify_evidence
        return verify_evidence.main(rest)
    if cmd == "revoke-key":
        from gateway.api import revoke_key
        return revoke_key.main(rest)
    print(f"unknown command {cmd!r}\n{USAGE}", end="", file=sys.stderr)
    return 2


def console() -> int:
    """The `pag-gateway` console script."""
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
