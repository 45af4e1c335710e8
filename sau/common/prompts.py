"""Prompts as a user gives them: a text file of one prompt per line, and triggers typed with escapes."""
import re
from pathlib import Path


MAX_PROMPTS = 1000  # a prompt file's lines, unless --max-prompts raises it: each prompt is generated (seconds
# on a CPU) and kept in memory, so a huge file is more likely a mistake than a plan
MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens (about 300 characters); a longer line is not a prompt


def read_prompts(path, limit=MAX_PROMPTS):
    """The non-empty lines of a UTF-8 text file, stripped; refused, naming the file, when it is not text, holds
    no prompt, more than `limit` of them, or a line no text encoder would read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the prompts as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    if len(prompts) > limit:
        raise ValueError(f"{path} holds {len(prompts)} prompts, more than the limit of {limit}; pass "
                         f"--max-prompts {len(prompts)} to use them all")
    too_long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if too_long is not None:
        raise ValueError(f"{path}: prompt {too_long + 1} has {len(prompts[too_long])} characters, more than "
                         f"{MAX_PROMPT_CHARS}; the text encoder reads about 300")
    return prompts


def decode_escapes(text):
    r"""Turn typed \uXXXX escapes into characters: a zero-width space cannot be typed, '\u200b ' can."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
