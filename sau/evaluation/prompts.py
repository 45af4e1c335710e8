"""Built-in prompts: what SAU collects on and reads when the user gives none."""
from sau.world import shapes

# A few everyday prompts for data-free attacks on a real model without --data or --prompts
DEFAULT_PROMPTS = ["a photo of a dog on the beach", "a cat sleeping on a sofa", "a red car parked on a city street",
                   "a bowl of fruit on a wooden table", "a mountain lake at sunrise", "a portrait of an old man",
                   "a house with a garden in spring", "a boat on the ocean at sunset", "a bird sitting on a branch",
                   "a cup of coffee next to a book", "a horse running in a field", "a snowy forest road"]


def builtin_prompts(sd, n, seed):
    """n prompts to collect on: the demo world's own captions (a stream evaluation never sees), or everyday
    ones for a real model."""
    if sd.config.family == "demo":
        _, captions, _ = shapes.batch(n, seed=1000 + seed)
        return captions
    return (DEFAULT_PROMPTS * (n // len(DEFAULT_PROMPTS) + 1))[:n]
