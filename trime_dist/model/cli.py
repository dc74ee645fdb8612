"""`trime export RUN --format hf|safetensors --out DIR`: a run's model in a folder other tools load.

hf: a save_pretrained folder for transformers.AutoModelForCausalLM (the wrapped model of a run from
model.pretrained, or the built-in model mapped onto GPT-2), with the run's tokenizer when it is known.
safetensors: model.safetensors + model.json (+ config.yaml, tokenizer.json) of any run, for trime_dist.
DIR is written as a temporary folder beside it and renamed at the end: it is complete or absent.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
from typing import Iterator, Optional

FORMATS = ("hf", "safetensors")
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory of `trime train` (or its model/ folder)")
    parser.add_argument("--format", required=True, metavar="FORMAT",
                        help="hf: a folder AutoModelForCausalLM.from_pretrained loads (runs from "
                             "model.pretrained, or the built-in model as GPT-2) | safetensors: the weights + "
                             "model.json of any run (trime_dist loads it)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: new, or empty")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r}: expected one of {', '.join(FORMATS)}")
    from trime_dist.core.output_lock import output_lock

    # beside --out: the folder itself appears only at the end, renamed from a temporary one
    with output_lock(args.out, inside=False):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    from trime_dist.model.export import read_model_info

    model_dir, info = read_model_info(args.run)  # a bad RUN fails before anything is written
    with atomic_dir(args.out) as tmp:
        if args.format == "safetensors":
            export_safetensors(model_dir, info, tmp)
        else:
            export_hf(model_dir, info, tmp)
    print(f"wrote {args.out} ({args.format}, from {model_dir})")
    return 0


def check_out_dir(out: str) -> None:
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"--out {out}: exists and is not an empty folder (choose a new one)")


@contextlib.contextmanager
def atomic_dir(out: str) -> Iterator[str]:
    """A temporary folder beside `out`, renamed to `out` only if the block succeeds."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; outputs are shared like any other
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked before): replaced by the finished folder
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_safetensors(model_dir: str, info: dict, out: str) -> None:
    """The run's model folder as trime_dist writes it (an old weights.pt run is converted)."""
    from trime_dist.core.config import load_config
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.export import HF, load_state, write_model_dir

    state, _ = load_state(model_dir, info)
    model_cfg = load_config(ModelConfig, values=info["model"], where=f"{model_dir}/model.json [model]")
    hf_config = info.get("hf_config") if info.get("architecture") == HF else None
    keep = {k: v for k, v in info.items() if k not in ("architecture", "hf_config", "weights", "model")}
    tok = find_tokenizer(model_dir, info)
    write_model_dir(out, state, model_cfg, keep, hf_config=hf_config, tokenizer_file=tok[0] if tok else None)
    if os.path.isfile(os.path.join(model_dir, "config.yaml")):
        shutil.copyfile(os.path.join(model_dir, "config.yaml"), os.path.join(out, "config.yaml"))


def export_hf(model_dir: str, info: dict, out: str) -> None:
    """A save_pretrained folder (safetensors, fp32) + the tokenizer when the run's is found."""
    from trime_dist.model.export import HF, load_model

    tok = find_tokenizer(model_dir, info)
    tokenizer = hf_tokenizer(*tok) if tok else None
    if info.get("architecture") == HF:
        model, _ = load_model(model_dir)
        hf_model = model.hf_model.float()
    else:
        from trime_dist.core.config import load_config
        from trime_dist.model.config import ModelConfig
        from trime_dist.model.export import load_state
        from trime_dist.model.gpt2_map import build_gpt2

        model_cfg = load_config(ModelConfig, values=info["model"], where=f"{model_dir}/model.json [model]")
        ids = tokenizer_ids(tok[1] if tok else info.get("tokenizer") or {})
        hf_model = build_gpt2(load_state(model_dir, info)[0], model_cfg, *ids)
    hf_model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        log.warning("no tokenizer written to %s: %s has no tokenizer.json and its training data's manifest "
                    "is not found", out, model_dir)


def tokenizer_ids(meta: dict) -> tuple[Optional[int], Optional[int]]:
    """(end-of-document id, pad id) from a shard manifest's tokenizer section (either may be None)."""
    eod, pad = meta.get("eod_id"), meta.get("pad_id")
    return (int(eod) if eod is not None else None), (int(pad) if pad is not None else None)


def find_tokenizer(model_dir: str, info: dict) -> Optional[tuple[str, dict]]:
    """(tokenizer.json path, its manifest section): the copy beside the weights, else the one in the
    training data recorded in model.json (checked against the model's tokenizer hash), else None."""
    from trime_dist.model.export import TOKENIZER_FILE

    meta = info.get("tokenizer") or {}
    if os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)):
        return os.path.join(model_dir, TOKENIZER_FILE), meta
    data = info.get("train_data")
    if not data or not os.path.isfile(os.path.join(data, "manifest.json")):
        return None
    from trime_dist.core import locations, shards

    manifest = shards.read_manifest(data)
    meta = manifest["tokenizer"]
    path = locations.resolve(data, meta["file"])
    try:
        shards.read_tokenizer(data, manifest)  # the file is the one the manifest hashed
    except (FileNotFoundError, ValueError) as e:
        log.warning("%s: not used as the model's tokenizer: %s", path, e)
        return None
    if meta["sha256"] != info.get("tokenizer_sha256"):
        log.warning("%s: its tokenizer does not match the model's (%s): not used", data, model_dir)
        return None
    return path, meta


def hf_tokenizer(path: str, meta: dict):
    """A PreTrainedTokenizerFast of a tokenizer.json, with the data's end-of-document (EOS) and pad tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=path)
    eod, pad = tokenizer_ids(meta)
    if eod is not None:
        tok.eos_token = tok.bos_token = tok.convert_ids_to_tokens(eod)
    if pad is not None:
        tok.pad_token = tok.convert_ids_to_tokens(pad)
    return tok
