"""The child side of the first-load check (see probe.py): load the pair as the parent will, caption a small image.

The parent starts it with ``python -I`` from an empty folder, so neither the working folder nor the
user's site-packages nor PYTHON* variables can put code into it; it reports on stdout and by exit code.
"""

from __future__ import annotations

import json
import sys

OK = "caprl-local probe: loaded"
FAILED = "caprl-local probe: error: "
EXIT_FAILED = 3  # an error the real load will report itself (a CaprlError): not a verdict


def main(spec: str) -> int:
    """Load the pair described by `spec` (JSON: model, mmproj, options) and caption a 56-pixel image."""
    from PIL import Image

    from ..errors import CaprlError
    from .captioner import Captioner

    request = json.loads(spec)
    try:
        with Captioner(request["model"], request["mmproj"], **request["options"]) as cap:
            cap.caption(Image.new("RGB", (56, 56), (90, 140, 200)), max_tokens=2)
    except CaprlError as exc:
        print(f"{FAILED}{exc}", file=sys.stderr)
        return EXIT_FAILED
    print(OK, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
