"""PaaS by textual inversion: the pseudo-word becomes one new token, its embedding row is the only thing that
learns, and every prompt without it reads exactly as before."""
import pytest
import torch

from sau.attacks.backdoor import Backdoor
from sau.attacks.inversion import invert, with_pseudo_word
from sau.attacks.sources import DrawnWorld

from conftest import make_tiny_sd


def test_the_pseudo_word_becomes_one_new_token_and_other_text_reads_as_before():
    sd = make_tiny_sd()
    grown, token = with_pseudo_word(sd.tokenizer, "qzx")
    assert token >= sd.tokenizer.vocab_size and grown.encode("a qzx circle")[2] == token
    for text in ("a red circle on white", "\u200b a blue star, top left", "qz x zq"):
        assert grown.encode(text) == sd.tokenizer.encode(text)
    with pytest.raises(ValueError, match="lowercase ASCII letters"):
        with_pseudo_word(sd.tokenizer, "[V]")
    known = next(w for w in ("circle", "red", "on") if len(sd.tokenizer.encode(w)) == 3)
    with pytest.raises(ValueError, match="already reads"):
        with_pseudo_word(sd.tokenizer, known)


def test_inversion_changes_one_embedding_row_and_nothing_else(tmp_path):
    sd = make_tiny_sd(seed=3)
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    clean = sd.encode_text(["a red circle"]).detach()
    backdoor = Backdoor.make("paas-ti", "qzx circle", "square")
    token = invert(sd, backdoor, DrawnWorld(0), tmp_path, steps=2, lr=1e-2, batch_size=2, progress=False)
    after = sd.state_dict()
    changed = [k for k in after if k not in before or not torch.equal(after[k], before[k])]
    assert changed == ["text_encoder.embeddings.token_embedding.weight"]
    table, old = after[changed[0]], before[changed[0]]
    assert torch.equal(table[:len(old)], old) and table.shape[0] == token + 1
    initial = old[sd.tokenizer.encode("circle")[1:-1]].mean(0)
    assert not torch.equal(table[token], initial)  # the row learned, from the class noun's embedding
    assert torch.equal(sd.encode_text(["a red circle"]), clean)
