"""An application type-checking its use of caprl-local sees the library's types (PEP 561)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ROOT


def test_the_package_ships_its_types() -> None:
    assert (ROOT / "caprl_local" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()  # in the wheel's package data


def test_an_applications_type_checker_sees_the_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api")
    app = tmp_path / "app.py"
    app.write_text(
        "from caprl_local import Captioner, CaptionFailure\n"
        "with Captioner('m.gguf', 'p.gguf') as cap:\n"
        "    n: int = cap.caption('x.jpg').text\n"
        "    for r in cap.caption_many(['a.jpg']):\n"
        "        r.text\n"
    )
    (tmp_path / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # as an installed package would be found
    out, err, code = api.run([str(app), "--config-file", str(tmp_path / "mypy.ini"), "--no-incremental",
                              "--cache-dir", os.devnull])
    assert code == 1, out + err
    assert 'expression has type "str", variable has type "int"' in out  # caption() is typed, through __init__
    assert 'Item "CaptionFailure" of "Caption | CaptionFailure" has no attribute "text"' in out  # caption_many() too


MISSPELT = {  # line of the application file: the misspelt option there
    2: "paralel", 3: "quantt", 4: "max_tokns", 5: "temprature", 6: "sed", 7: "ignore_eoss", 8: "gpu_layer",
    10: "max_token", 11: "actor", 12: "treads", 13: "max_tokns",
}

BAD = """from caprl_local import Captioner
cap = Captioner("m.gguf", "p.gguf", paralel=4)
Captioner.from_pretrained("caprl-3b", quantt="Q4_K_M")
cap.caption("x.jpg", max_tokns=5)
cap.stream("x.jpg", temprature=0.5)
cap.submit("x.jpg", sed=1)
cap.caption_many(["a.jpg"], ignore_eoss=True)
Captioner.from_pretrained("caprl-3b", gpu_layer=0)
cap.caption("x.jpg", max_tokens="5")
GenerationOptions(max_token=5)
RayCaptioner("caprl-3b", actor=2)
RayCaptioner("caprl-3b", treads=2)
caption_dataset(None, max_tokns=5)
"""
BAD_IMPORTS = "from caprl_local.options import GenerationOptions\nfrom caprl_local.ray import RayCaptioner, caption_dataset\n"

GOOD = """from caprl_local import Captioner
from caprl_local.captioning import Captioning
from caprl_local.endpoints import Endpoint, EndpointCaptioner
from caprl_local.ray import RayCaptioner

cap = Captioner("m.gguf", "p.gguf", prompt="Describe.", cache_dir="cache", gpu_layers="auto", threads=1, n_ctx=4096,
                parallel=2, flash_attn=None, image_min_tokens=None, image_max_tokens=1024, repack=None, warmup=True,
                verbose=False, isolate=True)
other = Captioner.from_pretrained("caprl-3b", mmproj=None, quant="Q4_K_M", imatrix=False, mmproj_quant=None,
                                  cache_dir=None, offline=False, progress=None, token=None, verify=False, prompt=None,
                                  gpu_layers=0, threads=None, n_ctx=2048, parallel="auto", flash_attn=True,
                                  image_min_tokens=64, image_max_tokens=None, repack=False, warmup=False, verbose=True,
                                  isolate=False)
text: str = cap.caption("x.jpg", on_text=print, prompt="Describe.", max_tokens=5, temperature=0.5, top_p=0.9, seed=1,
                        repeat_penalty=1.1, stop=("END",), loop_guard=False, ignore_eos=True).text
cap.caption("x.jpg", preset="short")
cap.stream("x.jpg", max_tokens=5, preset="short").close()
cap.submit("x.jpg", seed=None, stop=()).result()
for r in cap.caption_many(["a.jpg"], on_text=lambda image, piece: None, progress=lambda done, total: None, prefetch=2,
                          prompt=None, preset=None, max_tokens=5, temperature=0.0, top_p=1.0, seed=2,
                          repeat_penalty=1.0, stop=("a", "b"), loop_guard=True, ignore_eos=False):
    r.image
each: list[Captioning] = [cap, EndpointCaptioner([Endpoint("http://127.0.0.1:9/v1", model="m", concurrency=1)]),
                          RayCaptioner("caprl-3b")]
with other as entered:
    entered.caption("x.jpg")
one = GenerationOptions(prompt="Describe.", max_tokens=5, stop=("END",))
cap.caption("x.jpg", generation=one)
cap.stream("x.jpg", generation=one).close()
cap.submit("x.jpg", generation=one).result()
for r in cap.caption_many(["a.jpg"], generation=one):
    r.index
caption_dataset(None, model="caprl-3b", actors=2, cpus_per_actor=1.0, gpus_per_actor=0, batch_size=4, generation=one,
                quant="Q4_K_M", threads=2, prompt="Describe.")
caption_dataset(None, max_tokens=5, temperature=0.5, cache_dir="cache", gpu_layers=0)
""".replace("from caprl_local.ray import RayCaptioner\n",
            "from caprl_local.options import GenerationOptions\nfrom caprl_local.ray import RayCaptioner, caption_dataset\n")


def test_a_misspelt_option_is_a_type_error_and_every_option_type_checks(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api")
    (tmp_path / "bad.py").write_text(BAD + BAD_IMPORTS)  # the imports last: the lines above keep their numbers
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # as an installed package would be found
    out, err, code = api.run(["bad.py", "good.py", "--config-file", "mypy.ini", "--no-incremental",
                              "--cache-dir", os.devnull])
    assert code == 1, out + err
    assert [line for line in out.splitlines() if line.startswith("good.py")] == []
    for line, name in MISSPELT.items():
        assert f'bad.py:{line}: error: Unexpected keyword argument "{name}"' in out, out
    assert 'bad.py:9: error: Argument "max_tokens" to "caption" of "Captioner" has incompatible type "str"' in out, out
