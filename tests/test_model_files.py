"""Wrong, damaged or mismatched model files: a typed error naming the file, never a crash."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest
from helpers import load_script

from caprl_local import Captioner, EngineError, ModelFileError
from caprl_local.ggufmeta import _TYPE_SIZES, read_gguf

tiny = load_script("make_tiny_model")


def _error(model: Path, mmproj: Path) -> str:
    with pytest.raises((ModelFileError, EngineError)) as info:
        Captioner(model, mmproj, threads=1)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_mmproj(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = tiny_model
    message = _error(model, tmp_path / "CapRL-3B.mmproj-f16.gguf")
    assert "projector" in message and "no such file" in message and "CapRL-3B.mmproj-f16.gguf" in message


def test_text_model_passed_as_mmproj(tiny_model: tuple[Path, Path]) -> None:
    model, _ = tiny_model
    message = _error(model, model)
    assert f"projector {model}: is a text model" in message and "give the *mmproj*.gguf file as the projector" in message


def test_mmproj_passed_as_model(tiny_model: tuple[Path, Path]) -> None:
    _, mmproj = tiny_model
    assert f"model {mmproj}: is a vision projector" in _error(mmproj, mmproj)


@pytest.mark.parametrize("keep", [300, 100_000])
def test_truncated_gguf(tiny_model: tuple[Path, Path], tmp_path: Path, keep: int) -> None:
    model, mmproj = tiny_model
    cut = tmp_path / "CapRL-3B.f16.gguf"
    cut.write_bytes(model.read_bytes()[:keep])
    assert f"model {cut}: file is truncated" in _error(cut, mmproj)
    cut_proj = tmp_path / "CapRL-3B.mmproj-f16.gguf"
    cut_proj.write_bytes(mmproj.read_bytes()[:keep])
    assert f"projector {cut_proj}: file is truncated" in _error(model, cut_proj)


def test_mmproj_of_another_size(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = tiny_model
    _, other = tiny.write_tiny_pair(tmp_path, projection_dim=48)
    message = _error(model, other)
    assert f"projector {other}" in message and "48-wide" in message and "expects 64" in message


def test_not_a_gguf_and_empty_and_directory(tiny_model: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    model, mmproj = tiny_model
    assert "not a GGUF file" in _error(images / "photo.jpg", mmproj)
    empty = tmp_path / "empty.gguf"
    empty.touch()
    assert "file is empty" in _error(model, empty)
    assert "is a directory" in _error(tmp_path, mmproj)


def test_unsupported_architecture(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    _, mmproj = tiny_model
    other = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_embedding_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "architecture 'llama' is not supported" in _error(other, mmproj)


def test_projector_missing_a_tensor_llama_cpp_would_crash_on(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = tiny_model
    _, broken = tiny.write_tiny_pair(tmp_path, drop=frozenset({"v.blk.1.attn_q.weight"}))
    assert "tensor v.blk.1.attn_q.weight is missing" in _error(model, broken)


def test_text_model_missing_a_tensor_reports_llama_cpp_reason(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    _, mmproj = tiny_model
    broken, _ = tiny.write_tiny_pair(tmp_path, drop=frozenset({"output_norm.weight"}))
    message = _error(broken, mmproj)
    assert f"model {broken}: llama.cpp could not load it" in message and "output_norm.weight" in message


def test_the_files_are_format_true(tiny_model: tuple[Path, Path]) -> None:
    model, mmproj = tiny_model
    text, proj = read_gguf(model), read_gguf(mmproj)
    assert text.architecture == "qwen2vl" and proj.architecture == "clip"
    assert text.metadata["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    assert text.metadata["tokenizer.ggml.model"] == "gpt2" and text.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text.metadata["tokenizer.chat_template"]
    assert "output.weight" not in text.tensors  # tied embeddings, as in Qwen2.5-VL-3B
    assert proj.metadata["clip.projector_type"] == "qwen2.5vl_merger"
    assert proj.metadata["clip.vision.n_wa_pattern"] > 0 and proj.metadata["clip.use_silu"] is True
    assert {"mm.0.weight", "mm.2.weight", "v.post_ln.weight", "v.blk.0.ffn_gate.weight"} <= proj.tensors.keys()
    assert model.stat().st_size + mmproj.stat().st_size < 1_000_000
    reader = gguf.GGUFReader(model)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert {"<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"} <= set(tokens)


def test_type_size_table_matches_ggml() -> None:
    for qtype, sizes in gguf.GGML_QUANT_SIZES.items():
        if int(qtype) in _TYPE_SIZES:
            assert _TYPE_SIZES[int(qtype)] == sizes, qtype.name


def test_copy_of_a_good_pair_loads(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    # Sanity check for the tests above: the same bytes under other names are fine.
    model, mmproj = (Path(shutil.copy(p, tmp_path)) for p in tiny_model)
    with Captioner(model, mmproj, threads=1) as cap:
        assert cap.architecture == "qwen2vl"


def test_a_q8_0_projector_loads(tmp_path: Path, images: Path) -> None:
    model, mmproj = tiny.write_tiny_pair(tmp_path, mmproj_type="Q8_0")
    assert mmproj.name == "CapRL-3B.mmproj-Q8_0.gguf" and read_gguf(mmproj).metadata["general.file_type"] == 7
    with Captioner(model, mmproj, threads=1) as cap:
        assert cap.caption(images / "photo.jpg", max_tokens=4).text


def test_llama_cpp_errors_stay_with_the_thread_that_caused_them() -> None:
    """Two Captioners in one process: one's llama.cpp error never explains the other's failure."""
    import threading

    from caprl_local.engine.backend import LLAMA_LOG

    seen: dict[str, str] = {}
    ready = threading.Barrier(2)

    def work(name: str) -> None:
        LLAMA_LOG.attach(verbose=False)
        ready.wait()
        LLAMA_LOG._on_log(4, f"llama_model_load: error for {name}\n".encode(), None)
        ready.wait()
        seen[name] = LLAMA_LOG.first_error()

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": "error for a", "b": "error for b"}


def _set_u32(src: Path, dst: Path, key: str, value: int) -> Path:
    """A copy of a GGUF with one u32 metadata value overwritten in place (its key, then type 4, then the value)."""
    data = bytearray(src.read_bytes())
    at = data.index(key.encode()) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4, f"{key} is not a u32"
    data[at + 4:at + 8] = value.to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize(("role", "key"), [
    ("projector", "clip.vision.block_count"),  # would have made the check list 2^31 x 9 tensor names
    ("projector", "clip.vision.embedding_length"),
    ("model", "qwen2vl.block_count"),
])
def test_header_numbers_are_bounded_before_use(tiny_model: tuple[Path, Path], tmp_path: Path, role: str,
                                               key: str) -> None:
    model, mmproj = tiny_model
    for value in (2**31 - 1, 0):
        if role == "projector":
            message = _error(model, _set_u32(mmproj, tmp_path / "p.mmproj-f16.gguf", key, value))
        else:
            message = _error(_set_u32(model, tmp_path / "m.f16.gguf", key, value), mmproj)
        assert f"{key} is {value}, not a number from 1 to" in message


def test_a_header_cut_anywhere_reads_as_truncated(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = tiny_model
    data = model.read_bytes()
    cut = tmp_path / "cut.gguf"
    for keep in (6, 13, 24, 57, 301, 777, 4_097, 20_011, 60_013):  # inside numbers, strings and arrays
        cut.write_bytes(data[:keep])
        with pytest.raises(ModelFileError, match="file is truncated"):
            read_gguf(cut)


def test_alignment_must_be_a_power_of_two(tmp_path: Path) -> None:
    for value in ([32], 48, 0):
        path = tmp_path / "aligned.gguf"
        w = gguf.GGUFWriter(str(path), "qwen2vl")
        w.add_key_value("general.alignment", value, gguf.GGUFValueType.ARRAY if isinstance(value, list)
                        else gguf.GGUFValueType.UINT32, sub_type=gguf.GGUFValueType.UINT32 if isinstance(value, list) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ModelFileError, match=r"general.alignment is .*, not a power of two"):
            read_gguf(path)


def test_a_key_of_a_type_llama_cpp_asserts_on_is_refused(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    """A u32 stored as i32 (another converter could write that) would abort llama.cpp's projector loader."""
    model, mmproj = tiny_model
    for key, new_type, words in (("clip.vision.block_count", 5, "stored as i32, but llama.cpp reads it as u32"),
                                 ("clip.vision.attention.layer_norm_epsilon", 4, "stored as u32, but llama.cpp reads it as f32"),
                                 ("clip.use_silu", 0, "stored as u8, but llama.cpp reads it as bool")):
        data = bytearray(mmproj.read_bytes())
        at = data.index(key.encode()) + len(key)
        data[at:at + 4] = new_type.to_bytes(4, "little")  # the same size: still a valid file
        bad = tmp_path / "typed.mmproj-f16.gguf"
        bad.write_bytes(bytes(data))
        assert f"projector {bad}: key {key} is {words}" in _error(model, bad)


def test_a_zero_dimensional_bias_is_refused(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, mmproj = tiny_model
    data = bytearray(mmproj.read_bytes())
    at = data.index(b"mm.2.bias") + len("mm.2.bias")  # then n_dims (u32) and its one dimension (u64)
    assert int.from_bytes(data[at:at + 4], "little") == 1
    data[at:at + 12] = (0).to_bytes(4, "little")  # no dimensions: the tensor table shrinks by 8 bytes
    bad = tmp_path / "scalar.mmproj-f16.gguf"
    bad.write_bytes(bytes(data))
    assert "tensor mm.2.bias has shape [], not a vector" in _error(model, bad)


def test_a_file_llama_cpp_aborts_on_is_an_error_not_a_crash(tiny_model: tuple[Path, Path], tmp_path: Path,
                                                            images: Path) -> None:
    """clip.vision.n_wa_pattern = 1 passes every header check, but llama.cpp's window attention then
    wants a tensor the file lacks and aborts the process: the first load happens in a child process."""
    import json
    import os

    from helpers import run_cli

    model, mmproj = tiny_model
    bad = _set_u32(mmproj, tmp_path / "window.mmproj-f16.gguf", "clip.vision.n_wa_pattern", 1)
    message = _error(model, bad)
    assert f"projector {bad}: llama.cpp aborts on this pair (clip.cpp:" in message
    verdicts = json.loads((Path(os.environ["CAPRL_LOCAL_HOME"]) / "loaded-pairs.json").read_text())
    assert [v for k, v in verdicts.items() if str(bad.resolve()) in k][0].startswith("aborted")
    assert _error(model, bad) == message  # the verdict is remembered: no second child
    result = run_cli("caption", str(images / "photo.jpg"), "--model", str(model), "--mmproj", str(bad))
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "llama.cpp aborts on this pair" in result.stderr


def test_a_good_pair_is_checked_once(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    import json
    import os

    model, mmproj = (shutil.copy(p, tmp_path / p.name) for p in tiny_model)
    store = Path(os.environ["CAPRL_LOCAL_HOME"]) / "loaded-pairs.json"
    with Captioner(model, mmproj, threads=1):
        pass
    verdicts = json.loads(store.read_text())
    assert [v for k, v in verdicts.items() if str(Path(model).resolve()) in k] == ["ok"]
