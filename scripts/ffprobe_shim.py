#!/usr/bin/env python3
"""A stand-in for `ffprobe` on PyAV, for comparing captions with llama.cpp's own `llama-mtmd-cli --video`
where no ffprobe binary is installed (imageio-ffmpeg ships ffmpeg alone).

It answers only the question llama.cpp's video helper asks (mtmd-helper.cpp, mtmd_helper_video::probe):

    ffprobe -v quiet -show_entries stream=width,height,r_frame_rate,nb_frames,duration
            -select_streams v:0 -of default=noprint_wrappers=1 (FILE | pipe:0)

printing `key=value` lines for the first video stream ("N/A" where unknown). Put it where llama.cpp looks
(`--video-ffmpeg-dir DIR`, with DIR/ffmpeg the real one) behind an executable `DIR/ffprobe`:

    #!/bin/sh
    exec /path/to/python -I scripts/ffprobe_shim.py "$@"
"""

from __future__ import annotations

import io
import sys
from fractions import Fraction

import av


def main(argv: list[str]) -> int:
    source = argv[-1] if argv else "pipe:0"
    try:
        # llama.cpp feeds the clip's bytes on stdin ("pipe:0"); a container may need to seek, so buffer them.
        handle: object = io.BytesIO(sys.stdin.buffer.read()) if source == "pipe:0" else source
        with av.open(handle) as container:
            stream = container.streams.video[0]
            rate = stream.base_rate or stream.average_rate or stream.guessed_rate
            duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
            if duration is None and container.duration:
                duration = container.duration / av.time_base
            fields = {
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
                "r_frame_rate": f"{Fraction(rate).numerator}/{Fraction(rate).denominator}" if rate else "0/0",
                "nb_frames": stream.frames or "N/A",
                "duration": f"{duration:.6f}" if duration is not None else "N/A",
            }
    except (av.FFmpegError, IndexError, OSError):
        return 1
    sys.stdout.write("".join(f"{key}={value}\n" for key, value in fields.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
