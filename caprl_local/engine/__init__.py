"""The engine: the only package that imports llama_cpp.

backend (llama.cpp itself, its log, devices, memory) -> session (one model pair's handles) ->
scheduler (the one token loop) -> captioner (the public class).
"""

from .backend import RuntimeInfo, runtime_info
from .captioner import Captioner, CaptionHandle
from .scheduler import TextSink

__all__ = ["CaptionHandle", "Captioner", "RuntimeInfo", "TextSink", "runtime_info"]
