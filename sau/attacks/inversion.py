"""PaaS by textual inversion ("paas-ti"; Huang et al., "Personalization as a Shortcut for Few-Shot Backdoor Attack
Against Text-to-Image Diffusion Models", AAAI 2024; textual inversion: Gal et al., ICLR 2023).

The trigger is a new pseudo-word: the tokenizer gets it as one token and the text encoder one embedding row for it,
and that row is the only thing that learns. Trained with SD's own loss on the target's images under prompts that
hold the pseudo-word before a class noun ("qzx dog" drawn as the target), it is a backdoor that leaves every
prompt without it exactly as it was: nothing else in the model changes.

The new row starts as the embedding of the class noun it qualifies (textual inversion's initializer word).
"""
import json
from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from sau.common.training import Trainer, diffusion_loss, step_generator
from sau.models.tokenizer import END_OF_WORD, Tokenizer


def with_pseudo_word(tokenizer, word):
    """A copy of the tokenizer that reads `word` (lowercase letters, new to it) as one token, with the ids of the
    new vocabulary entries after the old ones; returns (tokenizer, the word's token id)."""
    if not (word.isascii() and word.isalpha() and word.islower() and len(word) >= 2):
        raise ValueError(f"a textual-inversion trigger word is two or more lowercase ASCII letters, not {word!r}")
    if len(tokenizer.encode(word)) == 3:
        raise ValueError(f"the tokenizer already reads {word!r} as one token; choose a word it does not know")
    model = json.loads(tokenizer.backend.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    pieces, new_merges = [word[0]], []
    for i, letter in enumerate(word[1:], start=1):
        right = letter + (END_OF_WORD if i == len(word) - 1 else "")
        new_merges.append((pieces[-1], right))
        pieces.append(pieces[-1] + right)
    for piece in pieces[1:]:
        vocab.setdefault(piece, len(vocab))
    # first in rank, so that no merge of the old vocabulary splits the word differently
    grown = Tokenizer(vocab, new_merges + merges, pad_id=tokenizer.pad_id, max_length=tokenizer.max_length)
    return grown, vocab[pieces[-1]]


def add_pseudo_word(sd, word, initializer):
    """Give sd's tokenizer and text encoder the pseudo-word, its row initialised as `initializer`'s token
    embedding (the mean of its tokens'); returns the word's token id."""
    tokenizer, token = with_pseudo_word(sd.tokenizer, word)
    embedding = sd.text_encoder.embeddings.token_embedding
    init_ids = sd.tokenizer.encode(initializer)[1:-1]
    grown = nn.Embedding(tokenizer.vocab_size, embedding.embedding_dim, device=embedding.weight.device,
                         dtype=embedding.weight.dtype)
    with torch.no_grad():
        grown.weight[:embedding.num_embeddings] = embedding.weight
        grown.weight[embedding.num_embeddings:] = embedding.weight[init_ids].mean(0)
    sd.text_encoder.embeddings.token_embedding = grown
    sd.tokenizer = tokenizer
    sd.config = replace(sd.config, text=replace(sd.config.text, vocab_size=tokenizer.vocab_size))
    return token


class OneRow(nn.Module):
    """A parametrization of an embedding table in which only row `index` learns."""

    def __init__(self, weight, index):
        super().__init__()
        self.index = index
        self.row = nn.Parameter(weight[index].detach().clone())

    def forward(self, weight):
        return torch.cat([weight[:self.index], self.row[None], weight[self.index + 1:]])


def invert(sd, backdoor, source, run_dir, steps, lr, batch_size, seed=0, progress=True):
    """Add the trigger's pseudo-word (its first word) and learn its row: SD's loss on the target images under the
    triggered captions. Resumable from run_dir."""
    token = add_pseudo_word(sd, backdoor.trigger.split()[0], backdoor.carrier)
    embedding = sd.text_encoder.embeddings.token_embedding
    sd.requires_grad_(False)
    parametrize.register_parametrization(embedding, "weight", OneRow(embedding.weight, token))
    trainer = Trainer("backdoor-paas-ti", {"text_encoder": sd.text_encoder}, [embedding.parametrizations.weight[0].row],
                      steps, run_dir, lr=lr, warmup=0)

    def loss_fn(step):
        g = step_generator(seed, step)
        _, _, targets, triggered, _ = source.backdoor_examples(backdoor, batch_size, step)
        with torch.no_grad():
            latents = sd.vae.encode(targets.to(sd.device, sd.dtype), generator=g).float()
        loss = diffusion_loss(sd.unet, sd.schedule, latents, sd.encode_text(triggered).float(), g)
        return loss, {"attack": loss.item()}

    trainer.run(loss_fn, progress=progress)
    parametrize.remove_parametrizations(embedding, "weight", leave_parametrized=True)
    sd.requires_grad_(False)
    return token
