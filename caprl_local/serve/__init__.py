"""An OpenAI-compatible server for a Captioner: ``caprl-local serve``, or :func:`serve` from Python.

Needs the ``serve`` extra (starlette and uvicorn): ``pip install '.[serve]'`` in a caprl-local checkout.
"""

from __future__ import annotations

from .app import ServeOptions, create_app, serve
from .protocol import ImagePolicy

__all__ = ["ImagePolicy", "ServeOptions", "create_app", "serve"]
