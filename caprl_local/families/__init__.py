"""Which text models and vision projectors fit together, and what each family needs, read from their GGUF headers.

Pure: no llama.cpp. Files that llama.cpp would abort the process on (a missing tensor its
vision graph uses unchecked, mismatched embedding widths) are refused here with a one-line
error naming the file, before llama.cpp ever sees them. Each family (a module here) says what
its projectors need, how its images are sized (its budget) and how it reads a video's frames.
"""

from .base import Family
from .checks import ModelPair, check_model_files, kv_bytes_per_token
from .known import FAMILIES, SUPPORTED_ARCHITECTURES, video_form

__all__ = ["FAMILIES", "SUPPORTED_ARCHITECTURES", "Family", "ModelPair", "check_model_files", "kv_bytes_per_token",
           "video_form"]
