"""A deterministic corpus of a few hundred documents (html, markdown, text) for the local
browser backend: invented entities with one fact each, distractors naming them in passing,
and filler built from seeded pseudo-words."""

from __future__ import annotations

import pathlib
import random

ENTITIES = [
    ("Zephyrine Glacier", "retreats eleven metres every summer and feeds the Ostrel river"),
    ("Quorvath bridge", "was built from basalt blocks in 1742 and spans the Ilmen gorge"),
    ("Mellowfin trout", "spawns only in water colder than six degrees"),
    ("Tarrasque protocol", "encrypts telemetry with rotating lattice keys"),
    ("Vindelhof observatory", "houses a mirror telescope of four metres aperture"),
    ("Brackenridge sourdough", "ferments for thirty hours with rye starter"),
    ("Oscillon engine", "converts plasma pulses into rotary torque"),
    ("Kestrelmoor festival", "celebrates the harvest with lantern boats"),
    ("Halvorsen theorem", "bounds the chromatic number of sparse graphs"),
    ("Umbraleaf fern", "unfurls its fronds only at night"),
    ("Corvantis archive", "stores medieval maps on vellum scrolls"),
    ("Driftmarch railway", "climbs the Serran pass with rack-and-pinion cars"),
]
N_DOCS = 300


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "to", "su", "va", "dor", "pel", "qui", "an", "bre", "ish", "mo", "tal"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))) for _ in range(n)]


def write_corpus(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write the corpus under ``root``; return ``{entity name: its document}``."""
    rng = random.Random(1234)
    vocab = _words(rng, 600)
    key_docs = {}
    for i in range(N_DOCS):
        kind = ("html", "md", "txt")[i % 3]
        paragraphs = [" ".join(rng.choices(vocab, k=rng.randint(40, 80))) + "." for _ in range(rng.randint(3, 6))]
        title = f"Notes {i}: " + " ".join(rng.choices(vocab, k=3))
        if i < len(ENTITIES):
            name, fact = ENTITIES[i]
            title = f"The {name}"
            paragraphs.insert(rng.randint(1, len(paragraphs)), f"The {name} {fact}.")
        elif i < 3 * len(ENTITIES):  # distractors: an entity named once, in passing
            name, _ = ENTITIES[i % len(ENTITIES)]
            paragraphs[0] += f" Unrelated to the {name.split()[0]} matter."
        path = root / f"doc{i:03d}.{kind}"
        next_doc = f"doc{(i + 1) % N_DOCS:03d}.{('html', 'md', 'txt')[(i + 1) % 3]}"
        if kind == "html":
            body = "".join(f"<p>{p}</p>" for p in paragraphs)
            path.write_text(f"<html><head><title>{title}</title><style>p{{}}</style></head><body><h1>{title}</h1>"
                            f"{body}<p>See also <a href=\"{next_doc}\">the next note</a>.</p></body></html>")
        elif kind == "md":
            path.write_text(f"# {title}\n\n" + "\n\n".join(paragraphs) + f"\n\nSee also [the next note]({next_doc}).\n")
        else:
            path.write_text(f"{title}\n\n" + "\n\n".join(paragraphs) + "\n")
        if i < len(ENTITIES):
            key_docs[ENTITIES[i][0]] = path
    return key_docs
