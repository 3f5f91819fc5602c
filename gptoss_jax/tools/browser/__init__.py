"""The browser tool and its backends, chosen by a spec string: ``local:DIR``, ``exa``, ``youcom``.

Keys and base URLs are arguments; reading keys from the environment is the CLI's business
(:func:`api_key_from_env`), so the library never picks up credentials by itself, and nothing
touches the network unless an HTTP backend was asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..base import ToolSetupError
from .backends import BackendError, BrowserBackend, SearchHit
from .local import LocalBackend
from .pages import Page, html_to_page, text_to_page
from .tool import BrowserState, BrowserTool, planned_action, resolve_citations
from .web import ExaBackend, YouComBackend

API_KEY_ENV = {"exa": "EXA_API_KEY", "youcom": "YDC_API_KEY"}

__all__ = ["API_KEY_ENV", "BackendError", "BrowserBackend", "BrowserState", "BrowserTool", "ExaBackend",
           "LocalBackend", "Page", "SearchHit", "YouComBackend", "api_key_from_env", "html_to_page",
           "make_backend", "planned_action", "resolve_citations", "text_to_page"]


def api_key_from_env(spec: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key an HTTP backend spec needs, from the environment (for the CLI layer only)."""
    name = API_KEY_ENV.get(spec.partition(":")[0])
    return (os.environ if environ is None else environ).get(name) if name else None


def make_backend(spec: str, *, api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 30.0) -> BrowserBackend:
    """The backend a spec names: ``local:DIR``, ``exa`` or ``youcom`` (keys passed in)."""
    kind, _, rest = spec.partition(":")
    if kind == "local":
        if not rest:
            raise ToolSetupError("the local browser backend needs a folder: local:DIR")
        return LocalBackend(rest)
    if kind in ("exa", "youcom"):
        if not api_key:
            raise ToolSetupError(f"the {kind} browser backend needs an API key (the CLI reads {API_KEY_ENV[kind]})")
        cls = ExaBackend if kind == "exa" else YouComBackend
        return cls(api_key=api_key, base_url=base_url, timeout=timeout)
    raise ToolSetupError(f"unknown browser backend {spec!r}: use local:DIR, exa or youcom")
