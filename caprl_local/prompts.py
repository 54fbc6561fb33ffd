"""Caption prompts: the presets, and the chat format each model family expects."""

from __future__ import annotations

from .errors import CaprlError

#: CapRL's own caption prompt: what the model was trained to answer.
DEFAULT_PROMPT = "Please describe this image in detail"

#: CapRL-Video's plain prompt: the default for a video.
VIDEO_PROMPT = "Please describe this video in detail."

PRESETS: dict[str, str] = {
    "detailed": DEFAULT_PROMPT,
    "short": "Describe this image in one or two sentences.",
    "chart": (
        "Please describe this chart in detail: its type, title, axes and units, legend, "
        "every data series with its values, and the main trends it shows."
    ),
    "document": (
        "Please transcribe all text in this document in reading order, "
        "then describe its layout, tables and figures."
    ),
    "tags": "List the subjects, objects, setting, colors and style of this image as comma-separated tags.",
    "video": VIDEO_PROMPT,
    # CapRL-Video's second, dense form: every event with its time, for text-to-video training sets.
    "video-dense": (
        "Please describe this video in detail, event by event in the order they happen. Give each event its "
        "time: [mm:ss] for a moment, [mm:ss - mm:ss] for a span. Describe the setting, the subjects and their "
        "actions, camera motion and shot changes, text on screen, and how the scene changes over time."
    ),
}

#: Where the image goes in a prompt; without it, the image comes first, as in CapRL's prompt (see
#: chat.place_images).
IMAGE_PLACEHOLDER = "<image>"

#: One user turn and the assistant's opening in Qwen's ChatML, with no system turn (CapRL's
#: captions were trained and evaluated without one). The engine renders each model's own
#: chat template instead, and falls back to ChatML for a GGUF whose template llama.cpp does not know.
CHATML = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"

#: Where the prompt's content goes in a chat format.
CONTENT = "{content}"


def resolve_prompt(*, prompt: str | None = None, preset: str | None = None, default: str = DEFAULT_PROMPT) -> str:
    """The prompt text for an explicit prompt, else a preset name, else the default (CapRL's own);
    GenerationOptions refuses both at once."""
    if prompt is not None:
        if not prompt.strip():
            raise CaprlError("the prompt is empty; give some text or leave it out for CapRL's default")
        return prompt
    if preset is None:
        return default
    try:
        return PRESETS[preset]
    except KeyError:
        raise CaprlError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}") from None


#: A chat turn as a chat template takes it: (role, content).
Turn = tuple[str, str]


def chatml(turns: list[Turn]) -> str:
    """Turns and the assistant's opening in Qwen's ChatML (what CHATML is for one user turn), for a
    model whose chat template llama.cpp does not know."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + "<|im_start|>assistant\n"
