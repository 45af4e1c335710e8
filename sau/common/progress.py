"""Progress bars counted in images, that move with every denoising step: a long generation (collection,
evaluation) shows progress from its first seconds, not after its first batch of a hundred images."""
from tqdm import tqdm

from sau.distributed import is_main


def image_bar(total, desc, enabled=True):
    """A tqdm bar over `total` images (a context manager); disabled when not `enabled`, and on every torchrun
    rank but 0."""
    return tqdm(total=total, desc=desc, unit="image", disable=not (enabled and is_main()), dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total} images [{elapsed}<{remaining}]")


def advance(bar, images):
    """Move the bar by a fraction of an image (a denoising step's worth), never past its end: float steps add
    up to a hair over it."""
    bar.update(min(images, bar.total - bar.n))
