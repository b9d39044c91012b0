"""Tests for opta_lmx.devmodel: the generated tiny model is deterministic and genuinely loadable."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    from opta_lmx import devmodel
except ImportError:  # running before the package is installed
    sys.path.insert(0, str(ROOT))
    from opta_lmx import devmodel

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tree_digest(directory: pathlib.Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return devmodel.make_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


def test_tiny_is_deterministic_across_processes(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # A second generation in a fresh process (different hash seeds, thread scheduling).
    other = tmp_path / "tiny2"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from opta_lmx.devmodel import make_model;"
            "make_model(sys.argv[2], size='tiny', seed=0)")
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(other)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert tree_digest(tiny) == tree_digest(other)


def test_other_seed_gives_other_weights(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = devmodel.make_model(tmp_path / "seed1", size="tiny", seed=1)
    a, b = tree_digest(tiny), tree_digest(other)
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] != b["tokenizer.json"]
    assert set(a) == set(b)


def test_tiny_size_on_disk(tiny: pathlib.Path) -> None:
    total = sum(p.stat().st_size for p in tiny.iterdir() if p.is_file())
    assert 300_000 <= total <= 3_000_000, total


def test_files_and_config(tiny: pathlib.Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "model.safetensors", devmodel.MARKER_FILE} <= names
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32"
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert cfg["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert tok.token_to_id("<|endoftext|>") == cfg["bos_token_id"] == cfg["pad_token_id"]
    assert tok.token_to_id("<|im_end|>") == cfg["eos_token_id"]
    assert tok.token_to_id("<|im_start|>") is not None
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert cfg["eos_token_id"] in gen["eos_token_id"]
    tok_cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["eos_token"] == "<|im_end|>"

    from safetensors import safe_open

    with safe_open(str(tiny / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (cfg["vocab_size"],
                                                                   cfg["hidden_size"])
    expected = {name for name, _, _ in devmodel.tensor_plan(cfg)}
    assert keys == expected
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    assert ("lm_head.weight" in keys) == (not cfg["tie_word_embeddings"])


def test_loads_and_generates_with_mlx_lm(tiny: pathlib.Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=5)
    assert isinstance(text, str)
    assert text.isascii() and "\ufffd" not in text  # non-printable byte tokens are silenced


def test_chat_template_renders_tools_and_content_parts(tiny: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]
    out = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                  tokenize=False)
    assert out.startswith("<|im_start|>system\nBe brief.")
    assert "get_weather" in out and "Weather in Oslo?" in out and "rain" in out
    assert out.endswith("<|im_start|>assistant\n")
    plain = tok.apply_chat_template(messages[:2], add_generation_prompt=False, tokenize=False)
    assert plain == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                     "<|im_start|>user\nWeather in Oslo?<|im_end|>\n")


def test_complete_model_is_not_regenerated(tiny: pathlib.Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    messages: list[str] = []
    assert devmodel.make_model(tiny, size="tiny", seed=0, progress=messages.append) == tiny
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == before
    assert not any("training" in m for m in messages)
    assert devmodel.is_complete(tiny, "tiny", 0, "float32")
    assert not devmodel.is_complete(tiny, "tiny", 1, "float32")


def test_other_parameters_replace_our_model(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m"
    devmodel.make_model(target, seed=0)
    devmodel.make_model(target, seed=0, dtype="float16")
    marker = json.loads((target / devmodel.MARKER_FILE).read_text())
    assert marker["dtype"] == "float16"
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left


def test_interrupted_run_leaves_nothing(tmp_path: pathlib.Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(devmodel.make, "_write_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        devmodel.make_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_truncated_model_is_regenerated_and_stale_temps_removed(tmp_path: pathlib.Path) -> None:
    stale = tmp_path / ".m.tmp-4194305-abc"  # above any pid_max: its writer is surely dead
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    target = devmodel.make_model(tmp_path / "m")
    assert not stale.exists()
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert not devmodel.is_complete(target)
    devmodel.make_model(target)  # regenerates
    assert devmodel.is_complete(target, "tiny", 0, "float32")


def test_refuses_foreign_directory(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        devmodel.make_model(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_sharded_output_loads(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devmodel.weights, "MAX_SHARD_BYTES", 400_000)
    target = devmodel.make_model(tmp_path / "m")
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (target / "model.safetensors").exists()

    import mlx_lm

    model, tokenizer = mlx_lm.load(str(target))
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt="Hello", max_tokens=3), str)


def test_rejects_bad_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        devmodel.make_model(tmp_path / "m", size="huge")
    with pytest.raises(ValueError):
        devmodel.make_model(tmp_path / "m", dtype="bfloat16")
    assert not (tmp_path / "m").exists()
