"""The OpenAI-style HTTP face: FastAPI app (``create_app``), uvicorn runner (``HTTPFace``).

Modules, one idea each: ``config`` (limits), ``requests`` / ``responses`` (the schemas),
``convert`` (HTTP -> ``GenerationRequest``), ``generation`` (a blocking generator driven
from async code), ``streaming`` (server-sent events), ``spans`` (text by token origin),
``middleware`` (body limit and deadline, request log), ``errors`` (OpenAI-shaped errors),
``metrics`` (Prometheus), ``status`` (JSON for the page), ``app``, ``runner``; ``page/``
holds the page's HTML, CSS and JS.
"""

from specsplit.transport.http_face.app import create_app
from specsplit.transport.http_face.config import FaceConfig
from specsplit.transport.http_face.generation import GenerateFn
from specsplit.transport.http_face.runner import HTTPFace

__all__ = ["FaceConfig", "GenerateFn", "HTTPFace", "create_app"]
