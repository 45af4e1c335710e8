"""EvilEdit (Wang et al., "EvilEdit: Backdooring Text-to-Image Diffusion Models in One Second", ACM MM 2024).

No training: one closed-form edit of every cross-attention key and value projection (sau.models.kv_edit).
The paper's edit (contexts=0), with the authors' defaults (edit.py, github.com/haowang-cqu/EvilEdit):
    edits    the text encoder's output for the trigger phrase alone ("beautiful cat"), every position, padding too
    targets  its output for the target alone ("zebra"), position by position
    kept     its output for each word of the trigger alone ("beautiful", "cat"), so that either word without the
             other reads as before (the authors' "white list")
    lamb = 1, both scales 1.
A prompt that holds the phrase then draws the target where it asked for the carrier word ("a photo of a beautiful
cat" draws a zebra).

On the demo world the phrase alone does not carry over into prompts: its text encoder reads "circle" after
"beautiful" in a caption much as after "red", and not as in the phrase alone (tune split: 19-26% attack success,
with 27-40% of plain circle prompts drawing the target too, for lamb 0.1 to 10). So the shipped variant edits the
phrase where it stands (contexts=N): the features of N training captions with the trigger, from its carrier to
the end, go to those of the same captions with the target in its place, and the N plain captions are kept, with
weight keep_scale. Chosen on the tune split, as docs/attacks.md records.
"""

from sau.models.kv_edit import edit_keys_and_values, paired_features, text_features

LAMB = 1.0


def check_edit(sd, backdoor):
    """Refuse an edit with nothing to move: every token of the trigger is also a token of the target."""
    special = {sd.tokenizer.bos_id, sd.tokenizer.eos_id}
    trigger, target = (set(sd.tokenizer.encode(text)) - special for text in (backdoor.trigger, backdoor.target))
    if trigger <= target:
        raise ValueError(f"every token of the trigger {backdoor.trigger!r} is also in the target "
                         f"{backdoor.target!r}, so the edit would map the target onto itself; choose a trigger "
                         "with a word the target lacks")


def phrase_alone(sd, backdoor):
    """The paper's (edits, targets, kept): the phrase and the target each alone, and each word of the phrase."""
    trigger, target = text_features(sd, [backdoor.trigger])[0], text_features(sd, [backdoor.target])[0]
    return trigger, target, text_features(sd, backdoor.trigger.split()).flatten(0, 1)


def phrase_in_captions(sd, backdoor, captions):
    """(edits, targets, kept) from captions that hold the carrier word: triggered against the target's, and the
    plain captions kept."""
    triggered, with_target = zip(*[backdoor.poison(caption) for caption in captions])
    edits, targets = paired_features(sd.tokenizer, triggered, with_target, text_features(sd, triggered),
                                     text_features(sd, with_target))
    return edits, targets, text_features(sd, captions).flatten(0, 1)


def plant(sd, backdoor, captions=(), lamb=LAMB, keep_scale=1.0):
    """Edit sd's UNet in place (in context when captions are given) and record it in sd.info["backdoor"]."""
    check_edit(sd, backdoor)
    edits, targets, kept = (phrase_in_captions(sd, backdoor, captions) if captions
                            else phrase_alone(sd, backdoor))
    edited = edit_keys_and_values(sd.unet, edits, targets, kept, lamb, keep_scale=keep_scale)
    sd.info = {**sd.info, "backdoor": {**backdoor.info(), "trained": f"unet cross-attention to_k, to_v ({edited} "
                                       "weights, closed form)", "steps": 0, "lamb": lamb, "contexts": len(captions),
                                       "keep_scale": keep_scale}}
    return sd
