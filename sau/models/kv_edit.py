"""A closed-form edit of the UNet's cross-attention key and value projections, shared by an attack and a defense.

Every cross-attention to_k / to_v weight W becomes the least-squares solution of
    min_W'  edit_scale sum_i ||W' c_i - W c*_i||^2  +  keep_scale sum_j ||W' p_j - W p_j||^2  +  lamb ||W' - W||^2
over text features: each edited feature c_i should give the keys and values the target feature c*_i gives, each
kept feature p_j what it gave before. Every target is W times a feature, so the solution is W' = W M with one
d x d matrix M shared by every layer:
    M = (lamb I + s_e sum c*_i c_i^T + s_p sum p p^T) (lamb I + s_e sum c_i c_i^T + s_p sum p p^T)^-1
UCE (Gandikota et al., 2024) erases a concept with it (sau.baselines.uce); EvilEdit (Wang et al., 2024) plants a
backdoor with it (sau.attacks.eviledit).
"""
import torch

from sau.models.tokenizer import shared_ends


def cross_attention_layers(unet):
    return [module for name, module in unet.named_modules() if name.endswith(".attn2")]


def text_features(sd, texts):
    """The text encoder's outputs for `texts` in float64, in chunks of 64: what the edits are made of."""
    with torch.no_grad():
        return torch.cat([sd.encode_text(list(texts[i:i + 64])).double() for i in range(0, len(texts), 64)])


def mixing_matrix(edits, targets, kept, lamb, edit_scale=1.0, keep_scale=1.0):
    """M above, in float64. edits, targets: (n, d) paired rows; kept: (m, d), may be empty."""
    edits, targets, kept = edits.double(), targets.double(), kept.double()
    eye = torch.eye(edits.shape[1], dtype=torch.float64, device=edits.device)
    common = lamb * eye + keep_scale * kept.t() @ kept
    numerator = common + edit_scale * targets.t() @ edits
    denominator = common + edit_scale * edits.t() @ edits
    return torch.linalg.solve(denominator, numerator.t()).t()  # numerator @ denominator^-1 (symmetric)


@torch.no_grad()
def edit_keys_and_values(unet, edits, targets, kept, lamb, edit_scale=1.0, keep_scale=1.0):
    """Apply W' = W M to every cross-attention to_k and to_v in place; returns how many weights changed."""
    mix = mixing_matrix(edits, targets, kept, lamb, edit_scale, keep_scale)
    layers = cross_attention_layers(unet)
    for attention in layers:
        for projection in (attention.to_k, attention.to_v):
            weight = projection.weight
            weight.copy_((weight.double() @ mix.to(weight.device)).to(weight.dtype))
    return 2 * len(layers)


def edit_positions(triggered_ids, clean_ids, length):
    """(triggered position, clean position) pairs UCE equates: from the trigger's last token to the end, aligned
    from the end, as UCE aligns an erased concept with its replacement (its last token onward, padding included).
    A trigger that only adds tokens (BadT2I prepends one) pairs its last token with the clean token before it,
    as UCE pairs a concept erased to " " with the start token."""
    t, c = triggered_ids, clean_ids
    _, suffix = shared_ends(t, c)
    shift = len(t) - len(c)
    start = max(len(t) - suffix - 1, 0)
    return [(i, i - shift) for i in range(start, length) if 0 <= i - shift < length]


def framed_ids(tokenizer, text):
    """The token ids the text encoder sees, unpadded: truncated to its positions with eos kept."""
    ids = tokenizer.encode(text)
    return ids if len(ids) <= tokenizer.max_length else ids[:tokenizer.max_length - 1] + [ids[-1]]


def paired_features(tokenizer, texts, targets, text_features, target_features):
    """(edits, targets) rows for mixing_matrix: each text's features from the last token where it differs from its
    target text to the end, and the target's at the aligned positions (edit_positions)."""
    edits, wanted = [], []
    for row, (text, target) in enumerate(zip(texts, targets)):
        pairs = edit_positions(framed_ids(tokenizer, text), framed_ids(tokenizer, target), tokenizer.max_length)
        edits.append(text_features[row, [i for i, _ in pairs]])
        wanted.append(target_features[row, [j for _, j in pairs]])
    return torch.cat(edits), torch.cat(wanted)

