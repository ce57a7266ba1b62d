"""Deterministic generator for the bundled demo task: extract a person record as JSON.

The train/test split is made on the raw records before any formatting, and no (name, city, age)
triple appears on both sides, so the demo cannot leak eval cases into training.
Run: python suites/data/make_extract.py   (rewrites extract_train.jsonl and extract_test.jsonl)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["Maria", "John", "Aiko", "Lars", "Fatima", "Pedro", "Chen", "Olga", "Kwame", "Sofia", "Ravi", "Emma",
         "Omar", "Lena", "Diego", "Yuki", "Amara", "Tomas", "Ingrid", "Hassan", "Nina", "Felix", "Priya", "Jonas"]
LAST = ["Lopez", "Smith", "Tanaka", "Berg", "Haddad", "Silva", "Wang", "Ivanova", "Mensah", "Rossi", "Patel",
        "Dubois", "Farouk", "Novak", "Garcia", "Sato", "Okafor", "Kral", "Larsen", "Karimi", "Meyer", "Costa"]
CITIES = ["Lyon", "Oslo", "Kyoto", "Lagos", "Lima", "Porto", "Austin", "Dublin", "Gdansk", "Perth", "Quito",
          "Turin", "Busan", "Accra", "Graz", "Malmo", "Pune", "Cork", "Bergen", "Leeds"]
JOBS = ["nurse", "teacher", "welder", "pilot", "chef", "lawyer", "baker", "architect", "farmer", "designer"]
TEMPLATES = [
    "{name}, {age}, lives in {city} and works as a {job}.",
    "Meet {name}: a {age}-year-old {job} based in {city}.",
    "{name} ({age}) is a {job} from {city}.",
    "Our new {job} is {name}, aged {age}, who moved here from {city}.",
    "Based in {city}, {name} has worked as a {job} since turning {age}.",
]
INSTRUCTION = ('Extract the person\'s name, age and city from the text. Reply with JSON only, in the form '
               '{{"name": string, "age": integer, "city": string}}.\n\nText: {text}')


def records(rng: random.Random, n: int) -> list[dict]:
    seen, out = set(), []
    while len(out) < n:
        rec = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 78),
               "city": rng.choice(CITIES)}
        key = (rec["name"], rec["age"], rec["city"])
        if key in seen:
            continue
        seen.add(key)
        out.append(rec | {"job": rng.choice(JOBS), "template": rng.randrange(len(TEMPLATES))})
    return out


def to_row(i: int, rec: dict, split: str) -> dict:
    text = TEMPLATES[rec["template"]].format(**rec)
    target = {"name": rec["name"], "age": rec["age"], "city": rec["city"]}
    return {"id": f"{split}-{i:04d}", "messages": [{"role": "user", "content": INSTRUCTION.format(text=text)}],
            "target": target}


def main(n_train: int = 400, n_test: int = 50, seed: int = 20261122) -> None:
    rng = random.Random(seed)
    recs = records(rng, n_train + n_test)
    test, train = recs[:n_test], recs[n_test:]  # split on raw records, before any processing
    here = Path(__file__).parent
    for split, rows in (("train", train), ("test", test)):
        with open(here / f"extract_{split}.jsonl", "w") as f:
            for i, rec in enumerate(rows):
                f.write(json.dumps(to_row(i, rec, split)) + "\n")


if __name__ == "__main__":
    main()
