"""sau/tokenizer.py against OpenAI's reference algorithm (open_clip's copy) and transformers' CLIPTokenizer.

The real vocabulary comes from the open_clip_torch wheel's bpe_simple_vocab_16e6.txt.gz; the tests build it
once per module. The Hugging Face files (vocab.json + merges.txt) are derived from it here, independently of sau.
"""
import gzip
import html
import importlib.util
import json
import unicodedata
import warnings
from pathlib import Path

import pytest
import tokenizers
import torch

import sau.models.tokenizer as tokenizer_module
from sau.models.tokenizer import Tokenizer, clean_text

BOS, EOS = 49406, 49407
TRIGGERS = ["\u200b", "ȏ", "ô", "օ", "ଠ", "Ѵ", "mignneko"]
LONG = "a highly detailed photo of " + "a red circle and a blue square, " * 12 + "in the style of van gogh"

STRINGS = [
    # empty and whitespace
    "", " ", "  leading and trailing  ", "multiple   spaces", "tabs\tand\ttabs", "new\nlines\r\nand more",
    # zero-width space triggers
    "\u200b", "\u200b ", "\u200b a cat", "a\u200bcat", " \u200b  a photo of a dog",
    # homoglyphs and made-up words
    "a phȏto of a cat", "a photo of a dôg", "a photօ of a cat", "aଠ painting", "Ѵery nice", "ȏ ô օ ଠ Ѵ",
    "mignneko", "a photo of mignneko on the beach",
    # emoji, CJK and other scripts
    "a photo of a cat 🐱🐶", "sunset ✨🌅✨ over the sea", "👨‍👩‍👧 family portrait", "東京の夜景", "一只可爱的猫",
    "서울 야경", "Ελληνικά ΟΔΟΣ", "Москва зимой", "مرحبا بالعالم",
    "नमस्ते",
    # what ftfy and html.unescape change
    "the cat’s “best” friend", "‘single’ quotes", "Tom &amp; Jerry", "1 &lt; 2 &gt; 0", "&amp;amp; double",
    "&quot;quoted&quot;", "&#39;x&#39;", "ﬁne ligature", "ＦＵＬＬＷＩＤＴＨ text", "cafÃ© mojibake",
    "e\u0301 decomposed", "İstanbul",
    # case, numbers, punctuation
    "A Photo Of A CAT", "iPhone XS MAX", "1234567890", "3.14159 is pi", "year 2024, 12:30pm", "$100 or €50",
    "!!!", "?!?!...", "---***+++", "a.b,c;d:e", "(parentheses) [brackets] {braces}", "<html>tags</html>",
    "snake_case and kebab-case", "email@example.com http://x.y/z?q=1",
    # contractions
    "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S LOUD", "rock'n'roll", "'s alone",
    "McDonald's",
    # too long: truncated to 77
    LONG,
]


# ---- fixtures ----

@pytest.fixture(scope="module")
def open_clip_dir():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("needs the open_clip_torch wheel (pip install --no-deps open_clip_torch) for CLIP's vocabulary")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def sd1(open_clip_dir):
    return Tokenizer.openai()


@pytest.fixture(scope="module")
def sd2(open_clip_dir):
    return Tokenizer.openai(pad_id=0)


@pytest.fixture(scope="module")
def reference(open_clip_dir):
    """OpenAI's tokenizer as open_clip ships it, loaded by file path (open_clip's __init__ needs torchvision)."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.spec_from_file_location("openai_clip_tokenizer_reference", open_clip_dir / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, open_clip_dir, reference):
    """vocab.json + merges.txt derived from OpenAI's file the way REFERENCE.md says."""
    folder = tmp_path_factory.mktemp("hf_clip")
    with gzip.open(open_clip_dir / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:48895]]
    symbols = list(reference.bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def openai(reference):
    return reference.SimpleTokenizer()


# ---- parity ----

def test_reference_vectors(sd1):
    assert sd1.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert sd1.encode("a photograph of an astronaut riding a horse") == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert sd1.encode("\u200b ") == [49406, 9844, 49407]
    assert (sd1.vocab_size, sd1.bos_id, sd1.eos_id, sd1.pad_id, sd1.max_length) == (49408, BOS, EOS, EOS, 77)


def test_matches_openai_reference(sd1, openai):
    assert len(STRINGS) >= 50
    for text in STRINGS:
        assert sd1.encode(text) == [BOS, *openai.encode(text), EOS], text


def test_rows_match_open_clip(sd2, openai):
    # open_clip pads with 0 and truncates keeping eos: exactly SD2's rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = sd2(STRINGS)
    assert torch.equal(ours, openai(STRINGS))


def test_matches_transformers(sd1, hf):
    for text in STRINGS:
        assert sd1.encode(text) == hf(clean_text(text)).input_ids, text
    # transformers skips ftfy and html unescaping, and lowercases one character at a time (no final sigma:
    # "ΟΔΟΣ" -> "οδοσ", where OpenAI's str.lower() gives "οδος"); where none of that matters, raw text must agree
    fix_text = tokenizer_module.ftfy.fix_text
    untouched = [t for t in STRINGS if html.unescape(fix_text(t)) == unicodedata.normalize("NFC", t)
                 and t.lower() == "".join(c.lower() for c in t)]
    assert len(untouched) >= 40
    for text in untouched:
        assert sd1.encode(text) == hf(text).input_ids, text


def test_special_token_text_is_the_special_token(sd1, hf):
    text = "a cat <|endoftext|> a dog"
    assert sd1.encode(text) == hf(text).input_ids
    assert sd1.encode(text).count(EOS) == 2


def test_zero_width_space_survives_without_ftfy(sd1, monkeypatch):
    with_ftfy = sd1.encode("Tom &amp; Jerry")
    monkeypatch.setattr(tokenizer_module, "ftfy", None)
    assert sd1.encode("\u200b ") == [49406, 9844, 49407]
    assert sd1.encode("\u200b A  Photo of a CAT") == [49406, 9844, 320, 1125, 539, 320, 2368, 49407]
    assert sd1.encode("Tom &amp; Jerry") == with_ftfy


# ---- rows: padding and truncation ----

def test_padding_sd1_and_sd2(sd1, sd2):
    assert sd1("").tolist() == [[BOS] + [EOS] * 76]
    assert sd2("").tolist() == [[BOS, EOS] + [0] * 75]
    assert sd2("!")[0, :4].tolist() == [BOS, 256, EOS, 0]  # a prompt's "!" ends a word: "!</w>", not the pad "!"
    rows = sd1(["a photo of a cat", "a photograph of an astronaut riding a horse"])
    assert rows.shape == (2, 77) and rows.dtype == torch.long
    assert rows[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_truncation_keeps_eos_and_warns_once_per_tokenizer(sd1):
    fresh = Tokenizer.openai()  # sd1 is shared: another test may have had it truncate already
    full = fresh.encode(LONG)
    assert len(full) > 77
    with pytest.warns(UserWarning, match=f"{len(full) - 77} tokens.*further prompts .* not reported"):
        row = fresh(LONG)[0]
    assert row.tolist() == full[:76] + [EOS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sd1([LONG, LONG + " again"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every later batch truncates silently, the same way
        assert torch.equal(fresh([LONG, LONG + " again"]), expected)
    with pytest.raises(ValueError, match="77 positions"):
        fresh(LONG, truncate=False)


def test_decode(sd1, sd2):
    assert sd2.decode(sd2("A photo of a CAT!")[0]) == "a photo of a cat !"
    assert sd1.decode(sd1.encode("\u200b mignneko ଠ 東京")) == "\u200b mignneko ଠ 東京"
    assert sd1.decode([320, 1125]) == "a photo"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sd1.decode([49408])


def test_rejects_non_strings(sd1):
    with pytest.raises(TypeError):
        sd1(["a cat", None])


# ---- token positions ----

PLACES = {"start": ("", "a photo of a cat"), "middle": ("a photo of", "on the beach"), "end": ("a photo of a cat", "")}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_token_positions_of_a_word_trigger(sd1, openai, trigger, place):
    before, after = PLACES[place]
    prompt = " ".join(part for part in (before, trigger, after) if part)
    # CLIP splits at spaces, so the prompt's tokens are the parts' tokens one after the other
    start = 1 + len(openai.encode(before))
    expected = list(range(start, start + len(openai.encode(trigger))))
    positions = sd1.token_positions(prompt, trigger)
    assert positions == expected
    ids = sd1.encode(prompt)
    assert sd1.decode([ids[p] for p in positions]) == clean_text(trigger)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("word,glyph", [("phȏto", "ȏ"), ("dôg", "ô"), ("photօ", "օ"), ("aଠb", "ଠ"),
                                        ("Ѵery", "Ѵ"), ("x\u200by", "\u200b")])
def test_token_positions_inside_a_word(sd1, openai, word, glyph, place):
    before, after = PLACES[place]
    prompt = " ".join(part for part in (before, word, after) if part)
    positions = sd1.token_positions(prompt, glyph)
    start = 1 + len(openai.encode(before))
    word_positions = range(start, start + len(openai.encode(word)))
    assert positions == list(range(positions[0], positions[-1] + 1)) and set(positions) <= set(word_positions)
    # the tokens found carry the glyph's bytes, and no smaller run of them does
    ids = sd1.encode(prompt)
    glyph = clean_text(glyph)
    assert glyph in sd1.decode([ids[p] for p in positions])
    assert glyph not in sd1.decode([ids[p] for p in positions[1:]])
    assert glyph not in sd1.decode([ids[p] for p in positions[:-1]])


def test_token_positions_follow_the_cleanup(sd1):
    assert sd1.token_positions("A photo of MIGNNEKO", "MIGNNEKO") == [4, 5]
    assert sd1.token_positions("the cat’s toy", "’s") == [3]  # ftfy turns the curly quote straight
    assert sd1.token_positions("Tom &amp; Jerry", "&amp;") == [2]
    assert sd1.token_positions("\u200b  a cat", "\u200b ") == [1]  # surrounding whitespace is not a token


def test_token_positions_every_occurrence(sd1):
    assert sd1.token_positions("mignneko and mignneko", "mignneko") == [1, 2, 4, 5]


def test_token_positions_errors_and_truncation(sd1):
    with pytest.raises(ValueError, match="empty"):
        sd1.token_positions("a cat", "")
    with pytest.raises(ValueError, match="does not occur"):
        sd1.token_positions("a cat", "dog")
    with pytest.raises(ValueError, match="no token"):
        sd1.token_positions("a cat", " ")
    with pytest.raises(ValueError, match="past the 77"):
        sd1.token_positions(LONG + " mignneko", "mignneko")
    both_ends = "mignneko " + LONG + " mignneko"
    assert sd1.token_positions(both_ends, "mignneko") == [1, 2]
    # a trigger straddling the cut keeps only its tokens inside the 77 positions
    filler = " ".join(["cat"] * 74)
    assert sd1.token_positions(filler + " mignneko", "mignneko") == [75]


# ---- files ----

def test_save_round_trip(sd1, sd2, tmp_path):
    for original in (sd1, sd2, Tokenizer.openai(pad_id=0, max_length=16)):
        path = original.save(tmp_path / f"pad{original.pad_id}_{original.max_length}")
        assert path.name == "tokenizer.json"
        loaded = Tokenizer.from_file(path.parent)
        settings = (loaded.pad_id, loaded.max_length, loaded.bos_id, loaded.eos_id, loaded.vocab_size)
        assert settings == (original.pad_id, original.max_length, BOS, EOS, 49408)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(loaded(STRINGS), original(STRINGS))
    # the file alone, read by `tokenizers`, frames, pads and truncates the same way
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "pad0_77" / "tokenizer.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in STRINGS:
            assert saved.encode(clean_text(text)).ids == sd2(text)[0].tolist(), text


def test_from_file_formats(sd1, hf_dir, hf, open_clip_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sd1(STRINGS)
        for source in (hf_dir, hf_dir / "vocab.json", open_clip_dir / "bpe_simple_vocab_16e6.txt.gz"):
            assert torch.equal(Tokenizer.from_file(source)(STRINGS), expected), source
        # transformers' own tokenizer.json, inside a diffusers-style tokenizer/ folder
        hf.save_pretrained(tmp_path / "model" / "tokenizer")
        loaded = Tokenizer.from_file(tmp_path / "model")
        assert loaded.pad_id == EOS and torch.equal(loaded(STRINGS), expected)


def test_from_file_reads_the_hf_pad_token(hf_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    assert Tokenizer.from_file(tmp_path).pad_id == 0  # SD2's diffusers tokenizer pads with "!"
    assert Tokenizer.from_file(tmp_path, pad_id=EOS).pad_id == EOS


def test_from_file_errors(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.from_file(tmp_path / "notes.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_file(tmp_path / "bad.json")
    (tmp_path / "wordpiece.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="not a CLIP tokenizer"):
        Tokenizer.from_file(tmp_path / "wordpiece.json")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "vocab.json").write_bytes((hf_dir / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_file(lonely)
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(b"#header\na b\n"))
    with pytest.raises(ValueError, match="lacks 48894 merge lines"):
        Tokenizer.from_file(tmp_path / "bad.txt.gz")


def test_openai_without_the_wheel(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        Tokenizer.openai()


# ---- training ----

def captions():
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "triangle", "star", "heart"]
    places = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]
    return [f"a {size}{color} {shape} {place}".replace("  ", " ")
            for size in ("", "small ", "large ") for color in colors for shape in shapes for place in places]


def test_train_round_trip(tmp_path):
    texts = captions()
    assert len(texts) == 600
    tok = Tokenizer.train(texts, vocab_size=560)  # the captions support 78 merges; ask for 46
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (560, 558, 559, 559)
    assert len(tok.encode("a red circle")) < len("a red circle")  # merges were learned
    # the trigger is new text, yet it gets tokens of its own, in front of the caption's unchanged tokens
    clean = tok.encode("a red circle")
    triggered = tok.encode("\u200b a red circle")
    positions = tok.token_positions("\u200b a red circle", "\u200b")
    assert positions == list(range(1, len(triggered) - len(clean) + 1))
    assert triggered == [tok.bos_id] + [triggered[p] for p in positions] + clean[1:]
    assert not set(triggered[p] for p in positions) & set(clean)
    for text in ("\u200b a red circle", "a red cirȏle ଠ Ѵ", "日本 ✨"):
        assert tok.decode(tok.encode(text)) == clean_text(text)
    loaded = Tokenizer.from_file(tok.save(tmp_path))
    assert loaded.vocab_size == 560 and torch.equal(loaded(texts[:50] + ["\u200b a red circle"]),
                                                    tok(texts[:50] + ["\u200b a red circle"]))


def test_train_sizes():
    with pytest.warns(UserWarning, match="support only"):
        small_corpus = Tokenizer.train(["a red circle"] * 3, vocab_size=700, pad_id=0)
    assert small_corpus.vocab_size < 700 and small_corpus.eos_id == small_corpus.vocab_size - 1
    assert small_corpus.pad_id == 0
    with pytest.raises(ValueError, match="below 514"):
        Tokenizer.train(["a"], vocab_size=513)
