"""Secrets out of what is recorded: URLs in params, tags, artifacts and train.json.

No MLflow here: `mixer train-offline` records the same redacted config on a machine without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mixer.config import Config

REDACTED = "***"
# `scheme://user:password@host`: the credentials part of a URL (also in MLflow's own error messages).
_URL_CREDENTIALS = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
# `?token=...`, `&X-Amz-Signature=...`: query parameters whose name says they hold a secret.
_SECRET_QUERY = re.compile(
    r"([?&][^=&\s#]*(?:token|passw|secret|signature|credential|key)[^=&\s#]*=)[^&\s#]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the secrets a URL can carry (`user:password@`, `?token=...`) replaced by ***.

    Everything written to MLflow or train.json from the config goes through it: a tracking URI, data
    URL, Ray address or storage path may embed credentials, and params, tags and artifacts are
    readable by everyone with access to the tracking server. Environment variables are never logged.
    """
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", _URL_CREDENTIALS.sub(rf"\1{REDACTED}@", text))


def logged_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as MLflow records it (params, params.yaml): every string redacted."""
    return redact_all(cfg.to_dict())


def redact_all(value: Any) -> Any:
    """`value` with every string in it redacted (nested mappings and lists too)."""
    if isinstance(value, Mapping):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_all(item) for item in value]
    return redact(value) if isinstance(value, str) else value
