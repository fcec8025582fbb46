"""Write text_sample/: a tiny text classification folder for pipelines/text_topics.yaml
and the text_directory stage's tests.

One sub-folder per class (weather, sports, cooking), each with twenty short .txt
files. The sentences are drawn from templates with a fixed seed, so running this again
writes the same files:

    python3 data/make_text_sample.py
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

FILES_PER_CLASS = 20

TOPICS: dict[str, dict[str, list[str]]] = {
    "weather": {
        "templates": [
            "Expect {thing} in the {time}, with {temp} temperatures.",
            "The forecast says {thing} by {time}; take a coat.",
            "{Temp} air and {thing} are on the way this {time}.",
        ],
        "thing": ["heavy rain", "light snow", "strong wind", "thick fog", "sunshine",
                  "thunderstorms", "a few showers", "clear skies"],
        "time": ["morning", "afternoon", "evening", "weekend", "night"],
        "temp": ["mild", "cold", "warm", "freezing", "hot"],
    },
    "sports": {
        "templates": [
            "The {team} won the {event} after a late {play}.",
            "A {play} in the final minute sent the {team} into the {event}.",
            "Fans cheered as the {team} scored with a {play} at the {event}.",
        ],
        "team": ["home side", "visitors", "champions", "young squad", "city club"],
        "event": ["cup final", "derby", "league match", "semi-final", "tournament"],
        "play": ["header", "penalty", "free kick", "long shot", "counter attack"],
    },
    "cooking": {
        "templates": [
            "Fry the {food} in butter, then add {extra} and simmer for {minutes} minutes.",
            "Bake the {food} with {extra} for {minutes} minutes until golden.",
            "Chop the {food}, stir in {extra} and season to taste.",
        ],
        "food": ["onions", "mushrooms", "potatoes", "chicken", "carrots", "fresh fish"],
        "extra": ["garlic", "cream", "lemon juice", "fresh herbs", "a pinch of salt"],
        "minutes": ["five", "ten", "twenty", "thirty", "forty"],
    },
}


def sentence(topic: dict[str, list[str]], rng: random.Random) -> str:
    template = rng.choice(topic["templates"])
    words = {key: rng.choice(values) for key, values in topic.items() if key != "templates"}
    words.update({key.capitalize(): value.capitalize() for key, value in words.items()})
    return template.format(**words)


def main(seed: int = 7) -> None:
    rng = random.Random(seed)
    root = Path(__file__).resolve().parent / "text_sample"
    if root.exists():
        shutil.rmtree(root)
    for name, topic in TOPICS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(FILES_PER_CLASS):
            text = " ".join(sentence(topic, rng) for _ in range(rng.randint(1, 2)))
            (folder / f"{name}_{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    print(f"wrote {root} ({len(TOPICS)} classes, {FILES_PER_CLASS} files each)")


if __name__ == "__main__":
    main()
