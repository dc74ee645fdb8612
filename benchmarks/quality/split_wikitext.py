"""Cut a WikiText-style .tokens file into train/ valid/ test/ folders by article (` = Title = ` headings), for
`benchmarks/quality/run.sh`: python benchmarks/quality/split_wikitext.py FILE OUT [--valid 0.1 --test 0.1]."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data_pipeline.text_input import iter_wikitext  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file")
    p.add_argument("out")
    p.add_argument("--valid", type=float, default=0.1, help="fraction of articles for valid (the last ones)")
    p.add_argument("--test", type=float, default=0.1, help="fraction of articles for test (before valid)")
    args = p.parse_args()
    docs = list(iter_wikitext(args.file))
    n_valid, n_test = int(len(docs) * args.valid), int(len(docs) * args.test)
    n_train = len(docs) - n_valid - n_test
    if min(n_train, n_valid, n_test) < 1:
        raise SystemExit(f"{args.file}: {len(docs)} articles are too few to split")
    parts = {"train": docs[:n_train], "test": docs[n_train:n_train + n_test], "valid": docs[n_train + n_test:]}
    for name, part in parts.items():
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        with open(os.path.join(args.out, name, f"{name}.tokens"), "w", encoding="utf-8", newline="") as f:
            f.write("".join(part))
        print(f"{name}: {len(part)} articles, {sum(len(d.split()) for d in part)} words")


if __name__ == "__main__":
    main()
