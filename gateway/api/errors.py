"""OpenAI-shaped error bodies with stable machine-readable codes.

An error message never contains request or response content: only codes,
route ids, model names and limits.
"""

from __future__ import annotations

import json


class GatewayError(Exception):
    """A refusal: HTTP status, stable `code`, OpenAI error `type`, optional `param`."""

    def __init__(self, status: int, code: str, message: str, *,
                 type_: str = "invalid_request_error", param: str | None = None,
                 route_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_
        self.param = param
        self.route_id = route_id

    def body(self) -> bytes:
        """The JSON error body `{"error": {"message", "type", "code", "param"}}`."""
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """Serialise one OpenAI-shaped error."""
    return json.dumps({"error": {"message": message, "type": type_, "code": code,
                                 "param": param}}, separators=(",", ":")).encode()


def bad_request(code: str, message: str, param: str | None = None) -> GatewayError:
    """400 with `invalid_request_error`."""
    return GatewayError(400, code, message, param=param)


def unauthorized(message: str = "missing or invalid API key") -> GatewayError:
    """401 `invalid_api_key`."""
    return GatewayError(401, "invalid_api_key", message, type_="authentication_error")


def rate_limited(code: str, message: str) -> GatewayError:
    """429 `rate_limit_exceeded` or `budget_exceeded`."""
    return GatewayError(429, code, message, type_="rate_limit_error")


def refused(status: int, code: str, message: str, route_id: str | None = None) -> GatewayError:
    """A routing or verification refusal (no byte went upstream)."""
    return GatewayError(status, code, message, type_="upstream_error", route_id=route_id)


def stopping(message: str) -> GatewayError:
    """503 `gateway_stopping`: the server's stop cut the request (its grace ran out)."""
    return GatewayError(503, "gateway_stopping", message, type_="server_error")


MALFORMED = error_body("malformed HTTP request", "invalid_request_error", "malformed_http")
"""The 400 body of a request the HTTP parser rejects (tlog.service.uvicorn_config)."""
