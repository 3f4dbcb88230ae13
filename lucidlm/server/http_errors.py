"""Errors the server answers with, in OpenAI's format:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

https://platform.openai.com/docs/guides/error-codes - 400 for a bad request, 401 for a
missing or wrong API key, 404 for an unknown model or route, 413 for a body over the limit,
429 when the queue is full, 500 for a bug of ours (never a traceback), 503 while shutting down.
"""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

from ..errors import ContextOverflowError, LucidError


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                              headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def from_lucid_error(error: LucidError, fields: set[str], aliases: dict[str, str] | None = None) -> APIError:
    """A 400 for a library error. The library's messages start with the parameter they are
    about ("top_p must be in (0, 1], got 0"); when that word is a request field (after
    `aliases`, library name -> request name) it becomes `param` and leads the message.
    A context overflow names the request's max-tokens field."""
    aliases = aliases or {}
    message = str(error)
    if isinstance(error, ContextOverflowError):  # "prompt (N tokens) + max_new_tokens (M) exceeds ..."
        for library_name, request_name in aliases.items():
            message = message.replace(library_name, request_name)
        return APIError(400, message, param=aliases.get("max_new_tokens"), code="context_length_exceeded")
    first = re.match(r"\w*", message).group()  # "logit_bias[5] must be ..." names logit_bias
    name = aliases.get(first, first)
    param = name if name in fields else None
    if param is not None:
        message = param + message[len(first):]
    return APIError(400, message, param=param)
