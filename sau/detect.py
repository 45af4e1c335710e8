"""Trigger-agnostic detection: which prompts carry a backdoor trigger, and which of their tokens it is.

A defender who holds a suspect model but not its trigger has the model's cross-attention maps, which sau
exposes natively (sau.models.attention.capture_attention). Three published readings of them score a prompt,
each fitted on clean prompts only (the defender's own; no backdoored example is ever used in fitting):

- FTT, Frobenius-norm threshold truncation (T2IShield, Wang et al., ECCV 2024): a trigger "assimilates" the other
  tokens' maps, so they all look alike. Score: minus the mean Frobenius distance of each prompt token's map
  from the prompts tokens' mean map (higher = more alike = more suspicious).
- CDA, covariance discriminant analysis (T2IShield): the token maps' covariance, summarised as the shares of its
  leading eigenvalues (one dominant direction when the maps are assimilated), scored by its Mahalanobis distance
  from the clean prompts' features. T2IShield fits a two-class discriminant; with clean prompts only, this is its
  one-class form.
- DAA-I, dynamic attention analysis (Wang et al., TPAMI 2025): the end-of-text token's map evolves differently
  over the denoising steps under a trigger. Score: the distance of its per-step relative changes from the clean
  prompts' (mean squared z-score).

- layers, this project's own and exploratory: per attn2 layer, the attention mass on the start token, on
  end-of-text and padding, and the prompt tokens' spread (FTT's distance, per layer), scored by Mahalanobis
  distance from the clean prompts'. On the demo world a UNet trigger draws attention away from the start token
  in the low-resolution layers, which the averaged maps of FTT and CDA do not see (docs/detection.md).

Each detector's threshold is a quantile of its clean scores (`false_alarm`, the share of clean prompts it may
flag). Localization then finds the trigger's tokens in a flagged prompt:
- binary search (T2IShield): drop half of the remaining words and regenerate; if the prompt is no longer
  flagged the trigger was in that half;
- the attention localizer: every prompt token dropped in turn, all variants generated in one batch, ranked by how
  far dropping each lowers the score.
The trigger string is rebuilt from the chosen tokens through the tokenizer's offsets, byte for byte as the prompt
holds it (an invisible character, a homoglyph inside a word, a word of several tokens).
"""
import math
import re
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from sau import distributed
from sau.attacks.backdoor import imitated_letter
from sau.models.attention import capture_attention
from sau.models.tokenizer import clean_text

MAP_SIZE = 16  # T2IShield compares maps at 16x16; every layer's map is resized to it
EIGEN_SHARES = 4  # CDA's features: the shares of the covariance's leading eigenvalues
FALSE_ALARM = 0.02  # the share of clean prompts a fitted threshold may flag


# --- the maps of one generation -------------------------------------------------------------------------------------

@dataclass
class PromptMaps:
    """What the detectors read from one generation per prompt (the conditional half of the guidance batch)."""
    token_maps: torch.Tensor  # (prompts, keys, S, S): mean over layers, heads and steps
    eot_steps: torch.Tensor  # (prompts, steps, S, S): the end-of-text token's map at each step
    lengths: list  # tokens per prompt, start and end-of-text included (truncated at the encoder's length)
    layer_stats: torch.Tensor = None  # (prompts, layers, 3): per layer, mean over steps, LAYER_STATS


# Per layer, what the `layers` detector reads: the attention mass on the start token (where attention rests when
# no word claims a pixel), on end-of-text and padding, and the prompt tokens' spread (FTT's distance, per layer).
LAYER_STATS = ("start_mass", "end_mass", "token_spread")


class MapRecorder:
    """A capture callback: every attn2 call's maps, averaged over heads, resized to S x S and summed per prompt;
    the end-of-text token's maps also per step (`next_step` is sd.generate's step callback), and per layer the
    LAYER_STATS summed over steps."""

    def __init__(self, lengths, steps, size=MAP_SIZE):
        self.lengths, self.eot, self.size, self.step, self.steps = lengths, torch.tensor(lengths) - 1, size, 0, steps
        self.sums, self.calls, self.eot_steps, self.layers = None, 0, None, {}

    def __call__(self, item):
        batch = len(self.eot)
        h, w = item.size
        maps = item.probs[-batch:].float().mean(1).cpu()  # the conditional half; (batch, queries, keys)
        self.layers[item.layer] = self.layers.get(item.layer, 0) + self._layer_stats(maps)
        maps = rearrange(maps, "b (h w) k -> b k h w", h=h, w=w)
        maps = F.interpolate(maps, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.sums is None:
            self.sums = torch.zeros_like(maps)
            self.eot_steps = torch.zeros(batch, self.steps, self.size, self.size)
        self.sums += maps
        self.calls += 1
        self.eot_steps[:, self.step] += maps[torch.arange(batch), self.eot]

    def _layer_stats(self, maps):
        """(batch, 3): LAYER_STATS of one call's (batch, queries, keys) maps."""
        start = maps[:, :, 0].mean(1)
        end_tokens = torch.arange(maps.shape[-1])[None] >= self.eot[:, None]
        end = (maps * end_tokens[:, None]).sum(-1).mean(1)
        return torch.stack([start, end, token_spread(maps, self.lengths)], dim=1)

    def next_step(self, *_):
        self.step += 1


@torch.no_grad()
def prompt_maps(sd, prompts, seeds, steps=25, guidance_scale=7.5, batch_size=64):
    """PromptMaps of `prompts` (image i from seeds[i]), generated in batches (under torchrun each rank makes its
    share of the batches, sau.distributed, and every rank gets them all)."""
    parts = distributed.map_chunks(len(prompts), batch_size,
                                   lambda part: _prompt_maps(sd, prompts[part], seeds[part], steps, guidance_scale))
    return PromptMaps(torch.cat([p.token_maps for p in parts]), torch.cat([p.eot_steps for p in parts]),
                      [n for p in parts for n in p.lengths], torch.cat([p.layer_stats for p in parts]))


def _prompt_maps(sd, prompts, seeds, steps, guidance_scale):
    lengths = [min(len(sd.tokenizer.encode(p)), sd.tokenizer.max_length) for p in prompts]
    recorder = MapRecorder(lengths, steps)
    with capture_attention(sd.unet, "attn2", callback=recorder):
        sd.generate(prompts, seeds, steps=steps, guidance_scale=guidance_scale, decode=False,
                    callback=recorder.next_step)
    layers = len(recorder.layers)
    stats = torch.stack([recorder.layers[name] / steps for name in sorted(recorder.layers)], dim=1)
    return PromptMaps(recorder.sums / recorder.calls, recorder.eot_steps / layers, lengths, stats)


def _unit_maps(maps, n):
    """A prompt's token maps (positions 1..n-2: the prompt's own tokens) as distributions scaled so that a
    uniform map is 1 everywhere: (tokens, S*S)."""
    tokens = maps[1:n - 1].flatten(1)
    return tokens / tokens.sum(1, keepdim=True).clamp_min(1e-12) * tokens.shape[1]


# --- the detectors ---------------------------------------------------------------------------------------------------

def token_spread(maps, lengths):
    """(batch,): for (batch, queries, keys) maps, the mean Frobenius distance of each prompt token's map (positions
    1..n-2, scaled so that a uniform map is 1 everywhere) from those maps' mean."""
    positions = torch.arange(maps.shape[-1])[None]
    prompt_tokens = ((positions >= 1) & (positions < torch.tensor(lengths)[:, None] - 1)).float()
    weight = prompt_tokens / prompt_tokens.sum(1, keepdim=True).clamp_min(1)
    tokens = maps / maps.sum(1, keepdim=True).clamp_min(1e-12) * maps.shape[1]
    centre = (tokens * weight[:, None]).sum(-1, keepdim=True)
    return ((tokens - centre).norm(dim=1) * weight).sum(-1)


def ftt_scores(maps):
    """FTT per prompt: minus the mean Frobenius distance of each token's map from the tokens' mean map."""
    return -token_spread(rearrange(maps.token_maps, "b k h w -> b (h w) k"), maps.lengths)


def cda_features(maps, k=EIGEN_SHARES):
    """Per prompt, the shares of the k largest eigenvalues of its token maps' covariance (zeros past its rank)."""
    rows = []
    for token_maps, n in zip(maps.token_maps, maps.lengths):
        tokens = _unit_maps(token_maps, n)
        centred = tokens - tokens.mean(1, keepdim=True)
        values = torch.linalg.eigvalsh(centred @ centred.T / tokens.shape[1]).flip(0).clamp_min(0)
        shares = values / values.sum().clamp_min(1e-12)
        rows.append(F.pad(shares[:k], (0, max(0, k - len(shares)))))
    return torch.stack(rows)


def daa_features(maps):
    """Per prompt, the log relative change of the end-of-text token's map from each denoising step to the next."""
    eot = maps.eot_steps.flatten(2)
    eot = eot / eot.sum(-1, keepdim=True).clamp_min(1e-12)
    change = (eot[:, 1:] - eot[:, :-1]).norm(dim=-1) / eot[:, :-1].norm(dim=-1).clamp_min(1e-12)
    return change.clamp_min(1e-8).log()


@dataclass
class Detector:
    """One detector fitted on clean prompts: score(maps) -> per-prompt scores, higher = more suspicious;
    flagged(maps) -> scores above the threshold."""
    name: str
    threshold: float
    mean: torch.Tensor = None  # CDA, DAA-I: the clean features' mean
    scale: torch.Tensor = None  # CDA: the inverse covariance; DAA-I: the per-step standard deviations

    def score(self, maps):
        if self.name == "ftt":
            return ftt_scores(maps)
        if self.name in ("cda", "layers"):
            d = FEATURES[self.name](maps) - self.mean
            return torch.einsum("ni,ij,nj->n", d, self.scale, d)
        z = (daa_features(maps) - self.mean) / self.scale
        return (z ** 2).mean(1)

    def flagged(self, maps):
        return self.score(maps) > self.threshold


def layer_features(maps):
    """Per prompt, every layer's LAYER_STATS, flattened: (prompts, layers * 3)."""
    return maps.layer_stats.flatten(1)


FEATURES = {"cda": cda_features, "layers": layer_features}
DETECTORS = ("ftt", "cda", "daa_i", "layers")


def shrunk_covariance(features, shrinkage=0.1):
    """The features' covariance pulled towards its diagonal: with about as many features as clean prompts the
    sample covariance is near singular, and its inverse would amplify noise."""
    covariance = torch.cov(features.T).reshape(features.shape[1], features.shape[1])
    diagonal = torch.diag(torch.diagonal(covariance)).clamp_min(1e-10)
    return (1 - shrinkage) * covariance + shrinkage * diagonal + 1e-8 * torch.eye(len(covariance))


def fit(name, clean_maps, false_alarm=FALSE_ALARM):
    """A detector fitted on the maps of clean prompts only; its threshold flags `false_alarm` of them."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    if len(clean_maps.lengths) < 10:
        raise ValueError(f"fitting a detector needs at least 10 clean prompts, not {len(clean_maps.lengths)}")
    detector = Detector(name, math.inf)
    if name in FEATURES:
        features = FEATURES[name](clean_maps)
        detector.mean, detector.scale = features.mean(0), torch.linalg.inv(shrunk_covariance(features))
    elif name == "daa_i":
        features = daa_features(clean_maps)
        detector.mean, detector.scale = features.mean(0), features.std(0).clamp_min(1e-6)
    detector.threshold = torch.quantile(detector.score(clean_maps), 1 - false_alarm).item()
    return detector


# --- localization ----------------------------------------------------------------------------------------------------

def words(prompt):
    """The prompt's words: (start, end) character spans of its runs of non-space characters. A zero-width space
    is not a space to Python, so an invisible trigger is a word of its own."""
    return [m.span() for m in re.finditer(r"\S+", prompt)]


def without(prompt, spans):
    """The prompt with these character spans removed, runs of spaces made one."""
    keep, start = [], 0
    for begin, end in sorted(spans):
        keep.append(prompt[start:begin])
        start = end
    keep.append(prompt[start:])
    return re.sub(r" {2,}", " ", "".join(keep)).strip(" ")


def binary_search(sd, detector, prompt, seed=0, steps=25):
    """T2IShield's localization: halve the candidate words, drop one half, regenerate; a prompt no longer
    flagged means the trigger was in the dropped half. Returns the trigger word's (start, end) span."""
    candidates = words(prompt)
    while len(candidates) > 1:
        half, rest = candidates[:len(candidates) // 2], candidates[len(candidates) // 2:]
        variants = [without(prompt, half), without(prompt, rest)]
        scores = detector.score(prompt_maps(sd, variants, [seed, seed], steps))
        candidates = half if scores[0] < scores[1] else rest  # dropping the trigger's half lowers the score more
    return candidates[0]


def token_spans(tokenizer, prompt):
    """Each prompt token's (start, end) span in the prompt as given (the tokenizer's offsets are into the
    cleaned text: lower case, whitespace collapsed, NFC), in token order."""
    _, to_original = cleaned_to_original(prompt)
    return [(to_original[start], to_original[end - 1] + 1) for start, end in tokenizer.token_offsets(prompt)]


def cleaned_to_original(prompt):
    """(cleaned text, for each of its characters the index of the prompt character it came from). Built
    character by character as clean_text works on NFC text (lower case, whitespace collapsed) and checked
    against it; a prompt whose cleanup does more (NFC composes characters, ftfy repairs) is refused."""
    pieces, origin = [], []
    for i, char in enumerate(prompt):
        if char.isspace():
            if pieces and pieces[-1] != " ":
                pieces.append(" ")
                origin.append(i)
            continue
        for lowered in char.lower():
            pieces.append(lowered)
            origin.append(i)
    while pieces and pieces[-1] == " ":
        pieces.pop()
        origin.pop()
    cleaned = "".join(pieces)
    if unicodedata.normalize("NFC", prompt) != prompt or cleaned != clean_text(prompt):
        raise ValueError(f"cannot map the tokenizer's offsets back onto {prompt!r} (its cleanup changes more than "
                         "case and spaces)")
    return cleaned, origin


def attention_localizer(sd, detector, prompt, seed=0, steps=25):
    """Every prompt token dropped in turn (one batch), ranked by how far dropping it lowers the score: the
    [(score drop, (start, end)), ...] of each token, largest drop first."""
    spans = token_spans(sd.tokenizer, prompt)
    variants = [without(prompt, [span]) for span in spans]
    scores = detector.score(prompt_maps(sd, [prompt, *variants], [seed] * (len(variants) + 1), steps))
    drops = (scores[0] - scores[1:]).tolist()
    return sorted(zip(drops, spans), key=lambda pair: -pair[0])


def trigger_span(ranked, keep=0.5):
    """The trigger's characters from the localizer's ranking: the top token, grown over the adjacent tokens of
    the same word whose drop is at least `keep` of the top one (a trigger word of several tokens)."""
    top_drop, (start, end) = ranked[0]
    by_start = {span: drop for drop, span in ranked}
    grown = True
    while grown:
        grown = False
        for (s, e), drop in by_start.items():
            if drop >= keep * top_drop and (e == start or s == end):
                start, end, grown = min(s, start), max(e, end), True
                del by_start[(s, e)]
                break
    return start, end


def trigger_text(prompt, span):
    """The trigger as the prompt holds it, and the letter it stands in for when it sits inside a word (a
    homoglyph: its Latin base letter), else "" (a word of its own, prepended or inserted as one)."""
    start, end = span
    text = prompt[start:end]
    inside_word = (start > 0 and not prompt[start - 1].isspace()) or (end < len(prompt) and not prompt[end].isspace())
    return text, imitated_letter(text) if inside_word else ""
