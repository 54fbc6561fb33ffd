"""``caprl-local caption``: one image or video, a folder, a dataset; here, or on OpenAI-compatible servers."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource
from typing_extensions import Unpack

from .. import console
from ..errors import CaprlError
from ..options import GenerationKwargs, GenerationOptions, Parallel, PretrainedKwargs, default
from ..prompts import PRESETS, VIDEO_PROMPT
from .base import (
    ENGINE_NAMES,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    AutoOrNumber,
    ShardType,
    cli,
    engine_options,
    source_options,
    warn_unused,
)

if TYPE_CHECKING:
    from ..batch import BatchSummary, OutputOptions
    from ..captioning import Captioning
    from ..endpoints import EndpointCaptioner
    from ..engine import Captioner
    from ..inputs import BatchItem
    from ..ray import RayCaptioner


@cli.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=str))
@source_options
@click.option("--image", "extra_images", multiple=True, type=click.Path(path_type=str), metavar="FILE",
              help="An image (or video) to caption, as if given among IMAGES (repeatable; llama.cpp's spelling).")
@click.option("--recursive", "-r", is_flag=True, help="Take images and videos from sub-folders of folders too.")
@click.option("--from-list", "list_file", metavar="FILE",
              help="Read images and videos from FILE ('-' for stdin): a path per line, or JSONL objects with an "
                   "\"image\" (or \"video\") field whose other fields are kept in the output.")
@click.option("--null", "-0", "null", is_flag=True,
              help="The --from-list FILE holds paths each ended by a NUL byte, as find -print0 writes them "
                   "(like xargs -0): each taken as it is.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True,
              help="Output format; jsonl gives one object per image or video with tokens, timings (a video's frames, "
                   "their rate and size) or the error.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format jsonl.")
@click.option("--caption-field", default="caption", show_default=True, metavar="NAME",
              help="The JSONL field that holds the caption. With --format jsonl, a --from-list record that has this "
                   "field already is refused, so that its own value is never replaced: name another field.")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=str),
              help="Write results to FILE instead of stdout ('-': stdout); with jsonl, images already in it are skipped.")
@click.option("--sidecar", is_flag=True, help="Write each caption beside its image or video (photo.jpg -> photo.txt, "
                                              "clip.mp4 -> clip.txt).")
@click.option("--sidecar-ext", default=".txt", show_default=True, help="File extension for --sidecar.")
@click.option("--overwrite", is_flag=True, help="Caption images and videos that already have a result again.")
@click.option("--parallel", type=AutoOrNumber(1, "1 or more captions in flight"), default="auto", show_default=True,
              help="Captions in flight at once in a batch: more images per minute for a little more memory "
                   "(auto: as many as memory allows, at most 4 on a CPU with up to 4 threads, 8 with more, "
                   "16 on a GPU).")
@click.option("--progress/--quiet", "progress", default=None,
              help="Force the progress bar on or off [default: on when stderr is a terminal].")
@click.option("--prompt", "-p", help="Your own instruction, for images and videos alike; '<image>' marks where the image "
                                    "goes (default: first).")
@click.option("--video-prompt", metavar="TEXT",
              help="The instruction for videos, where it is not --prompt's (a folder of both) [default: --prompt or "
                   "--preset's, else CapRL-Video's 'Please describe this video in detail.'].")
@click.option("--preset", type=click.Choice(list(PRESETS)),
              help="A ready-made prompt, for images and videos alike [default: the model's own for an image, "
                   "the video preset's for a video].")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=default(GenerationOptions, "max_tokens"),
              show_default=True, help="Stop after this many new tokens.")
@click.option("--temperature", "--temp", type=click.FloatRange(min=0.0), default=default(GenerationOptions, "temperature"),
              show_default=True, help="0 is greedy decoding; higher values sample more freely.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True),
              default=default(GenerationOptions, "top_p"), show_default=True,
              help="Nucleus sampling: keep the most likely tokens up to this probability (with --temperature > 0).")
@click.option("--repeat-penalty", type=click.FloatRange(min=0.0, min_open=True),
              default=default(GenerationOptions, "repeat_penalty"), show_default=True,
              help="Penalty on tokens repeated in the last 256 of the prompt and caption (1 is none).")
@click.option("--seed", "-s", type=int, help="Seed for sampling (with --temperature > 0).")
@click.option("--loop-guard/--no-loop-guard", default=default(GenerationOptions, "loop_guard"), show_default=True,
              help="End a caption that keeps repeating itself, cut back to its first round (finish_reason "
                   "'repetition').")
@click.option("--stop", multiple=True, metavar="TEXT", help="End a caption before this text (repeatable).")
@engine_options
@click.option("--endpoint", "endpoints", multiple=True, metavar="URL",
              help="Caption on this OpenAI-compatible server instead of here (repeatable: a fleet), e.g. "
                   "http://gpu1:8000/v1.")
@click.option("--endpoint-model", metavar="NAME", help="The model to ask the endpoints for [default: the first each lists].")
@click.option("--endpoint-concurrency", type=click.IntRange(min=1),
              help="Requests at once per endpoint [default: the slots the server reports, else 4].")
@click.option("--api-key", envvar="CAPRL_LOCAL_API_KEY", help="Key for the endpoints [env CAPRL_LOCAL_API_KEY].")
@click.option("--endpoint-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Deadline of each request to an endpoint; an image past it goes to another endpoint "
                   "[default: 120 s plus 0.5 s per --max-tokens].")
@click.option("--endpoint-outage", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
              metavar="SECONDS", help="Stop the run (the rest left for a rerun) once no endpoint has answered "
                                      "for this long.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Caption on Ray: a Ray instance on this machine, or the cluster at ADDRESS ('auto', ray://...).")
@click.option("--ray-actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray actors, each holding one loaded model.")
@click.option("--ray-cpus-per-actor", type=click.FloatRange(min=0, min_open=True),
              help="CPUs Ray reserves per actor (its llama.cpp threads) [default: --threads, else 1].")
@click.option("--ray-gpus-per-actor", type=click.FloatRange(min=0), default=0, show_default=True,
              help="GPUs Ray reserves per actor.")
@click.option("--shard", type=ShardType(), metavar="I/N",
              help="Caption only shard I of N of the inputs: a fixed split, so N machines given the same inputs "
                   "caption each image exactly once. An image's shard follows its name inside what was given (a "
                   "folder: its path inside it; a pattern: its path below the pattern's fixed folder; a list: the "
                   "entry as written; a file: its file name), however each machine spells the folder or list.")
def caption(images: tuple[str, ...], model: str, mmproj_path: str | None, quant: str | None, imatrix: bool,
            mmproj_quant: str | None, cache_dir: str | None, offline: bool, extra_images: tuple[str, ...],
            recursive: bool, list_file: str | None, null: bool, fmt: str, as_json: bool, caption_field: str,
            output: str | None, sidecar: bool, sidecar_ext: str, overwrite: bool, parallel: Parallel,
            progress: bool | None, prompt: str | None, preset: str | None, endpoints: tuple[str, ...],
            endpoint_model: str | None, endpoint_concurrency: int | None, api_key: str | None,
            endpoint_timeout: float | None, endpoint_outage: float, ray_address: str | None,
            ray_actors: int, ray_cpus_per_actor: float | None, ray_gpus_per_actor: float,
            shard: tuple[int, int] | None, **options: Any) -> None:
    """Caption IMAGES (files, folders, glob patterns, or - for one image on stdin) and print the captions.

    Videos (.mp4, .mov, .mkv, .webm, .avi) are captioned from frames sampled at --fps, among images or alone.
    One image or video: its caption on stdout, as it is written. Many: each written as it is done; the
    same command run again (after Ctrl-C, say) skips those that already have a --sidecar or
    an entry in the --output file. The model is fetched and verified on first use, then cached:
    later runs need no network.
    """
    generation = _generation(prompt, preset, options)  # the caption options, checked before anything runs
    # Where no prompt was chosen, a video gets CapRL-Video's own and an image the model's: each kept (and resumed) by it.
    video_prompt = generation.video_prompt or (VIDEO_PROMPT if generation.prompt is None and generation.preset is None
                                               else None)
    images = (*images, *extra_images)
    if as_json:
        if fmt != "jsonl" and click.get_current_context().get_parameter_source("fmt") is ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--json is --format jsonl; leave out --format {fmt}")
        fmt = "jsonl"
    if not images and list_file is None:
        raise click.UsageError("give images, folders or glob patterns, or --from-list FILE")
    if null and list_file is None:
        raise click.UsageError("-0 (--null) reads the --from-list FILE as NUL-separated paths: give --from-list too")
    if output == "-":  # the Unix convention: results to stdout
        output = None
    _check_output_is_not_an_input(output, list_file)
    from_stdin = "-" in images
    if from_stdin and (len(images) > 1 or list_file or sidecar or output):
        raise click.UsageError("'-' (an image on stdin) goes alone, with its result on stdout (text or --format jsonl)")
    if (endpoints or ray_address is not None) and (from_stdin or (endpoints and ray_address is not None)):
        raise click.UsageError("--endpoint and --ray take files, folders or lists, and not both at once")
    from ..batch import OutputOptions, caption_field_taken
    from ..clips import sniff
    from ..engine import Captioner  # imported here so that --help stays instant
    from ..hub import download_model
    from ..libtiff import capture_libtiff_messages
    from ..prompts import DEFAULT_PROMPT

    capture_libtiff_messages()  # libtiff prints from C; its lines become log records
    stdin_image = _read_stdin() if from_stdin else b""  # before any download: an endless stream is refused now
    engine = {k: options.pop(k) for k in ENGINE_NAMES}
    # Inputs first: a mistyped path must not wait for a 3 GB download to be noticed.
    items = [] if from_stdin else _inputs(images, recursive=recursive, list_file=list_file, shard=shard, null=null)
    try:
        outputs = OutputOptions(format=fmt, path=output, sidecar=sidecar,  # type: ignore[arg-type]
                                sidecar_ext=sidecar_ext, overwrite=overwrite, caption_field=caption_field)
    except CaprlError as exc:
        raise click.BadParameter(str(exc), param_hint="'--caption-field'") from exc
    taken = caption_field_taken(items, outputs)
    if taken is not None:  # before any download: the list's own field would be lost to the new caption
        raise click.UsageError(f"{'<stdin>' if list_file == '-' else taken.source or taken.path}: its records have a "
                               f"\"{caption_field}\" field already, which the list keeps; put the new caption in "
                               "another field with --caption-field NAME")
    show = sys.stderr.isatty() if progress is None else progress
    batch = _Batch(items, outputs, parallel=parallel, show=show, quiet=progress is False)
    if endpoints or ray_address is not None:  # the captions are made elsewhere
        remote: EndpointCaptioner | RayCaptioner
        if endpoints:
            remote = _endpoints(endpoints, endpoint_model, endpoint_concurrency, api_key, timeout_s=endpoint_timeout,
                                outage_s=endpoint_outage, image_max_tokens=engine["image_max_tokens"],
                                video_fps=engine["video_fps"], video_max_frames=engine["video_max_frames"])
        else:
            fetch = {"mmproj": mmproj_path, "quant": quant, "imatrix": imatrix, "mmproj_quant": mmproj_quant,
                     "cache_dir": cache_dir, "offline": offline}
            remote = _ray(model, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, parallel=parallel,
                          **{k: v for k, v in {**fetch, **engine}.items() if v is not None and v is not False})
        with console.GracefulInterrupt() as interrupt:
            summary = batch.run(lambda n: interrupt.watch(remote), generation.resolved(DEFAULT_PROMPT),
                                model=remote.model, quant=quant, video_prompt=video_prompt)
        return _ended(summary)
    if not offline and not model.lower().endswith(".gguf"):  # at once: a stalled network is never a silent wait
        console.status(f"Looking for {model} (the cache, then the Hub) ...")
    files = download_model(model, mmproj=mmproj_path, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                           cache_dir=cache_dir, offline=offline, progress=console.DownloadBar())
    warn_unused(files.name, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant)
    image_generation = generation.resolved(files.prompt or DEFAULT_PROMPT)
    single = from_stdin or (len(images) == 1 and [i.path for i in items] == list(images))  # a file, not a folder
    video = sniff(stdin_image[:16]) if from_stdin else single and items[0].media == "video"
    one = dataclasses.replace(image_generation, prompt=video_prompt) if video and video_prompt else image_generation

    with console.GracefulInterrupt() as interrupt:
        def load(in_flight: Parallel, announce: bool = False) -> Captioner:
            console.status(f"Loading {files.model.name} ...")
            captioner = Captioner(files.model, files.mmproj, parallel=in_flight, cache_dir=cache_dir, **engine)
            console.status("")
            if announce:
                console.loaded(captioner, images=None if single else len(items), videos=sum(i.media == "video" for i in items))
            return interrupt.watch(captioner)

        if single and fmt == "text" and not (output or sidecar or list_file):
            with load(1, announce=engine["verbose"] or sys.stderr.isatty()) as cap:
                _caption_one(cap, stdin_image if from_stdin else images[0], one, engine["verbose"], video=video)
            return
        if from_stdin:  # one JSONL record, as a batch writes it
            with load(1, announce=engine["verbose"]) as cap:
                failed = _caption_stdin(cap, stdin_image, one, caption_field, model=files.name or files.model.name,
                                        quant=files.quant, video=video)
            if failed:
                raise SystemExit(EXIT_FAILURE)
            return
        summary = batch.run(lambda n: load(n, announce=show or engine["verbose"]), image_generation,
                            model=files.name or files.model.name, quant=files.quant, video_prompt=video_prompt)
    _ended(summary)


def _generation(prompt: str | None, preset: str | None, options: dict[str, Any]) -> GenerationOptions:
    """The caption options of the command line as one value (the engine's stay in `options`)."""
    given = {k: options.pop(k) for k in GenerationKwargs.__optional_keys__ & options.keys()}
    try:
        return GenerationOptions(prompt=prompt, preset=preset, **given)
    except CaprlError as exc:
        raise click.UsageError(str(exc)) from exc


def _inputs(images: tuple[str, ...], *, recursive: bool, list_file: str | None,
            shard: tuple[int, int] | None, null: bool = False) -> list[BatchItem]:
    from ..inputs import gather_inputs

    found = gather_inputs(images, recursive=recursive, list_file=list_file, stdin=sys.stdin, shard=shard, null=null)
    if not images and not found.listed:  # an empty shard of a list is no error
        raise CaprlError(f"{list_file}: the list names no images (nor videos)")
    return found.items


class _Batch:
    """A batch run as the command shows it: the plan, a progress display, the captioner loaded only if
    there is work (as many captions in flight as asked, never more than there are inputs)."""

    def __init__(self, items: list[BatchItem], outputs: OutputOptions, *, parallel: Parallel, show: bool,
                 quiet: bool) -> None:
        self.items, self.outputs, self.parallel, self.show, self.quiet = items, outputs, parallel, show, quiet

    def run(self, load: Callable[[Parallel], Captioning], generation: GenerationOptions, *, model: str,
            quant: str | None, video_prompt: str | None = None) -> BatchSummary | None:
        from ..batch import plan_batch, run_batch

        summary = None
        with plan_batch(self.items, outputs=self.outputs, stream=console.results_stream(progress=self.show),
                        generation=generation, model=model, quant=quant, video_prompt=video_prompt) as plan:
            progress = console.BatchProgress(len(plan.items), plan.skipped, show=self.show, quiet=self.quiet,
                                             videos=plan.videos, order=plan.todo)
            if plan.todo:
                with load(plan.width(self.parallel)) as captioner:
                    progress.watch(captioner)
                    summary = run_batch(captioner, plan, sink=progress)
        progress.finish(summary)
        return summary


def _ended(summary: BatchSummary | None) -> None:
    if summary is not None and summary.interrupted:
        raise SystemExit(EXIT_INTERRUPTED)  # the summary said so already
    if summary is not None and summary.failed:
        raise SystemExit(EXIT_FAILURE)


def _ray(model: str, address: str | None, actors: int, cpus: float | None, gpus: float,
         **options: Unpack[PretrainedKwargs]) -> RayCaptioner:
    try:
        from ..ray import RayCaptioner
    except ImportError as exc:
        raise CaprlError(f"--ray needs its extra ({exc.name} is missing): pip install '.[ray]' in a caprl-local checkout, "
                         "or 'caprl-local[ray]' once caprl-local is on your package index") from exc
    captioner = RayCaptioner(model, address=address or None, actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus,
                             **options)
    console.say(f"Captioning on Ray ({address or 'this machine'}): {actors} actor{'s' * (actors > 1)} of "
                f"{captioner.threads} CPU{'s' * (captioner.threads > 1)}" + (f" and {gpus} GPU" if gpus else ""))
    return captioner


def _endpoints(urls: tuple[str, ...], model: str | None, concurrency: int | None, key: str | None, *,
               timeout_s: float | None, outage_s: float, image_max_tokens: int | None, video_fps: float,
               video_max_frames: int) -> EndpointCaptioner:
    from ..endpoints import Endpoint, EndpointCaptioner

    captioner = EndpointCaptioner((Endpoint(url, model=model, api_key=key, concurrency=concurrency) for url in urls),
                                  timeout_s=timeout_s, outage_s=outage_s, image_max_tokens=image_max_tokens,
                                  video_fps=video_fps, video_max_frames=video_max_frames)
    console.say(f"Captioning on {len(urls)} endpoint{'s' * (len(urls) > 1)} ({captioner.model}), "  # the servers' names
                f"{captioner.parallel} requests at once in all")
    return captioner


def _check_output_is_not_an_input(output: str | None, list_file: str | None) -> None:
    """Results written into the list being read would replace the dataset with its captions: refused
    before any download (the outputs refuse it too, for the library's callers)."""
    from ..outputs import same_file

    if output and list_file and list_file != "-" and same_file(output, list_file):
        raise click.UsageError(f"--output {output} is the --from-list file itself; write the results to another file "
                               "(each result keeps the list's fields)")


def _caption_stdin(cap: Captioner, image: bytes, generation: GenerationOptions, caption_field: str, *, model: str,
                   quant: str | None, video: bool = False) -> bool:
    """The image (or video) on stdin as one JSONL record on stdout, its path "<stdin>"; True when it failed."""
    from ..batch import BatchPlan, result_record
    from ..inputs import BatchItem
    from ..outputs import JsonlOutput
    from ..results import CaptionFailure

    item = BatchItem("<stdin>")
    plan = BatchPlan([item], [], generation, model=model, quant=quant, caption_field=caption_field)
    result = next(iter(cap.caption_many([image], generation=generation)))
    record = result_record(item, result, plan)
    if video and "media" not in record:  # "<stdin>" has no suffix to tell it by
        record["media"] = "video"
    JsonlOutput(None, stream=console.results_stream(progress=False)).write(item, record)
    if isinstance(result, CaptionFailure):
        console.say(f"Error: {result.error}")
    return isinstance(result, CaptionFailure)


def _read_stdin() -> bytes:
    """The image or video on stdin, within an image's bound (a video's, for bytes that open like one)."""
    from ..clips import MAX_VIDEO_BYTES, sniff
    from ..errors import ImageError
    from ..images import MAX_STREAM_BYTES, read_bounded

    if sys.stdin is None or sys.stdin.isatty():
        raise click.UsageError("'-' reads an image from stdin: pipe or redirect one in (caprl-local caption - < photo.jpg)")
    stream = sys.stdin.buffer
    head = stream.read(16)

    class _Peeked:  # the stream with its first bytes back in front, for read_bounded's one read
        def read(self, size: int) -> bytes:
            return head + stream.read(size - len(head))

    bound = MAX_VIDEO_BYTES if sniff(head) else MAX_STREAM_BYTES
    data = read_bounded(_Peeked(), "<stdin>", what="stdin", limit=bound)  # type: ignore[arg-type]
    if not data:
        raise ImageError("<stdin>: no image data (stdin was empty); pipe or redirect an image file in")
    return data


def _caption_one(cap: Captioner, image: str | bytes, generation: GenerationOptions, verbose: bool, *,
                 video: bool = False) -> None:
    on_text = console.Streamer()  # to a terminal or a pipe: each piece as it is generated
    with console.CaptionStages(cap, on_text, media="video" if video else "image"):  # reading, encoding, generating
        result = cap.caption(image, on_text=on_text, generation=generation)
    click.echo("")
    on_text.ended(result)  # a caption the loop guard cut back is shorter than the text streamed: said on stderr
    if verbose:
        t = result.timings
        click.echo(
            f"{result.image_tokens} image tokens, {result.prompt_tokens} prompt tokens, "
            f"{result.generated_tokens} generated; encode {t.image_encode_s:.2f}s, "
            f"prompt {t.prompt_tokens_per_s:.1f} tok/s, generation {t.generation_tokens_per_s:.1f} tok/s",
            err=True,
        )
    if verbose and result.video is not None:
        v = result.video
        click.echo(f"{v.frames} frames of the {v.duration_s:.2f} s video at {v.fps:g} fps, {v.width}x{v.height}, "
                   f"{v.tokens} video tokens" + (" (the clip ended early)" if v.truncated else ""), err=True)
