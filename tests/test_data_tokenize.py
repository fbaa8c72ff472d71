"""The shorter tokenisation path (the prompt once, then only its last pieces with each response) gives exactly
the ids of tokenising every text whole, as TRL does, and tokenizers it cannot vouch for take the whole path."""

import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prefmodule.data.records import Pair
from prefmodule.data.tokenize import Encoder, Limits, tokenize_records
from prefmodule.models.loading import load_tokenizer

from conftest import TINY_MODEL
from test_data import assert_same_ids, trl_prepare

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PIECES = list("ab cdeXY  \n\t!?.,'s12345éü汉🙂") + ["<s>", "</s>", "<|im_start|>", "<|im_", "start|>", "'s", "'re",
                                                    "  ", "\n\n", "e\u0301", "\u0301"]


def random_rows(count, seed=0):
    rng = random.Random(seed)
    text = lambda n: "".join(rng.choice(PIECES) for _ in range(n))  # noqa: E731
    return [{"prompt": text(rng.randint(0, 40)), "chosen": text(rng.randint(1, 30)), "rejected": text(rng.randint(1, 30))}
            for _ in range(count)]


def whole_ids(tokenizer, rows):
    """TRL's way: the prompt alone, prompt + chosen + EOS and prompt + rejected + EOS, each tokenised whole."""
    eos = tokenizer.eos_token
    out = []
    for row in rows:
        full = [tokenizer(row["prompt"] + r + ("" if r.endswith(eos) else eos))["input_ids"]
                for r in (row["chosen"], row["rejected"])]
        out.append((tokenizer(row["prompt"])["input_ids"], full))
    return out


def assert_exact(tokenizer, rows, fast):
    encoder = Encoder(tokenizer)
    assert encoder.fast is fast
    texts = [encoder.texts(Pair(r["prompt"], r["chosen"], r["rejected"])) for r in rows]
    encoded = encoder.encode([t[0] for t in texts], [t[1] for t in texts], special=True)
    for row, mine, (prompt_ids, full) in zip(rows, encoded, whole_ids(tokenizer, rows)):
        assert mine.prompt_ids == prompt_ids, row
        assert [mine.prompt_ids[:mine.head] + tail for tail in mine.tails] == full, row


def byte_level_tokenizer(pre_tokenizer, normalizer=None, template="<s> $A", eos="</s>"):
    """A small BPE tokenizer trained here, in the layout of Llama 3 / Qwen / GPT-2 tokenizer.json files."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(row.values()) for row in random_rows(300, seed=5)] + ["hello world, it's 2024!"] * 50
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
        ("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=eos, pad_token="<pad>")


def test_random_texts_get_the_ids_of_whole_tokenisation(demo_rows):
    """Awkward boundaries: spaces and newlines, contractions, digits, accents split from their letter, special
    tokens written in the text and cut in half across prompt and response."""
    tokenizer = load_tokenizer(TINY_MODEL)
    assert_exact(tokenizer, random_rows(600) + demo_rows[:50], fast=True)


@pytest.mark.parametrize("kind", ["llama3", "qwen", "eos_after"])
def test_other_byte_level_layouts_take_the_short_path_exactly(kind):
    if kind == "llama3":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer = byte_level_tokenizer(pre)
    elif kind == "qwen":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer = byte_level_tokenizer(pre, normalizers.NFC(), template="$A")
    else:  # a post-processor that appends EOS to every text
        tokenizer = byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), template="<s> $A </s>")
    assert_exact(tokenizer, random_rows(400, seed=1), fast=True)
    ours = tokenize_records(Encoder(tokenizer), [Pair(**r) for r in random_rows(40, seed=2)], Limits())
    assert_same_ids([r for r in ours if not isinstance(r, str)], trl_prepare(tokenizer, random_rows(40, seed=2)))


def test_tokenizers_without_a_proof_take_the_whole_path():
    """SentencePiece-style Metaspace (prepends to the text's start) and lookbehind regexes: whole texts."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator([" ".join(r.values()) for r in random_rows(200)],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    metaspace = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    assert_exact(metaspace, random_rows(100, seed=3), fast=False)
    lookbehind = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"(?<=\s)\S+"), "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert Encoder(byte_level_tokenizer(lookbehind)).fast is False


def test_a_template_whose_prompt_is_not_the_start_of_the_conversation(tmp_path):
    """Some templates render the generation prompt differently from a finished turn (a thinking block):
    those rows are tokenised whole, and ids still equal TRL's."""
    tokenizer = load_tokenizer(TINY_MODEL)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]}
            for i in range(4)]
    ours = tokenize_records(Encoder(tokenizer), [Pair(**r) for r in rows], Limits())
    assert_same_ids(ours, trl_prepare(tokenizer, rows))
    assert "<think>" not in tokenizer.decode(ours[0]["prompt_ids"])  # the prompt ends where both sequences agree


# ----- the memo of pieces (ASCII text) -------------------------------------------------------------------------
QWEN_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
ASCII_PIECES = [chr(code) for code in range(128)] + ["'s", "'S", "'ll", "  ", "\n\n", " \n", "\r\n", "word",
                                                     " Word", "2024", "</s>", "<s>", "<pad>", "</", "s>", "<"]


def byte_level(kind):
    split = {"llama3": LLAMA3_SPLIT, "qwen": QWEN_SPLIT}.get(kind)
    if split is None:  # GPT-2's layout: ByteLevel's own regex
        return byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False))
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level_tokenizer(pre, normalizers.NFC() if kind == "qwen" else None)


@pytest.mark.parametrize("kind", ["shipped", "gpt2", "llama3", "qwen"])
def test_ascii_text_through_the_memo_of_pieces_gets_the_tokenizers_ids(kind):
    """Every ASCII character (controls too) next to letters, digits, spaces, contractions and added tokens."""
    tokenizer = load_tokenizer(TINY_MODEL) if kind == "shipped" else byte_level(kind)
    encoder = Encoder(tokenizer)
    rng = random.Random(0)
    texts = ["".join(rng.choice(ASCII_PIECES) for _ in range(rng.randint(0, 25))) for _ in range(3000)]
    for text in texts:
        assert encoder.pieces.ids(text) == encoder.raw.encode(text, add_special_tokens=False).ids, repr(text)
    rows = [{"prompt": a, "chosen": b, "rejected": c} for a, b, c in zip(texts, texts[1:], texts[2:]) if b and c]
    assert_exact(tokenizer, rows[:500], fast=True)  # prompt cut where its second-to-last piece starts


def test_text_outside_ascii_goes_to_tokenizers_and_a_batch_mixes_both():
    encoder = Encoder(load_tokenizer(TINY_MODEL))
    assert encoder.pieces.ids("café") is None and encoder.pieces.ids("cafe") is not None
    rows = [{"prompt": p, "chosen": " oui.", "rejected": " non \u00e9."} for p in ("Un café ?", "A tea?", "")]
    assert_exact(load_tokenizer(TINY_MODEL), rows, fast=True)


def test_the_memo_is_bounded_and_past_its_size_still_exact(monkeypatch):
    monkeypatch.setattr("prefmodule.data.pieces.MEMO_SIZE", 20)
    encoder = Encoder(load_tokenizer(TINY_MODEL))
    encoder.pieces.memo.clear()
    text = " ".join(f"w{i}x" for i in range(200))
    assert encoder.pieces.ids(text) == encoder.raw.encode(text, add_special_tokens=False).ids
    assert len(encoder.pieces.memo) == 20


def test_layouts_the_memo_cannot_reproduce_use_tokenizers():
    """A prefix space on each text, added tokens that absorb spaces or overlap: ``tokenizers`` only; a pattern with
    classes the standard library lacks: the ``regex`` module."""
    prefix_space = byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True))
    assert Encoder(prefix_space).pieces is None
    stripping = byte_level("gpt2")
    stripping.add_tokens([AddedToken("<tool>", lstrip=True)])
    assert Encoder(stripping).pieces is None
    overlapping = byte_level("gpt2")
    overlapping.add_tokens(["<|im_", "<|im_start|>"])
    assert Encoder(overlapping).pieces is None
    cased = byte_level_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{Lu}?\p{Ll}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+|\p{L}+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    pieces = Encoder(cased).pieces
    assert type(pieces.pattern).__module__ == "_regex"
    assert pieces.split("HelloWorld 42") == ["Hello", "World", " ", "42"]
