"""The built-in corpus: synthetic English-like documents, deterministic by seed (`trime corpus`).

Designed so each TRIME memory has something to find: documents repeat their own rare names
(local memory), families of documents share names and topic words (external memory / BM25),
and documents span several 128-token segments (long-term memory). Written WikiText-style.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import numpy as np

from trime_dist.core.config import opt
from trime_dist.core.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FUNCTION_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no what "
    "will more can who its into than only other new some could time these two may then do first "
    "any my now such like our over man me even most made after also did many before must through "
    "back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go came "
    "right used take three").split()
ONSETS = ("b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sc sh sl sp st str t "
          "th tr v w wh z").split()
VOWELS = "a e i o u ai ea ie ou oo".split()
CODAS = ("", "", "", "n", "r", "l", "s", "t", "nd", "st", "rk", "m", "ng", "x")


@dataclass
class CorpusConfig:
    out: str = opt("data/corpus", "output directory (train/ valid/ test/)")
    seed: int = opt(0, "random seed: same seed, same corpus")
    scale: float = opt(1.0, "multiplies the number of documents")
    train_files: int = opt(8, "number of train/ text files")
    train_docs: int = opt(320, "training documents at scale 1")
    heldout_docs: int = opt(36, "valid and test documents each at scale 1")
    families: int = opt(32, "topical families (shared names and topic words)")
    doc_words: int = opt(700, "mean words per document")


@dataclass
class Family:
    topic_words: list[str]
    names: list[str]


@dataclass
class Document:
    title: str
    text: str             # WikiText-style text, starting with " = title = "
    family: int
    names: list[str]      # the document's own rare names


# ----------------------------------------------------------------------------- vocabulary

def make_word(rng: np.random.Generator, syllables: int) -> str:
    parts = [str(rng.choice(ONSETS)) + str(rng.choice(VOWELS)) + str(rng.choice(CODAS)) for _ in range(syllables)]
    return "".join(parts)


def unique_words(rng: np.random.Generator, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    """n new words of lo..hi syllables that are not in `taken` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        w = make_word(rng, int(rng.integers(syllables[0], syllables[1] + 1)))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def zipf_probs(n: int, exponent: float = 1.05) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent  # [n]
    return p / p.sum()


@dataclass
class World:
    common: list[str]
    common_p: np.ndarray  # [len(common)] Zipf probabilities
    families: list[Family]
    taken: set[str]       # every word used so far (document names must be new)


def make_world(seed: int, n_families: int) -> World:
    rng = np.random.default_rng([seed, 0])
    taken = set(FUNCTION_WORDS)
    common = list(FUNCTION_WORDS) + unique_words(rng, 1500, (1, 2), taken)
    families = [Family(topic_words=unique_words(rng, 40, (2, 3), taken),
                       names=[w.capitalize() for w in unique_words(rng, 6, (2, 3), taken)])
                for _ in range(n_families)]
    return World(common, zipf_probs(len(common)), families, taken)


# ----------------------------------------------------------------------------- documents

def sentence(rng: np.random.Generator, world: World, fam: Family, names: list[str]) -> str:
    """One sentence: Zipfian common words mixed with topic words and (repeated) names."""
    words = []
    name_p = zipf_probs(len(names), 1.0)
    for _ in range(int(rng.integers(8, 22))):
        u = rng.random()
        if u < 0.10:
            words.append(names[rng.choice(len(names), p=name_p)])
        elif u < 0.14:
            words.append(str(rng.choice(fam.names)))
        elif u < 0.26:
            words.append(str(rng.choice(fam.topic_words)))
        else:
            words.append(world.common[rng.choice(len(world.common), p=world.common_p)])
        if rng.random() < 0.06:
            words.append(",")
    words[0] = words[0][0].upper() + words[0][1:]
    return " ".join(words) + " ."


def paragraph(rng: np.random.Generator, world: World, fam: Family, names: list[str], n_words: int) -> str:
    sentences, count = [], 0
    while count < n_words:
        sentences.append(sentence(rng, world, fam, names))
        count += sentences[-1].count(" ") + 1
    return " " + " ".join(sentences) + " \n"


def make_document(seed: int, split: int, index: int, world: World, n_words: int) -> Document:
    """Document `index` of split (0 train, 1 valid, 2 test): depends only on (seed, split, index)."""
    rng = np.random.default_rng([seed, 1 + split, index])
    family = int(rng.integers(len(world.families)))
    fam = world.families[family]
    names = [w.capitalize() for w in unique_words(rng, 5, (2, 3), set(world.taken))]
    title = f"{names[0]} {fam.names[0]}"
    parts = [f" = {title} = \n \n"]
    total = int(n_words * rng.uniform(0.6, 1.4))
    for p in range(max(3, round(total / 150))):  # >= 450 words: several 128-token segments
        if p > 0 and p % 2 == 0:
            parts.append(f" \n = = {str(rng.choice(fam.topic_words)).capitalize()} = = \n \n")
        parts.append(paragraph(rng, world, fam, names, 150))
    return Document(title, "".join(parts) + " \n", family, names)


def make_documents(seed: int, split: int, n: int, world: World, n_words: int) -> list[Document]:
    return [make_document(seed, split, i, world, n_words) for i in range(n)]


# ----------------------------------------------------------------------------- writing

def write_split(docs: list[Document], directory: str, n_files: int, prefix: str) -> list[str]:
    """Write documents in contiguous blocks into n_files WikiText-style text files; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, block in enumerate(np.array_split(np.arange(len(docs)), n_files)):
        path = os.path.join(directory, f"{prefix}-{i:02d}.txt" if n_files > 1 else f"{prefix}.txt")
        atomic_write_text(path, " \n" + "".join(docs[j].text for j in block))
        paths.append(path)
    return paths


def write_corpus(cfg: CorpusConfig) -> dict:
    """Generate and write train/ valid/ test/; returns the summary also written to corpus.json."""
    if cfg.scale <= 0 or cfg.train_files < 1:
        raise ValueError(f"corpus: scale must be > 0 and train_files >= 1 (got {cfg.scale}, {cfg.train_files})")
    world = make_world(cfg.seed, cfg.families)
    n_train = max(cfg.train_files, round(cfg.train_docs * cfg.scale))
    n_held = max(1, round(cfg.heldout_docs * cfg.scale))
    summary = {"seed": cfg.seed, "scale": cfg.scale, "families": cfg.families, "splits": {}}
    for split, (name, n, n_files) in enumerate([("train", n_train, cfg.train_files),
                                                ("valid", n_held, 1), ("test", n_held, 1)]):
        docs = make_documents(cfg.seed, split, n, world, cfg.doc_words)
        files = write_split(docs, os.path.join(cfg.out, name), n_files, name)
        words = sum(len(d.text.split()) for d in docs)
        summary["splits"][name] = {"files": [os.path.relpath(f, cfg.out) for f in files],
                                   "documents": n, "words": words}
        log.info("corpus %s: %d documents, %d words, %d files", name, n, words, len(files))
    atomic_write_json(os.path.join(cfg.out, "corpus.json"), summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trime_dist.core.flags import add_dataclass_flags

    add_dataclass_flags(parser, CorpusConfig)


def run(args: argparse.Namespace) -> int:
    from trime_dist.core.flags import dataclass_from_flags

    write_corpus(dataclass_from_flags(CorpusConfig, args))
    return 0
