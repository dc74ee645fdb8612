"""Each attack of issue 19 on the data locations, through the `trime` command line, with its refusal line.

    python benchmarks/security.py --work /tmp/trime_security --out benchmarks/security_table.md

An attacker controls only a manifest.json and its shards, served by a real localhost http.server or copied
into a local folder (a downloaded dataset). Each row runs one stage on such data in a fresh process and reports
its exit status, whether the sentinel file the attack would create exists, whether the attacker's other host
was asked for anything, and the stage's error line. tests/test_untrusted_data.py asserts the same for every
stage; this script prints the table RESULTS.md records.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "helpers"))


def trime(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trime_dist.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {})))


def edited_copy(src: str, dst: str, edit) -> str:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    path = os.path.join(dst, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest, dst)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return dst


def shard_name(name):
    def edit(manifest, _):
        manifest["shards"][0]["path"] = name
    return edit


def tokenizer_name(name):
    def edit(manifest, _):
        manifest["tokenizer"]["file"] = name
    return edit


def flip_byte(manifest, folder):
    path = os.path.join(folder, manifest["shards"][0]["path"])
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    raw[700] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(raw))


def symlink_out(target):
    def edit(manifest, folder):
        path = os.path.join(folder, manifest["shards"][0]["path"])
        os.remove(path)
        os.symlink(target, path)
    return edit


def main() -> None:
    from http_folder import serve
    from shard_fixtures import write_pattern_splits

    from trime_dist.model.config import ModelConfig
    from trime_dist.model.export import export_model
    from trime_dist.model.transformer import build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/trime_security")
    p.add_argument("--out", default="")
    args = p.parse_args()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    write_pattern_splits(work, real_tokenizer=True, valid_real_tokenizer=True)
    honest = os.path.join(work, "train")
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ffn=32, max_seq_len=32)
    run = os.path.join(work, "run")
    export_model(build_model(cfg, seed=0).state_dict(), cfg, run,
                 {"step": 0, "tokenizer_sha256": None, "train_manifest_sha256": "x", "seq_len": 32})
    secret = os.path.join(work, "secret.txt")
    with open(secret, "w") as f:
        f.write("the node's secret\n")
    sentinel = os.path.join(work, "PWNED")
    tiny = os.path.join(REPO, "configs", "tiny.yaml")

    def eval_cmd(data):
        return ["eval", "--data", data, "--model", run, "--memory", "local", "--out", f"{work}/out/eval.json"]

    def train_cmd(data):
        return ["train", "--config", tiny, f"data.train={data}", "data.valid=", f"run.out_dir={work}/out/run",
                "run.max_steps=1", "model.max_seq_len=32", "model.d_model=16", "model.d_ffn=32",
                "model.n_heads=2", "deepspeed.zero_stage=0", "data.shuffle_shards=false"]

    rows = []
    t0 = time.time()
    os.makedirs(os.path.join(work, "other_host"))  # the host a hostile manifest would send the nodes to
    redirects = {"/redirected/manifest.json": f"file://{honest}/manifest.json"}
    with serve(os.path.join(work, "other_host")) as other, serve(work, redirects=redirects) as bucket:
        attacks = [  # (attack, where the data is, how the manifest is edited, command builder, stage)
            ("shard name `pipe:touch FILE`", "http", shard_name(f"pipe:touch {sentinel}"), eval_cmd),
            ("shard name `pipe:touch FILE`", "http", shard_name(f"pipe:touch {sentinel}"), train_cmd),
            ("shard name `pipe:touch FILE`", "folder", shard_name(f"pipe:touch {sentinel}"), eval_cmd),
            ("shard name `shard.tar; touch FILE`", "http", shard_name(f"shard.tar; touch {sentinel}"), eval_cmd),
            ("shard name `$(touch FILE)shard.tar`", "pipe", shard_name(f"$(touch {sentinel})shard.tar"), eval_cmd),
            ("absolute shard name (a file on the node)", "http", shard_name(secret), eval_cmd),
            ("`../` shard name", "folder", shard_name("../secret.txt"), eval_cmd),
            ("URL-encoded `..` (`%2e%2e/`)", "http", shard_name("%2e%2e/secret.txt"), eval_cmd),
            ("shard name that is another host's URL", "http", shard_name(f"{other.url}/x.tar"), eval_cmd),
            ("symlink in a downloaded folder pointing outside", "folder", symlink_out(secret), eval_cmd),
            ("`tokenizer.file` = a local secret", "http", tokenizer_name(secret), train_cmd),
            ("`tokenizer.file` = `pipe:cat SECRET`", "folder", tokenizer_name(f"pipe:cat {secret}"), train_cmd),
            ("a shard modified after its manifest was written", "http", flip_byte, eval_cmd),
            ("a shard modified after its manifest was written", "folder", flip_byte, train_cmd),
        ]
        for i, (attack, kind, edit, cmd) in enumerate(attacks):
            folder = edited_copy(honest, os.path.join(work, f"evil{i}"), edit)
            data = {"http": f"{bucket.url}/evil{i}", "folder": folder,
                    "pipe": f"pipe:cat {folder}/manifest.json"}[kind]
            shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
            rows.append((attack, kind, *check(trime(cmd(data)), sentinel, other, work, bucket.url)))
        rows.append(("redirect to `file:`", "http",
                     *check(trime(eval_cmd(f"{bucket.url}/redirected")), sentinel, other, work, bucket.url)))
        rows.append(("data location `file://...`", "—",
                     *check(trime(eval_cmd(f"file://{honest}")), sentinel, other, work, bucket.url)))
        rows.append(("a fetch larger than `TRIME_MAX_FETCH_MB` (here 0.0001)", "http",
                     *check(trime(eval_cmd(f"{bucket.url}/valid"), env={"TRIME_MAX_FETCH_MB": "0.0001"}),
                            sentinel, other, work, bucket.url)))
    lines = ["| attack | data | stage | exit | file made | other host asked | refusal line |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {a} | {k} | {stage} | {code} | {made} | {asked} | `{line}` |"
              for a, k, stage, code, made, asked, line in rows]
    lines.append(f"\n({len(rows)} attacks in {time.time() - t0:.0f} s)")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def check(proc, sentinel, other, work, url):
    """(stage, exit status, sentinel made?, other host asked?, the error line with paths shortened)."""
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    line = (err[-1] if err else "(no error line)").replace(work, "$WORK").replace(url, "$URL")
    stage = line.split(":")[0] if err else "?"
    made = "yes" if os.path.exists(sentinel) else "no"
    outputs = [f for _, _, files in os.walk(os.path.join(work, "out")) for f in files
               if f not in ("train.log", "config.yaml", "build.json")]
    return stage, proc.returncode, made + (f" ({', '.join(outputs)})" if outputs else ""), \
        "yes" if other.requests else "no", line


if __name__ == "__main__":
    main()
