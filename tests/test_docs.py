"""The commands of README.md and docs/*.md run as written.

Every shell line of their code blocks (and each ``$ command`` of a transcript), every Python block
and the TOML block is run here, in a scratch folder holding the images the commands name, on the
tiny model: a ``caprl-local caption`` without ``-m`` gets the tiny pair's ``-m ... --mmproj ...``,
every caption gets ``-n 4 -t 1``, ``/tmp/`` is a folder of the test's own, the Hub is the local
stand-in (tests/fake_hub.py) holding the tiny pair under CapRL-3B's names, and ``127.0.0.1:8080``
is a ``caprl-local serve`` of the tiny model started here. Nothing else is rewritten.

What cannot run here is named below with the reason: ``SKIP`` (downloads from the package index,
builds, GPUs, clusters, other hosts) and ``HELP`` (long runs, or servers that run until stopped),
whose commands are checked against their program's ``--help``: each option they use must exist
there, and an option's value must be one of its choices where the help lists them. A rule that
matches no command fails too, so the lists stay true.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_hub import FakeHub
from helpers import HANG_S, ROOT, start_server

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Commands that need what this machine may not have, or may not do: (pattern, reason).
SKIP: list[tuple[str, str]] = [
    (r"^(CMAKE_ARGS=\S+ )?pip install\b", "installs from the package index, building llama-cpp-python (10+ minutes)"),
    (r"^\.ci/run\b", "the whole CI: a fresh .venv, llama-cpp-python built from source, every test"),
    (r"^(ruff check \. && mypy|python -m pytest)$", ".ci/run's own lint, type and test steps (this test is one of them)"),
    (r"^scripts/build_mtmd_cli\.sh\b", "builds llama.cpp's own tools from source (a long build)"),
    (r"^llama-server\b", "llama.cpp's server, built by scripts/build_mtmd_cli.sh (tests/test_endpoints.py runs it)"),
    (r"^(vllm serve|python -m sglang)\b", "GPU servers (vLLM, SGLang)"),
    (r"^ray start\b", "starts a Ray head node that listens on the network"),
    (r"/mnt/data/", "a 2M-line list on a shared disk, run I of 1000 (the same command on a local list runs above)"),
    (r"s3://", "reads and writes S3 from a Ray cluster (its imports are run)"),
    (r"^cmake --build\b", "builds one more of llama.cpp's tools (a long build)"),
    (r"^(LLAMA|REPO)=", "names a folder or a Hub repo for the conversion commands below it"),
    (r"^python -m venv /tmp/convert-venv$", "the converter's own environment (PyTorch and pinned packages)"),
    (r"/pip install -r\b", "installs the converter's packages from the package index (PyTorch: GBs)"),
    (r"\bhf download\b", "downloads the CapRL-Video-4B checkpoint (9 GB) from the Hub"),
    (r"convert_hf_to_gguf\.py\b", "converts the CapRL-Video-4B checkpoint (needs it and PyTorch)"),
    (r"llama-quantize\b", "quantizes the converted CapRL-Video-4B (needs the conversion above)"),
]

#: Commands that would run long or until stopped, or need other hosts: checked against --help.
HELP: list[tuple[str, str]] = [
    (r"--endpoint http://(?!127\.0\.0\.1)", "captions on the servers it names (gpu1, gpu2, cpu1)"),
    (r"--ray\b", "Ray: starts an instance or joins a cluster (tests/test_ray.py runs it)"),
    (r"^caprl-local serve\b", "a server that runs until stopped (the requests below go to one started here)"),
    (r"make_tiny_model\.py \S+ --shape caprl-", "writes a full-sized (GB) random-weight model"),
    (r"scripts/bench(_serve|_scale|_video)?\.py\b", "a benchmark: minutes, and llama.cpp's own tools"),
    (r"-m CapRL-Video-4B-Q4_K_M\.gguf", "captions with the converted CapRL-Video-4B (above: a 9 GB download)"),
    (r"scripts/bench_plots\.py\b", "redraws docs/plots from the benchmarks' results"),
    (r"scripts/fuzz_models\.py\b", "thousands of damaged models (tests/test_fuzz.py runs 300)"),
]

TINY_CAPTION = ["-n", "4", "-t", "1"]
DOC_PORT = "127.0.0.1:8080"


@dataclass(frozen=True)
class Block:
    doc: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    text: str


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lang, start, lines = None, 0, []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                if lang is None:
                    lang, start, lines = line[3:].strip(), number, []
                else:
                    found.append(Block(path.relative_to(ROOT).as_posix(), start, lang, "\n".join(lines) + "\n"))
                    lang = None
            elif lang is not None:
                lines.append(line)
    return found


def commands(block: Block) -> list[str]:
    """The shell commands of a block: lines joined across a trailing backslash or an open quote;
    comment lines dropped. A block without a language is a transcript: its ``$ `` lines."""
    if block.lang in ("", "text", "console"):
        return [line[2:].strip() for line in block.text.splitlines() if line.startswith("$ ")]
    if block.lang not in ("sh", "bash", "shell"):
        return []
    found, pending = [], ""
    for line in block.text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        found.append(pending.strip())
        pending = ""
    assert not pending, f"{block.doc}:{block.line}: unterminated command {pending!r}"
    return found


def bare(command: str) -> str:
    """The command's words without its comment, for matching the rules."""
    try:
        return " ".join(shlex.split(command, comments=True))
    except ValueError:  # Python source
        return command


def rule(command: str, rules: list[tuple[str, str]]) -> tuple[str, str] | None:
    return next(((pattern, reason) for pattern, reason in rules if re.search(pattern, bare(command))), None)


BLOCKS = [b for b in blocks() if commands(b) or b.lang in ("python", "toml")]


# --- the scratch folder, the stand-in Hub, the server -----------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """The folder the commands run in, holding what they name (photo.jpg, photos/, shots/*.png,
    dataset.jsonl ...) and scripts/ (a link to the repository's)."""
    from PIL import Image

    work = tmp_path_factory.mktemp("docs")
    (work / "tmp").mkdir()
    (work / "scripts").symlink_to(ROOT / "scripts")
    for name in ("photo.jpg", "a.jpg", "b.jpg", "c.jpg", "d.jpg", "photos/photo.jpg"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / "photo.jpg", work / name)
    for name in ("chart.png", "photos/sub/alpha.png", "shots/one.png"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / "alpha.png", work / name)
    (work / "webp").mkdir()
    Image.open(images / "photo.jpg").save(work / "webp" / "photo.webp")
    (work / "dataset.jsonl").write_text(json.dumps({"image": "photo.jpg", "id": 1}) + "\n")
    (work / "all.txt").write_text("".join(f"{name}\n" for name in ("photo.jpg", "a.jpg", "b.jpg", "c.jpg", "d.jpg")))
    return work


@pytest.fixture(scope="module")
def hub(tiny_model: tuple[Path, Path]) -> Iterator[FakeHub]:
    """The Hub the commands see: CapRL-3B's repo, with the tiny pair under its file names."""
    model, mmproj = tiny_model
    server = FakeHub()
    for name in ("CapRL-3B.Q4_K_M.gguf", "CapRL-3B.Q8_0.gguf"):
        server.add("mradermacher/CapRL-3B-GGUF", name, model)
    for name in ("CapRL-3B.mmproj-f16.gguf", "CapRL-3B.mmproj-Q8_0.gguf"):
        server.add("mradermacher/CapRL-3B-GGUF", name, mmproj)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(work: Path, hub: FakeHub) -> dict[str, str]:
    """The commands' environment: this venv's programs first, a cache and config of their own, the local Hub."""
    home = work.parent / f"{work.name}-home"
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"), "CAPRL_LOCAL_HOME": str(home / "cache"),
            "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "xdg-cache"),
            "KEY": "doc-key", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def doc_server(tiny_model: tuple[Path, Path]) -> Iterator[str]:
    """`caprl-local serve` on the tiny model: the host:port that stands for the docs' 127.0.0.1:8080."""
    proc, url = start_server(tiny_model)
    yield url.removeprefix("http://").split("/")[0]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=HANG_S)


# --- running ------------------------------------------------------------------------------------


def rewritten(command: str, work: Path, tiny_model: tuple[Path, Path]) -> str:
    """The command with the tiny model and this test's folders in place of the real ones."""
    command = command.replace("/tmp/", f"{work}/tmp/")

    def caption(match: re.Match[str]) -> str:
        rest = shlex.split(command[match.end():].split("|")[0], comments=True)
        model = [] if {"-m", "--model"} & set(rest) else ["-m", str(tiny_model[0]), "--mmproj", str(tiny_model[1])]
        return " ".join(["caprl-local caption", *map(shlex.quote, model), *TINY_CAPTION])

    return re.sub(r"\bcaprl-local caption\b", caption, command)


def run(command: str, *, cwd: Path, env: dict[str, str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", "-c", f"set -eo pipefail\n{command}"], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=HANG_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{what}: `{command}` exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@functools.cache
def help_text(program: str, cwd: Path, env_items: tuple[tuple[str, str], ...]) -> str:
    return run(f"{program} --help", cwd=cwd, env=dict(env_items), what="--help").stdout


def program_of(tokens: list[str]) -> list[str]:
    """The part of a command that names the program: `caprl-local SUB`, `python scripts/x.py`, `scripts/x.py`."""
    if tokens[0] == "caprl-local":
        return tokens[:2]
    if tokens[0] in ("python", "python3"):
        return tokens[:2]
    return tokens[:1]


def check_against_help(command: str, *, work: Path, env: dict[str, str], what: str) -> None:
    tokens = [t for t in shlex.split(command, comments=True) if t != "..."]
    program = program_of(tokens)
    if program[-1].endswith("bench_plots.py"):
        pytest.importorskip("matplotlib", reason="scripts/bench_plots.py needs the bench extra (matplotlib)")
    text = help_text(" ".join(program), work, tuple(sorted(env.items())))
    args = tokens[len(program):]
    for i, token in enumerate(args):
        if not token.startswith("-") or token == "-":
            continue
        option, _, value = token.partition("=")
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
            f"{what}: `{command}` uses {option}, which `{' '.join(program)} --help` does not list"
        value = value or (args[i + 1] if i + 1 < len(args) else "")
        choices = re.search(rf"{re.escape(option)}[ =]\{{([^}}]*)\}}|{re.escape(option)} \[([^\]]*\|[^\]]*)\]", text)
        if choices and value and not value.startswith("-"):
            allowed = re.split(r"[,|]", choices.group(1) or choices.group(2))
            assert value in allowed, f"{what}: `{command}`: {option} {value} is not one of {allowed}"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.doc}:{b.line}" for b in BLOCKS])
def test_doc_block_runs_as_written(block: Block, work: Path, env: dict[str, str], tiny_model: tuple[Path, Path],
                                   request: pytest.FixtureRequest) -> None:
    what = f"{block.doc}:{block.line}"
    if block.lang == "python":
        return run_python(block, work, env, request)
    if block.lang == "toml":
        return run_toml(block, work, env)
    skipped = []
    for command in commands(block):
        if skip := rule(command, SKIP):
            skipped.append(f"`{bare(command)[:80]}`: {skip[1]}")
        elif rule(command, HELP):
            check_against_help(command, work=work, env=env, what=what)
        else:
            if DOC_PORT in command:
                command = command.replace(DOC_PORT, request.getfixturevalue("doc_server"))
            result = run(rewritten(command, work, tiny_model), cwd=work, env=env, what=what)
            assert "Error:" not in result.stderr, f"{what}: `{command}`:\n{result.stderr}"
            if command.startswith("curl "):  # curl -s exits 0 on any answer: the answer must be a caption
                assert json.loads(result.stdout)["choices"][0]["message"]["content"], f"{what}: {result.stdout}"
    if skipped and len(skipped) == len(commands(block)):
        pytest.skip("; ".join(skipped))


def earlier_imports(block: Block) -> str:
    """The imports of the document's Python blocks before this one: a later block goes on from them."""
    lines = []
    for other in BLOCKS:
        if other.doc == block.doc and other.lang == "python" and other.line < block.line:
            lines += [line for line in other.text.splitlines() if re.match(r"(from \S+ )?import ", line)]
    return "\n".join(lines) + "\n"


def run_python(block: Block, work: Path, env: dict[str, str], request: pytest.FixtureRequest) -> None:
    what = f"{block.doc}:{block.line}"
    source = earlier_imports(block) + block.text
    compile(source, what, "exec")
    if skip := rule(source, SKIP):
        imports = "\n".join(line for line in block.text.splitlines() if re.match(r"(from \S+ )?import ", line))
        pytest.importorskip("ray")  # the one such block: a Ray pipeline
        run(f"python -c {shlex.quote(imports)}", cwd=work, env=env, what=what)
        pytest.skip(f"{skip[1]}; ran only: {'; '.join(imports.splitlines())}")
    if DOC_PORT in source:
        source = source.replace(DOC_PORT, request.getfixturevalue("doc_server"))
    script = work / f"block-{block.doc.replace('/', '-')}-{block.line}.py"
    script.write_text(source)
    result = run(f"python {shlex.quote(script.name)}", cwd=work, env=env, what=what)
    assert result.stdout.strip() or "print(" not in source, f"{what} printed nothing"


def run_toml(block: Block, work: Path, env: dict[str, str]) -> None:
    """The models.toml example, where `caprl-local models` says a user's own models go."""
    what = f"{block.doc}:{block.line}"
    env = {**env, "XDG_CONFIG_HOME": str(work / "toml-config")}  # the example's defaults stay out of the other blocks
    said = run("caprl-local models --offline", cwd=work, env=env, what=what).stderr
    found = re.search(r"Your own models go in (.+)", said)
    assert found, said
    path = Path(found.group(1).strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.text)
    listed = {item["name"]: item for item in json.loads(run("caprl-local models --offline --json", cwd=work, env=env,
                                                            what=what).stdout)}
    for name, fields in toml_module().loads(block.text).items():
        assert name in listed, f"{what}: {name} is not listed by caprl-local models"
        for key, value in fields.items():
            assert listed[name][key] == value, f"{what}: {name}.{key} is {listed[name][key]!r}, not {value!r}"


def toml_module():  # noqa: ANN201 - tomllib, or its backport on Python 3.10
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


def test_every_rule_still_matches_a_command() -> None:
    every = [c for b in BLOCKS for c in commands(b)] + [b.text for b in BLOCKS if b.lang == "python"]
    for pattern, reason in SKIP + HELP:
        assert any(re.search(pattern, bare(c)) for c in every), f"no command in the docs matches {pattern!r} ({reason})"


def test_the_docs_install_extras_that_exist() -> None:
    """Every `pip install '...[extra]'` names extras of pyproject.toml, from a checkout (`.`): the project is
    on no package index, so a `caprl-local[...]` form goes only beside the checkout's."""
    extras = set(toml_module().loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for spec, names in re.findall(r"'([^' ]*)\[([\w,-]+)\]'", line):
                if spec in (".", "-e .", "caprl-local"):
                    unknown = set(names.split(",")) - extras
                    assert not unknown, f"{path.name}:{number}: no extra {sorted(unknown)} in pyproject.toml"
                if spec == "caprl-local":
                    assert "'.[" in line, f"{path.name}:{number}: 'caprl-local[{names}]' without the checkout's '.[{names}]'"


def test_scripts_the_docs_run_directly_are_executable() -> None:
    for path in sorted((ROOT / "scripts").glob("*.py")):
        text = path.read_text()
        if '__name__ == "__main__"' in text:
            assert text.startswith("#!/usr/bin/env python3\n") and os.access(path, os.X_OK), \
                f"{path.name}: docs run it as scripts/{path.name}: it needs its shebang and chmod +x"


# --- what the commands say to do must be doable too -------------------------------------------


def run_blocked(module: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with `module` not installed (an import of it fails as a missing package's does)."""
    blocker = tmp_path / "blocked" / module
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f"raise ImportError('not installed', name={module!r})\n")
    code = (f"import sys; sys.path.insert(0, {str(blocker.parent)!r}); "
            "from caprl_local.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.parametrize(("module", "extra", "args"), [
    ("starlette", "serve", ["serve", "--port", "0"]),
    ("ray", "ray", ["caption", "photo.jpg", "--ray"]),
])
def test_a_missing_extra_names_an_install_that_works(module: str, extra: str, args: list[str], tiny_model: tuple[Path, Path],
                                                     images: Path, tmp_path: Path) -> None:
    """caprl-local is on no package index: the hint names the checkout's install first."""
    args = [str(images / a) if a == "photo.jpg" else a for a in args]
    result = run_blocked(module, [*args, "-m", str(tiny_model[0]), "--mmproj", str(tiny_model[1])], tmp_path)
    line = result.stderr.strip()
    assert result.returncode == 1 and "\n" not in line, result.stderr
    assert f"{module} is missing" in line and f"pip install '.[{extra}]'" in line, line


def test_pull_names_what_pull_can_do(tmp_path: Path) -> None:
    """A pull with the Hub out of reach and nothing cached: no --offline (pull has none, and there is nothing
    to use offline), but the way left: a model file the user already has. Offline by HF_HUB_OFFLINE: unset it."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "CAPRL_LOCAL_HOME": str(tmp_path / "cache")}
    for extra, words in [({}, ["cannot reach", "-m PATH.gguf"]), ({"HF_HUB_OFFLINE": "1"}, ["HF_HUB_OFFLINE"])]:
        result = subprocess.run([sys.executable, "-m", "caprl_local", "pull", "caprl-3b", "--quant", "Q8_0"],
                                capture_output=True, text=True, timeout=HANG_S, env={**env, **extra})
        line = result.stderr.strip()
        assert result.returncode == 1 and "\n" not in line, result.stderr
        assert "--offline" not in line and "`caprl-local pull" not in line, line
        assert all(word in line for word in words), line
