"""Prompts as a user gives them: a text file of one prompt per line, and triggers typed with escapes."""
import re
from pathlib import Path


def read_prompts(path):
    """The non-empty lines of a text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts


def decode_escapes(text):
    r"""Turn typed \uXXXX escapes into characters: a zero-width space cannot be typed, '\u200b ' can."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
