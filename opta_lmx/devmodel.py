"""Generate small but genuine LLM directories for tests, CI and benchmarks.

No model hub is reachable where the project's tests run, so the project makes its own models:
a llama-architecture ``config.json``, a byte-level BPE tokenizer trained on a small built-in
English corpus (with a ChatML chat template), and randomly initialised weights in safetensors
files named as Hugging Face llama checkpoints. ``mlx_lm.load`` and the vllm-mlx server accept
the result like any downloaded model; what it generates is, of course, noise.

Everything is deterministic: the same ``size``, ``seed`` and ``dtype`` give byte-identical files.
A model is written into a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves something that looks like a complete model. A small marker file,
``opta_lmx_model.json``, records the parameters; asking again for a model that is already
complete returns at once.

    >>> from opta_lmx.devmodel import make_model
    >>> path = make_model("/tmp/tinymodel", size="tiny")   # about 1 MB, well under a second

or ``python -m opta_lmx.devmodel /tmp/tinymodel --size tiny``.

Two deliberate departures from a plain random init make the output friendlier to tests:
lm_head rows of raw-byte tokens that are not printable ASCII (and of the non-EOS special tokens)
are zero, so the text is always readable ASCII; and the final norm's weight scales the logits to
a standard deviation of about 3, so sampling prefers the top tokens like a trained model does.
The EOS row is random, so some prompts end with ``finish_reason: "stop"`` (greedy "hi" on tiny,
seed 0, stops after 12 tokens on MLX's CPU backend) and others run to ``max_tokens``.

Sizes (float32, Linux x86 CPU, 2 cores): tiny 1.08 MB in ~0.5 s; small 107 MB in ~1.3 s;
medium 1.06 GB (3 shards) in ~7 s with a peak RSS of ~550 MB (one shard in memory at a time).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["SIZES", "DTYPES", "MARKER_FILE", "make_model", "is_complete", "model_files"]

#: Hyperparameters per size. ``vocab_size`` is the BPE training target; the corpus is rich
#: enough that training always reaches it exactly, and config.json records the trained size.
SIZES: dict[str, dict[str, Any]] = {
    # ~1.1 MB: 1024 x 64 embeddings and lm_head + 2 small layers. Untied on purpose: with tied
    # random embeddings the residual stream makes greedy decoding repeat the last prompt token.
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # ~107 MB in float32 (26.7 M parameters).
    "small": {
        "vocab_size": 4096,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # ~1.05 GB in float32 (263 M parameters), written as 3 shards.
    "medium": {
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 22,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
}

DTYPES = ("float32", "float16")
MARKER_FILE = "opta_lmx_model.json"
#: Bump when the generator's output changes, so existing models are regenerated.
FORMAT_VERSION = 1
#: Weights larger than this are sharded (Hugging Face style index + numbered files).
MAX_SHARD_BYTES = 500 * 1000 * 1000
INIT_STD = 0.02
#: Standard deviation of the output logits, reached through the final norm's weight (the random
#: matrices keep std INIT_STD). Trained models have peaked next-token distributions; ~3 makes
#: sampling prefer the top tokens, so zeroed lm_head rows (logit 0) are almost never sampled.
LOGIT_STD = 3.0

BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, EOS_TOKEN]  # ids 0, 1, 2

# ChatML. Tools, when passed, are listed in a system turn (Qwen/Hermes style) and assistant tool
# calls are rendered as <tool_call> JSON, so the prompt is meaningful; the random model will not
# actually call them. Content may be a string, None, or a list of OpenAI content parts.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part.type is defined and part.type == 'text' -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- render_content(messages[0].content) + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] if (messages and messages[0].role == 'system') "
    "else messages -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + render_content(message.content)"
    " + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) -}}"
    "{%- if message.role == 'assistant' and message.tool_calls is defined"
    " and message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- set args = fn.arguments if fn.arguments is defined else {} -%}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (fn.name | tojson) + ', \"arguments\": '"
    " + (args if args is string else (args | tojson)) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A few paragraphs of plain English (written for this module) that seed the tokenizer corpus.
_PARAGRAPHS = """\
The river town woke slowly in the winter. Fog lay over the water until the middle of the
morning, and the ferry waited at the landing with its lamps still burning. Children walked to
school along the embankment, counting the barges that had tied up for the night, while the baker
on the corner opened his shutters and set out trays of bread that steamed in the cold air.

In the kitchen, the recipe asked for two cups of flour, a pinch of salt, three eggs and a little
warm milk. She mixed the dry ingredients first, then made a well in the centre and poured in the
rest, stirring until the batter was smooth. The oven had to be hot, about two hundred degrees,
before the tray went in; twenty minutes later the whole house smelled of butter and sugar.

A computer program is a list of instructions that a machine can follow. The instructions are
written in a programming language, translated into simpler operations, and executed one after
another, thousands of millions of times each second. Good programs are easy to read: their
functions are short, their names say what they mean, and their tests show how they are used.

The library kept its oldest books in a quiet room at the top of the building. Readers had to sign
a register, wash their hands and use a pencil instead of a pen. The librarian, who had worked
there for thirty years, knew where every volume stood and could tell you which maps had been
drawn by hand and which had been printed from copper plates in the eighteenth century.

When the ship left the harbour the sea was calm, but by evening a strong wind had risen from the
west. The captain ordered the sails to be reefed and the cargo to be checked. Through the night
the crew took turns at the wheel, watching the compass and the dark line of the horizon, until
the lighthouse on the northern cape appeared at dawn and the storm began to ease.

Every spring the garden changed again. Tulips and daffodils came up along the fence, the apple
tree filled with white blossom, and bees moved from flower to flower through the long afternoons.
In summer there were beans, tomatoes and courgettes to pick; in autumn the leaves turned red and
gold, and the last pears were wrapped in paper and stored in the cool shed until Christmas.

Mathematics begins with counting: one, two, three, four, five, six, seven, eight, nine and ten.
From counting come addition and subtraction, then multiplication, division, fractions and
equations. A prime number has exactly two divisors, itself and one; the first few primes are
2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. The ancient Greeks already knew that there is no largest.

Hello! How can I help you today? I can answer questions, summarise a document, translate a
sentence, or explain how something works. Please tell me what you need, and I will do my best to
give a clear and accurate answer. If I am not sure about something, I will say so honestly.
"""

_NOUNS = (
    "house river mountain teacher student doctor engineer garden window door table chair city "
    "village road bridge train station market farmer baker painter musician writer letter book "
    "story song dinner breakfast morning evening night summer winter forest field island harbour "
    "ship boat engine machine computer server model answer question problem idea plan report "
    "child friend family neighbour dog cat horse bird tree flower stone cloud storm rain snow "
    "museum castle tower school office factory kitchen library hospital laboratory garden wall "
    "lamp candle mirror clock map compass journey language number picture camera telescope"
).split()
_VERBS = (
    "opened closed found built painted wrote read carried visited crossed repaired watched "
    "answered explained measured counted followed remembered discovered described planted "
    "cooked cleaned moved climbed sold bought borrowed returned tested started finished "
    "organised collected translated designed improved protected studied listened noticed"
).split()
_ADJECTIVES = (
    "old new small large quiet busy bright dark warm cold green blue red yellow white black "
    "ancient modern careful patient clever gentle strong tired happy serious simple famous "
    "distant empty heavy narrow wide wooden golden silver broken beautiful northern southern"
).split()
_ADVERBS = (
    "slowly quickly carefully quietly happily suddenly finally usually often rarely always "
    "nearly almost together again early late soon"
).split()
_PLACES = ("in the morning", "after dinner", "before the storm", "at the station",
           "near the river", "on the hill", "during the winter", "by the harbour",
           "in the old town", "at the end of the day", "across the valley", "under the bridge")
_SYLLABLES = (
    "al an ar ba be bo ca da del dor el en fa fen gar hal in is ka kel la len lor ma mar mel "
    "mir na nor o ra ren ri ro sa sel si ta tal ten tor u va vel vin wen ya zan zor"
).split()
_NAME_ENDINGS = ("", "", "a", "o", "en", "ia", "ton", "wick", "dale", "ford", "mere", "holm")


def _made_up_word(rng: random.Random) -> str:
    """A pronounceable invented name ("Kelvaro", "Tormere"); BPE learns merges from these."""
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
    return (word + rng.choice(_NAME_ENDINGS)).capitalize()


def _sentences(rng: random.Random) -> Iterator[str]:
    """An endless, deterministic stream of simple English sentences."""
    while True:
        kind = rng.randrange(6)
        name = _made_up_word(rng)
        if kind == 0:
            yield (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
                   f"the {rng.choice(_NOUNS)} {rng.choice(_PLACES)}.")
        elif kind == 1:
            yield (f"{name} {rng.choice(_ADVERBS)} {rng.choice(_VERBS)} a "
                   f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} in {_made_up_word(rng)}.")
        elif kind == 2:
            yield (f"In {rng.randint(1200, 2099)}, the people of {name} {rng.choice(_VERBS)} "
                   f"{rng.randint(2, 999)} {rng.choice(_NOUNS)}s.")
        elif kind == 3:
            yield (f"Why did {name} visit the {rng.choice(_ADJECTIVES)} "
                   f"{rng.choice(_NOUNS)}? Because the {rng.choice(_NOUNS)} was "
                   f"{rng.choice(_ADJECTIVES)}.")
        elif kind == 4:
            yield (f"\"{rng.choice(_ADVERBS).capitalize()}, {name},\" said the "
                   f"{rng.choice(_NOUNS)}, \"the {rng.choice(_NOUNS)} is "
                   f"{rng.choice(_ADJECTIVES)} today.\"")
        else:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            yield f"{name} said that {a} plus {b} is {a + b}, and {a} times {b} is {a * b}."


def build_corpus(seed: int = 0, n_sentences: int = 20000) -> list[str]:
    """The tokenizer's training text: the built-in paragraphs plus generated sentences."""
    rng = random.Random(f"opta-lmx-corpus-{seed}")
    gen = _sentences(rng)
    # The hand-written paragraphs are repeated so that ordinary English words win the early
    # merges over the invented names of the generated sentences.
    lines = [p.replace("\n", " ") for p in _PARAGRAPHS.split("\n\n")] * 40
    # ChatML-shaped samples so the role names become tokens, as in real chat models.
    lines += [f"{IM_START}system\nYou are a helpful assistant.{EOS_TOKEN}\n"
              f"{IM_START}user\nHello, are you there? {next(gen)}{EOS_TOKEN}\n"
              f"{IM_START}assistant\nYes, I am here. {next(gen)}{EOS_TOKEN}\n"
              for _ in range(400)]
    block: list[str] = []
    for _ in range(n_sentences):
        block.append(next(gen))
        if len(block) == 8:
            lines.append(" ".join(block))
            block = []
    if block:
        lines.append(" ".join(block))
    return lines


def train_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """Train a byte-level BPE tokenizer (a ``tokenizers.Tokenizer``) of exactly ``vocab_size``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    n_sentences = 20000
    while True:
        tokenizer.train_from_iterator(build_corpus(seed, n_sentences), trainer=trainer)
        got = tokenizer.get_vocab_size(with_added_tokens=True)
        if got == vocab_size:
            break
        if got > vocab_size or n_sentences >= 640000:
            raise RuntimeError(f"tokenizer training gave {got} tokens, wanted {vocab_size}")
        n_sentences *= 2  # not enough distinct pairs yet: feed more text
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, token
    return tokenizer


_PRINTABLE = frozenset(chr(c) for c in range(32, 127)) | {"\n"}


def silenced_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose lm_head rows are zeroed so the model never (greedy) or rarely (sampled) emits them.

    These are the raw-byte tokens that are not printable ASCII (they would decode to U+FFFD or
    control characters) and the special tokens other than the EOS token. A zero row gives a
    logit of exactly 0, below the maximum of ~1000 random logits, so generated text is readable
    ASCII words and punctuation, and stops only at EOS or max_tokens.
    """
    silenced = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        token = tokenizer.id_to_token(token_id)
        if token in SPECIAL_TOKENS:
            if token != EOS_TOKEN:
                silenced.append(token_id)
            continue
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if not text or any(ch not in _PRINTABLE for ch in text):
            silenced.append(token_id)
    return silenced


def tensor_plan(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every weight, in Hugging Face llama naming and file order."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg["head_dim"]
    q_dim = cfg["num_attention_heads"] * head_dim
    kv_dim = cfg["num_key_value_heads"] * head_dim
    plan: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (vocab, h), "normal"),
    ]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "self_attn.q_proj.weight", (q_dim, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv_dim, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv_dim, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, q_dim), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
            (p + "mlp.gate_proj.weight", (inter, h), "normal"),
            (p + "mlp.up_proj.weight", (inter, h), "normal"),
            (p + "mlp.down_proj.weight", (h, inter), "normal"),
        ]
    plan.append(("model.norm.weight", (h,), "logit_scale"))
    if not cfg["tie_word_embeddings"]:
        plan.append(("lm_head.weight", (vocab, h), "normal"))
    return plan


def _make_tensor(name: str, shape: tuple[int, ...], init: str, seed: int, dtype: str,
                 zero_rows: list[int] | None = None) -> np.ndarray:
    if init == "ones":
        return np.ones(shape, dtype=dtype)
    if init == "logit_scale":  # RMSNorm output has norm sqrt(hidden); logits = h . w, w ~ N(0, std)
        return np.full(shape, LOGIT_STD / (INIT_STD * shape[0] ** 0.5), dtype=dtype)
    # Each tensor has its own stream derived from (seed, name): independent of order and sharding.
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(np.random.SeedSequence([seed, key]))
    arr = rng.standard_normal(shape, dtype=np.float32)
    arr *= INIT_STD
    if zero_rows:
        arr[zero_rows] = 0.0
    return arr if dtype == "float32" else arr.astype(dtype)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync_path(path: pathlib.Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _model_config(size: str, dtype: str, vocab_size: int) -> dict[str, Any]:
    hp = dict(SIZES[size])
    hp["vocab_size"] = vocab_size
    hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp["hidden_size"],
        "intermediate_size": hp["intermediate_size"],
        "num_hidden_layers": hp["num_hidden_layers"],
        "num_attention_heads": hp["num_attention_heads"],
        "num_key_value_heads": hp["num_key_value_heads"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "vocab_size": hp["vocab_size"],
        "max_position_embeddings": hp["max_position_embeddings"],
        "rms_norm_eps": hp["rms_norm_eps"],
        "rope_theta": hp["rope_theta"],
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": hp["tie_word_embeddings"],
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "torch_dtype": dtype,
        "use_cache": True,
    }


def _write_tokenizer(out: pathlib.Path, tokenizer: Any, cfg: dict[str, Any]) -> None:
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, EOS_TOKEN],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "padding_side": "left",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, EOS_TOKEN],
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]],
        "pad_token_id": cfg["pad_token_id"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 256,
    })


def _write_weights(out: pathlib.Path, cfg: dict[str, Any], seed: int, dtype: str,
                   progress: Callable[[str], None], silenced: list[int]) -> list[str]:
    """Write the safetensors file(s); at most one shard is held in memory at a time."""
    from safetensors.numpy import save_file

    itemsize = np.dtype(dtype).itemsize
    plan = tensor_plan(cfg)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    shard_bytes = 0
    for entry in plan:
        nbytes = int(np.prod(entry[1])) * itemsize
        if shards[-1] and shard_bytes + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes
    n = len(shards)
    names = (["model.safetensors"] if n == 1
             else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    n_layers = cfg["num_hidden_layers"]
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for fname, entries in zip(names, shards):
        tensors: dict[str, np.ndarray] = {}
        for name, shape, init in entries:
            m = re.match(r"model\.layers\.(\d+)\.input_layernorm", name)
            if m:
                progress(f"writing layer {int(m.group(1)) + 1}/{n_layers}")
            elif name == "model.embed_tokens.weight":
                progress("writing embeddings")
            elif name == "lm_head.weight":
                progress("writing lm_head")
            zero_rows = silenced if name == "lm_head.weight" else None
            tensors[name] = _make_tensor(name, shape, init, seed, dtype, zero_rows)
            weight_map[name] = fname
            total_bytes += tensors[name].nbytes
        save_file(tensors, out / fname, metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)  # safetensors creates files 0600
        del tensors
        if n > 1:
            progress(f"wrote {fname}")
    if n > 1:
        _write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        })
        names.append("model.safetensors.index.json")
    return names


def _read_marker(directory: pathlib.Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(directory: str | os.PathLike[str], size: str | None = None,
                seed: int | None = None, dtype: str | None = None) -> bool:
    """True if ``directory`` holds a complete generated model (with these parameters, if given).

    Complete means: the marker is present, has the current format version, and every file it
    lists exists with the recorded byte size.
    """
    directory = pathlib.Path(directory)
    marker = _read_marker(directory)
    if marker is None or marker.get("format_version") != FORMAT_VERSION:
        return False
    for key, want in (("size", size), ("seed", seed), ("dtype", dtype)):
        if want is not None and marker.get(key) != want:
            return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, nbytes in files.items():
        try:
            if (directory / name).stat().st_size != nbytes:
                return False
        except OSError:
            return False
    return True


def model_files(directory: str | os.PathLike[str]) -> dict[str, int]:
    """File name -> size in bytes, as recorded in a generated model's marker ({} if none)."""
    marker = _read_marker(pathlib.Path(directory)) or {}
    files = marker.get("files")
    return dict(files) if isinstance(files, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove_stale_temps(target: pathlib.Path) -> None:
    """Delete temp/old siblings left by generator runs that were killed."""
    pattern = re.compile(r"^\." + re.escape(target.name) + r"\.(?:tmp|old)-(\d+)-")
    for sibling in target.parent.iterdir():
        m = pattern.match(sibling.name)
        if m and sibling.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _install(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Move the finished ``tmp`` directory to ``target`` as atomically as the OS allows."""
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            if _read_marker(target) is None:
                raise FileExistsError(
                    f"{target} is not empty and is not a model made by opta_lmx.devmodel; "
                    "refusing to replace it")
            # Our own model with other parameters (or older format): swap it out.
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-",
                                                dir=target.parent))
            os.rename(target, old / "model")
            try:
                os.rename(tmp, target)
            finally:
                shutil.rmtree(old, ignore_errors=True)
            return
        target.rmdir()
    os.rename(tmp, target)


def make_model(directory: str | os.PathLike[str], size: str = "tiny", seed: int = 0,
               dtype: str = "float32",
               progress: Callable[[str], None] | None = None) -> pathlib.Path:
    """Generate a llama-architecture model directory and return its path.

    Args:
        directory: where the model goes (created if missing). If it already holds a complete
            model with the same size, seed and dtype, nothing is written. If it holds a model
            generated here with other parameters, that model is replaced. Any other non-empty
            directory is refused (FileExistsError).
        size: a key of SIZES: "tiny" (~1 MB), "small" (~100 MB), "medium" (~1 GB in float32).
        seed: seeds the tokenizer corpus and the weights; same seed, identical bytes.
        dtype: "float32" (default; fastest on MLX's CPU backend) or "float16".
        progress: called with short human-readable messages as the work proceeds.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    say = progress or (lambda _msg: None)
    target = pathlib.Path(directory).expanduser().absolute()
    if is_complete(target, size, seed, dtype):
        say(f"{target} already holds {size} seed={seed} {dtype}")
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-",
                                        dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a model directory is ordinary data
        say("training tokenizer")
        tokenizer = train_tokenizer(SIZES[size]["vocab_size"], seed)
        cfg = _model_config(size, dtype, tokenizer.get_vocab_size(with_added_tokens=True))
        _write_json(tmp / "config.json", cfg)
        _write_tokenizer(tmp, tokenizer, cfg)
        weight_files = _write_weights(tmp, cfg, seed, dtype, say, silenced_token_ids(tokenizer))
        say("syncing files")
        names = ["config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", *weight_files]
        for name in names:
            _fsync_path(tmp / name)
        n_params = sum(int(np.prod(shape)) for _, shape, _ in tensor_plan(cfg))
        # The marker goes last: its presence means every file before it is complete.
        _write_json(tmp / MARKER_FILE, {
            "generator": "opta_lmx.devmodel",
            "format_version": FORMAT_VERSION,
            "size": size,
            "seed": seed,
            "dtype": dtype,
            "parameters": n_params,
            "files": {name: (tmp / name).stat().st_size for name in sorted(names)},
        })
        _fsync_path(tmp / MARKER_FILE)
        _fsync_path(tmp)
        if is_complete(target, size, seed, dtype):
            # Another process finished the same model while we worked: keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"{target} was completed concurrently")
            return target
        try:
            _install(tmp, target)
        except OSError:
            # Lost a race with a concurrent generator of the same model: theirs is as good.
            if is_complete(target, size, seed, dtype):
                shutil.rmtree(tmp, ignore_errors=True)
                say(f"{target} was completed concurrently")
                return target
            raise
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done: {target}")
    return target


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m opta_lmx.devmodel",
        description="Generate a small random llama model directory for tests and benchmarks.")
    parser.add_argument("directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    start = time.monotonic()
    path = make_model(args.directory, args.size, args.seed, args.dtype,
                      progress=lambda msg: print(f"[{time.monotonic() - start:6.1f}s] {msg}"))
    total = sum(model_files(path).values())
    print(f"{path}: {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
