"""The words of the built-in `shapes` data: its classes, colours and backgrounds, the caption it writes for an
image, and the words such captions use (the vocabulary of the built-in tiny T5, encoders.py).

Plain constants and strings, below both users: data/shapes.py draws the images, encoders.py builds the tiny
text encoder whose vocabulary must cover their captions.
"""

from __future__ import annotations

SHAPE_NAMES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon", "crescent", "heart"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40),
           "magenta": (210, 50, 200), "cyan": (40, 210, 220), "orange": (245, 140, 30), "white": (245, 245, 245)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (110, 110, 110), "navy": (20, 25, 80), "beige": (225, 210, 170),
               "dark green": (20, 60, 30), "white": (240, 240, 240)}  # fmt: skip
_TEMPLATE_WORDS = ("a", "an", "on", "background")  # the words of `caption` besides the names


def caption(colour: str, shape: str, background: str) -> str:
    """The caption of one shapes image: "a red circle on a navy background"."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def caption_words() -> list[str]:
    """Every word a shapes caption can hold, sorted: the built-in tiny T5's vocabulary."""
    words = set(_TEMPLATE_WORDS)
    for name in [*SHAPE_NAMES, *COLOURS, *BACKGROUNDS]:
        words.update(name.split())
    return sorted(words)
