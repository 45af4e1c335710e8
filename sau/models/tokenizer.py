"""CLIP's byte-level BPE tokenizer, on the `tokenizers` library.

Token for token the same as OpenAI's CLIP tokenizer, which SD1 and SD2 both use:
1. clean the text: ftfy's repairs (when ftfy is installed), HTML unescape twice, collapse whitespace, lowercase;
2. split it into pieces with CLIP's pattern (letter runs, single digits, punctuation runs, contractions);
3. write each piece's UTF-8 bytes as printable symbols (GPT-2's byte table) and run BPE on them,
   with `</w>` marking the symbol that ends a piece;
4. frame the ids as <|startoftext|> ... <|endoftext|> in 77 positions, padded with the model's pad id.

Step 1 runs here in Python, exactly as OpenAI wrote it, and steps 2-3 run in `tokenizers`, whose pipeline
therefore has no normalizer: a saved tokenizer.json expects text that already went through `clean_text`.
SAU needs one more thing a plain tokenizer does not give: `token_positions`, the token columns a trigger
occupies in a prompt. Triggers are odd text (a zero-width space, homoglyphs), and all of it must survive:
the vocabulary holds every byte, and nothing in the cleanup drops format characters.
"""
import functools
import gzip
import html
import importlib.util
import json
import os
import unicodedata
import warnings
from pathlib import Path

import tokenizers
import torch
from tokenizers import Regex, models, pre_tokenizers, processors, trainers

try:  # ftfy repairs mojibake, curly quotes, ligatures and fullwidth text; OpenAI's tokenizer always runs it
    import ftfy
except ImportError:
    ftfy = None

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77
OPENAI_MERGES = 48894  # the merges OpenAI uses: 49408 ids = 512 byte symbols + 48894 merges + 2 special tokens
OPENAI_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def readable(text):
    """Text as a report can show it unambiguously: printable ASCII as itself, every other character as its code
    point, so that a zero-width space is "\\u200b", not nothing, and a Cyrillic "а" is "\\u0430", not an "a"."""
    return "".join(c if c.isascii() and c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def clean_text(text):
    """OpenAI CLIP's text cleanup; everything the tokenizer sees has been through it."""
    text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)  # ftfy ends with NFC too
    text = html.unescape(html.unescape(text))  # twice: scraped captions are often escaped twice ("&amp;amp;")
    return " ".join(text.split()).lower()  # split() also strips the ends


@functools.lru_cache(maxsize=None)
def byte_symbols():
    """GPT-2's map from the 256 byte values to printable characters, in CLIP's vocabulary order.

    Bytes that print as themselves in Latin-1 keep their character and come first; the rest (controls,
    space, no-break space, soft hyphen) move to U+0100 and up, so that no symbol is whitespace or invisible.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    hidden = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(hidden)})
    return table


def clip_vocab(merges):
    """CLIP's vocabulary layout: byte symbols, the same with `</w>`, one symbol per merge, then the two specials."""
    symbols = list(byte_symbols().values())
    symbols += [s + END_OF_WORD for s in symbols]
    symbols += [a + b for a, b in merges]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))  # a trained BPE may reach one symbol by two merges: keep one id
    return vocab


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        # keep CLIP's pieces and drop what lies between them (whitespace)
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _backend(vocab, merges):
    """The `tokenizers` pipeline for steps 2-4 (pieces, bytes, BPE, framing)."""
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges, end_of_word_suffix=END_OF_WORD))
    except Exception as e:  # a merge whose parts or result are missing from the vocabulary
        raise ValueError(f"the vocabulary and merges do not fit together: {e}") from e
    backend.pre_tokenizer = _pre_tokenizer()
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN])  # a literal "<|endoftext|>" in a prompt is the token
    specials = [(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])]
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
                                                           special_tokens=specials)
    return backend


class Tokenizer:
    """CLIP tokenizer: text -> (batch, 77) token ids, and a trigger's token positions in a prompt."""

    def __init__(self, vocab, merges, pad_id=None, max_length=MAX_LENGTH):
        missing = [s for s in (BOS_TOKEN, EOS_TOKEN, *byte_symbols().values()) if s not in vocab]
        missing += [s + END_OF_WORD for s in byte_symbols().values() if s + END_OF_WORD not in vocab]
        if missing:
            raise ValueError(f"not a CLIP byte-level vocabulary: {len(missing)} required symbols are missing, "
                             f"e.g. {missing[0]!r}")
        self.backend = _backend(vocab, merges)
        self.vocab_size = self.backend.get_vocab_size()
        self.bos_id, self.eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.max_length = max_length
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad id {self.pad_id} is outside the vocabulary of {self.vocab_size} tokens")
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for the start and end tokens")
        self._byte_of_symbol = {s: b for b, s in byte_symbols().items()}
        # Training tokenizes the same long captions batch after batch: say it once, not once per batch.
        self.truncation_reported = False

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, max_length={self.max_length})")

    # ---- constructors ----

    @classmethod
    def openai(cls, pad_id=49407, max_length=MAX_LENGTH):
        """OpenAI's CLIP vocabulary, from the file the open_clip_torch wheel ships (found without importing it)."""
        spec = importlib.util.find_spec("open_clip")  # importing open_clip would need torchvision
        path = spec and Path(spec.submodule_search_locations[0]) / OPENAI_VOCAB_FILE
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"CLIP's vocabulary {OPENAI_VOCAB_FILE} comes with the open_clip_torch wheel: run "
                "`pip install --no-deps open_clip_torch`, or pass a tokenizer file to Tokenizer.from_file")
        return cls(*_read_openai_bpe(str(path)), pad_id=pad_id, max_length=max_length)

    @classmethod
    def from_file(cls, path, pad_id=None, max_length=None):
        """Load a tokenizer.json, a vocab.json (with merges.txt beside it), OpenAI's .txt.gz, or a folder of these.

        pad_id and max_length, when not given, come from the file (a tokenizer.json written by `save`, or a
        Hugging Face tokenizer_config.json beside the vocabulary), else eos and 77.
        """
        path = Path(path)
        if path.is_dir():
            path = _tokenizer_file_in(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        saved = {}
        if path.name.endswith(".gz"):
            vocab, merges = _read_openai_bpe(str(path))
        elif path.suffix == ".json":
            data = _read_json(path)
            if isinstance(data.get("model"), dict):  # not just `"model" in data`: CLIP's vocab.json has that word
                vocab, merges, saved = _read_tokenizer_json(data, path)
            else:
                vocab, merges = data, _read_merges_txt(path.with_name("merges.txt"))
        else:
            raise ValueError(f"{path} is not a tokenizer file: expected tokenizer.json, vocab.json (with merges.txt) "
                             f"or {OPENAI_VOCAB_FILE}")
        if pad_id is None:
            pad_id = saved.get("pad_id", vocab.get(_hf_pad_token(path.parent)))
        return cls(vocab, merges, pad_id=pad_id, max_length=max_length or saved.get("max_length", MAX_LENGTH))

    @classmethod
    def train(cls, texts, vocab_size, pad_id=None, max_length=MAX_LENGTH, min_frequency=2):
        """Learn a CLIP-style BPE on `texts` (same cleanup and split); the two special tokens take the last ids.

        Every byte symbol, with and without `</w>`, is in the vocabulary, so any text stays representable.
        """
        n_merges = vocab_size - 2 * 256 - 2
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is below 514, the byte symbols and special tokens alone")
        learner = tokenizers.Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
        learner.pre_tokenizer = _pre_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=n_merges + 2 * 256,  # its alphabet holds at most the 512 byte symbols: room for n_merges
            min_frequency=min_frequency, show_progress=False, end_of_word_suffix=END_OF_WORD,
            initial_alphabet=list(byte_symbols().values()))
        learner.train_from_iterator((clean_text(t) for t in texts), trainer)
        merges = _first_merges(_merges_of(json.loads(learner.to_str())["model"]), n_merges)
        vocab = clip_vocab(merges)
        if len(vocab) < vocab_size:
            warnings.warn(f"the texts support only {len(merges)} merges: the vocabulary has {len(vocab)} ids, "
                          f"not {vocab_size}")
        return cls(vocab, merges, pad_id=pad_id, max_length=max_length)

    # ---- encoding ----

    def _tokens(self, texts):
        """The `tokenizers` encodings (ids, offsets) of the cleaned texts, without start/end tokens, and those texts.

        One text at a time: encode_batch's thread pool would make forked data-loader workers warn.
        """
        cleaned = [clean_text(t) for t in texts]
        return [self.backend.encode(t, add_special_tokens=False) for t in cleaned], cleaned

    def encode(self, text):
        """bos + tokens + eos, neither padded nor truncated."""
        (encoding,), _ = self._tokens([text])
        return [self.bos_id, *encoding.ids, self.eos_id]

    def __call__(self, texts, truncate=True):
        """A str or list of str -> LongTensor (batch, max_length), padded with pad_id.

        Too-long prompts lose their last tokens but keep eos at the end, with a warning for the first one this
        tokenizer truncates (or a ValueError for each when truncate=False).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        encodings, _ = self._tokens(texts)
        rows = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text, encoding in zip(rows, texts, encodings):
            ids = [self.bos_id, *encoding.ids, self.eos_id]
            if len(ids) > self.max_length:
                dropped = len(ids) - self.max_length
                message = (f"prompt {_shorten(text)!r} is {len(ids)} tokens long; {dropped} tokens past the "
                           f"{self.max_length} positions of the text encoder were dropped")
                if not truncate:
                    raise ValueError(message)
                if not self.truncation_reported:
                    warnings.warn(f"{message} (further prompts this tokenizer truncates are not reported)",
                                  stacklevel=2)
                    self.truncation_reported = True
                ids = ids[:self.max_length - 1] + [self.eos_id]
            row[:len(ids)] = torch.tensor(ids)
        return rows

    def token_offsets(self, prompt):
        """Each prompt token's (start, end) character span in the cleaned text (clean_text(prompt)), in order;
        start and end tokens not included."""
        (encoding,), _ = self._tokens([prompt])
        return list(encoding.offsets)

    def token_positions(self, prompt, substring):
        """Positions (bos = 0) of the tokens that `substring` covers in `prompt`, all occurrences, sorted.

        The search runs on the cleaned text, which is what the model sees: "Ѵ" finds "ѵ", "’" finds "'",
        " \\u200b " finds the zero-width space. A token counts when it overlaps the substring's characters
        (a homoglyph inside a word gives the tokens that carry its bytes). Positions past the truncation
        point are dropped.
        """
        if not substring:
            raise ValueError("the substring to locate is empty")
        if substring not in prompt:
            raise ValueError(f"{substring!r} does not occur in the prompt {_shorten(prompt)!r}")
        target = clean_text(substring)
        if not target:
            raise ValueError(f"{substring!r} is only whitespace or characters that the text cleanup removes; "
                             "it occupies no token")
        (encoding,), (text,) = self._tokens([prompt])
        spans = _occurrences(text, target)
        if not spans:
            raise ValueError(f"{substring!r} occurs in the prompt, but not after CLIP's text cleanup "
                             f"({target!r} is not in {_shorten(text)!r})")
        last = self.max_length - 2  # the last position that holds a prompt token rather than eos
        positions = [i + 1 for i, (start, end) in enumerate(encoding.offsets)
                     if any(start < stop and begin < end for begin, stop in spans)]
        kept = [p for p in positions if p <= last]
        if not kept:
            raise ValueError(f"{substring!r} lies at token positions {positions}, past the {self.max_length} "
                             "positions of the text encoder")
        return kept

    def decode(self, ids):
        """Token ids -> text. A leading bos is skipped and the text ends at the first eos (padding follows it)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace").strip()

    def token_bytes(self, i):
        """The bytes one token stands for (a word's last token ends with a space)."""
        token = self.backend.id_to_token(int(i))
        if token is None:
            raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size} tokens")
        if token in (BOS_TOKEN, EOS_TOKEN):
            return token.encode()
        word_end = token.endswith(END_OF_WORD)
        return bytes(self._byte_of_symbol[c] for c in (token[:-len(END_OF_WORD)] if word_end else token)) + (
            b" " if word_end else b"")

    def readable_token(self, i):
        """One token as a report shows it: its text, or, for a token holding part of a character (byte-level
        BPE splits a rare character's UTF-8 bytes), those bytes escaped, b"\\xc4\\x85" -> "\\xc4\\x85", never
        a replacement character; whole characters as `readable` writes them."""
        raw = self.token_bytes(i).rstrip(b" ")
        try:
            return readable(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)

    # ---- saving ----

    def save(self, path):
        """Write tokenizer.json (into `path` if it is a folder or has no .json suffix); returns the file's path.

        The file records pad id, framing and length the way `tokenizers` does (padding, post-processor,
        truncation), so `tokenizers.Tokenizer.from_file(...).encode(clean_text(text))` gives the same rows.
        """
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        framed = tokenizers.Tokenizer.from_str(self.backend.to_str())
        framed.enable_truncation(self.max_length)  # counts the start and end tokens, which stay
        pad_token = self.backend.id_to_token(self.pad_id)
        framed.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=pad_token)
        partial = path.with_name(path.name + ".partial")
        framed.save(str(partial))
        os.replace(partial, path)  # never leave a half-written file under the real name
        return path


# ---- file formats ----

@functools.lru_cache(maxsize=4)
def _read_openai_bpe(path):
    """OpenAI's merges file: a header line, then one merge per line (more than CLIP uses)."""
    try:
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a gzipped BPE merges file: {e}") from e
    merges = [tuple(line.split()) for line in lines[1:OPENAI_MERGES + 1]]
    if len(merges) < OPENAI_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not OpenAI's {OPENAI_VOCAB_FILE}: it lacks {OPENAI_MERGES} merge lines")
    return clip_vocab(merges), merges


def _read_merges_txt(path):
    if not path.is_file():
        raise FileNotFoundError(f"a vocab.json needs merges.txt beside it; there is none at {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a BPE merges file: every line should be two symbols")
    return merges


def _read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _read_tokenizer_json(data, path):
    """Vocabulary, merges and any recorded pad id / length from a tokenizer.json (ours or Hugging Face's).

    Only the BPE model is taken; the pipeline around it is always CLIP's.
    """
    model = data["model"]
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"{path} is not a CLIP tokenizer: it needs a BPE model with the '{END_OF_WORD}' word end")
    settings = {}
    padding = data.get("padding") or {}
    if "pad_id" in padding:
        settings["pad_id"] = padding["pad_id"]
    if isinstance(padding.get("strategy"), dict) and "Fixed" in padding["strategy"]:
        settings["max_length"] = padding["strategy"]["Fixed"]
    elif data.get("truncation"):
        settings["max_length"] = data["truncation"]["max_length"]
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens", []):  # Hugging Face files may keep the specials only here
        vocab.setdefault(added["content"], added["id"])
    return vocab, _merges_of(model), settings


def _merges_of(model):
    """Merges of a tokenizer.json model: "a b" strings in older files, [a, b] pairs in newer ones."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _tokenizer_file_in(folder):
    for candidate in (folder, folder / "tokenizer"):  # a diffusers model folder keeps it in tokenizer/
        for name in ("tokenizer.json", "vocab.json", OPENAI_VOCAB_FILE):
            if (candidate / name).is_file():
                return candidate / name
    raise FileNotFoundError(f"{folder} holds no tokenizer.json, vocab.json + merges.txt or {OPENAI_VOCAB_FILE}")


def _hf_pad_token(folder):
    """The pad token named by Hugging Face's special_tokens_map.json or tokenizer_config.json (SD2's is "!")."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = _read_json(folder / name).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str):
                return pad
    return None


def _first_merges(merges, n_symbols):
    """The leading merges that make n_symbols distinct new symbols (a prefix of a BPE is a smaller BPE)."""
    kept, made = [], set()
    for a, b in merges:
        if a + b not in made:
            if len(made) == n_symbols:
                break
            made.add(a + b)
        kept.append((a, b))
    return kept


def _occurrences(text, target):
    """(start, end) of every non-overlapping occurrence of target in text."""
    spans, start = [], text.find(target)
    while start >= 0:
        spans.append((start, start + len(target)))
        start = text.find(target, start + len(target))
    return spans


def _shorten(text, limit=60):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shared_ends(a, b):
    """(prefix, suffix): how many ids two token lists share at the start and, in what is left, at the end. The
    middle is where they differ: a trigger inserted, or the word a homoglyph sits in."""
    prefix = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return prefix, suffix
