"""The tokenizer of a generated model: a byte-level BPE trained on a small built-in corpus."""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Iterator
from typing import Any

from opta_lmx.devmodel.sizes import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, IM_START, PAD_TOKEN, SPECIAL_TOKENS
from opta_lmx.state.atomic import write_atomic

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


def write_json(path: pathlib.Path, obj: Any) -> None:
    """A JSON file of the model, replaced atomically."""
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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


def _write_tokenizer(out: pathlib.Path, tokenizer: Any, cfg: dict[str, Any]) -> None:
    write_atomic(out / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    write_json(out / "tokenizer_config.json", {
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
    write_json(out / "special_tokens_map.json", {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, EOS_TOKEN],
    })
    write_json(out / "generation_config.json", {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]],
        "pad_token_id": cfg["pad_token_id"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 256,
    })
