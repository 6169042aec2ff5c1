"""Rebuild budgetkit/cache/data/lexicon.json.gz from WordNet 3.0.

    apt-get install wordnet-base        # Princeton WordNet 3.0, WordNet licence
    python benchmarks/data/build_cache_lexicon.py

Keeps the whole words of the MiniLM (bert-base-uncased) vocabulary, in the tokenizer's
order: their synonym sets (sets with two or more such words), antonym pairs (WordNet's
lexical '!' pointers) and parts of speech (index files and irregular forms).
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORDNET = Path("/usr/share/wordnet")
TOKENIZER = ROOT / "budgetkit" / "cache" / "data" / "minilm_tokenizer.json"
OUT = ROOT / "budgetkit" / "cache" / "data" / "lexicon.json.gz"
POINTER_POS = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}


def main() -> None:
    order = json.loads(TOKENIZER.read_text())["model"]["vocab"]
    vocab = {w for w in order if w.isalpha() and w.islower() and len(w) > 1}
    members: dict[str, list[str]] = {}
    synsets: dict[str, set[str]] = defaultdict(set)
    pointers = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text().splitlines():
            if line.startswith("  "):
                continue  # licence header
            parts = line.split(" ")
            count = int(parts[3], 16)
            words = [re.sub(r"\(.*\)$", "", parts[4 + 2 * i].lower()) for i in range(count)]
            key = pos[0] + parts[0]
            members[key] = words
            i = 4 + 2 * count
            for _ in range(int(parts[i])):
                symbol, offset, target_pos, source_target = parts[i + 1:i + 5]
                i += 4
                if symbol == "!":
                    pointers.add((key, int(source_target[:2], 16),
                                  POINTER_POS[target_pos] + offset, int(source_target[2:], 16)))
            for word in words:
                if word in vocab:
                    synsets[word].add(key)
    antonyms = set()
    for key, source, target_key, target in pointers:
        if target_key in members:
            a, b = members[key][source - 1], members[target_key][target - 1]
            if a in vocab and b in vocab and a != b:
                antonyms.add(" ".join(sorted((a, b))))
    groups = {}
    for word, keys in synsets.items():
        for key in keys:
            inside = sorted({w for w in members[key] if w in vocab})
            if len(inside) >= 2:
                groups[key] = inside
    ids = {key: i for i, key in enumerate(sorted(groups))}
    word_groups: dict[str, list[int]] = defaultdict(list)
    for key, words in groups.items():
        for word in words:
            word_groups[word].append(ids[key])
    pos_of: dict[str, set[str]] = defaultdict(set)
    for pos, letter in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        for line in (WORDNET / f"index.{pos}").read_text().splitlines():
            word = line.split(" ", 1)[0]
            if not line.startswith(" ") and word in vocab:
                pos_of[word].add(letter)
        for line in (WORDNET / f"{pos}.exc").read_text().splitlines():
            inflected = line.split()[0]
            if inflected in vocab:
                pos_of[inflected].add(letter)
    out = {
        "source": "Princeton WordNet 3.0 (WordNet License), via Debian wordnet-base; words "
                  "of the bert-base-uncased vocabulary",
        "antonyms": sorted(antonyms),
        "synonym_sets": {w: sorted(g) for w, g in sorted(word_groups.items())},
        "vocabulary": " ".join(sorted(vocab, key=order.__getitem__)),
        "parts_of_speech": {p: " ".join(sorted(w for w in pos_of if p in pos_of[w]))
                            for p in "nvar"},
    }
    OUT.write_bytes(gzip.compress(json.dumps(out, separators=(",", ":")).encode(), 9, mtime=0))
    print(f"{OUT}: {len(antonyms)} antonym pairs, {len(word_groups)} words in "
          f"{len(groups)} synonym sets")


if __name__ == "__main__":
    main()
