"""A flow state's webhook: POST the call's variables as JSON, take a JSON object back.

Why httpx: timeouts that bound the whole request (connect, write, read), connection pooling across
calls, and one clear exception family for every way a backend fails. Retries are the runner's (each
try is one `call_webhook`), so a failure is reported per try and the call never waits longer than
`timeout_s` for one. Header values named in `headers_env` come from the environment when the call
needs them, the way account passwords do, so secrets never sit in flow files.
"""
from __future__ import annotations

import os

import httpx

from callbot.flows.schema import Webhook

REPLY_MAX_BYTES = 64 * 1024  # a reply bigger than this is refused: variables are short strings


class WebhookError(Exception):
    """One line saying why the webhook gave no usable reply (timeout, refused, HTTP 500, not JSON)."""


def webhook_headers(spec: Webhook, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    headers = {"User-Agent": "personaplex-callbot", **spec.headers}
    for header, name in spec.headers_env.items():
        value = env.get(name)
        if not value:
            raise WebhookError(f"header {header}: environment variable {name} is not set")
        headers[header] = value
    return headers


def call_webhook(spec: Webhook, variables: dict[str, str], client: httpx.Client | None = None) -> dict:
    """POST `variables` to spec.url; the reply's JSON object, or WebhookError."""
    headers = webhook_headers(spec)
    own = client is None
    http = client if client is not None else httpx.Client(trust_env=False)
    try:
        response = http.post(spec.url, json=variables, headers=headers, timeout=spec.timeout_s)
    except httpx.TimeoutException:
        raise WebhookError(f"{spec.url}: no answer within {spec.timeout_s:g} s") from None
    except httpx.HTTPError as err:
        raise WebhookError(f"{spec.url}: {type(err).__name__}: {err}") from None
    finally:
        if own:
            http.close()
    if not 200 <= response.status_code < 300:
        raise WebhookError(f"{spec.url}: HTTP {response.status_code} {response.reason_phrase}")
    if len(response.content) > REPLY_MAX_BYTES:
        raise WebhookError(f"{spec.url}: reply of {len(response.content)} bytes (at most {REPLY_MAX_BYTES})")
    if not response.content.strip():
        return {}  # 204 or an empty 200: nothing to set, nowhere to go
    try:
        reply = response.json()
    except ValueError:
        raise WebhookError(f"{spec.url}: the reply is not JSON") from None
    if not isinstance(reply, dict):
        raise WebhookError(f"{spec.url}: the reply is JSON but not an object")
    return reply
