"""ChatGLM-style precision table for one decoder: fp32 / bf16 / int8 / int4, side by side.

The model (--model, a decoder directory; e.g. a `huayu pretrain` output) is written in four
precisions: fp32 as given, bf16 (`save_pretrained` after `.to(bfloat16)`), and `huayu quantize
--bits 8` / `--bits 4 --group-size 32`. Each is then measured in a fresh process, so that its peak
RSS is its own:

- size on disk: the weight files;
- held-out perplexity: `huayu eval DIR --general-data FILE --general-seq-len 128` on --heldout
  texts (ChnSentiCorp's dev reviews by default: text no pre-training run of ours has seen);
- decode tokens/s at batch 1 and 8: `Generator.new_ids`, greedy, --new-tokens per prompt, eager
  and with --compile (best of --rounds, after one untimed call);
- greedy agreement: the share of generated tokens equal to fp32's, position by position;
- peak RSS: the process's ru_maxrss at the end (python + torch + transformers included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_HELDOUT = Path(__file__).resolve().parents[2] / "shared/data/classify/chnsenticorp/dev.tsv"
PROMPTS = ["今天天气很好，", "我最近总是睡不好，", "中国的首都是", "这家酒店的服务", "他说：", "学习中文最难的是",
           "春天来了，", "请问怎么去火车站？"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="decoder model directory")
    p.add_argument("--heldout", default=str(DEFAULT_HELDOUT), help="TSV/CSV of held-out texts")
    p.add_argument("--texts", type=int, default=400, help="held-out texts used")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: one variant's directory
    p.add_argument("--heldout-txt", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args) -> dict:
    """One variant, in this (fresh) process."""
    import resource
    import time

    import torch

    from huayu.cli import main
    from huayu.generation import DecodingArgs, Generator

    with tempfile.TemporaryDirectory() as tmp:
        assert main(["eval", args.measure, "--general-data", args.heldout_txt, "--general-seq-len", "128",
                     "--out", tmp]) == 0
        ppl = json.loads(Path(tmp, "metrics.json").read_text(encoding="utf-8"))["general_ppl"]
    gen = Generator.load(args.measure, dtype="auto")
    result = {"ppl": ppl, "outputs": {}}
    for batch in (1, 8):
        prompts = [gen.encode_text(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        for compiled in (False, True):
            d = DecodingArgs(max_new_tokens=args.new_tokens, compile=compiled)
            out = gen.new_ids(prompts, d)
            best = float("inf")
            for _ in range(args.rounds):
                start = time.perf_counter()
                gen.new_ids(prompts, d)
                best = min(best, time.perf_counter() - start)
            result[f"tokens_s_b{batch}{'_compiled' if compiled else ''}"] = sum(map(len, out)) / best
            result["outputs"][batch] = out
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return
    import torch

    from huayu.cli import main as huayu
    from huayu.data.classification import read_labelled
    from huayu.models.loading import load_for_inference

    texts = read_labelled(args.heldout, label_column=None).texts[:args.texts]
    with tempfile.TemporaryDirectory() as tmp:
        heldout = Path(tmp, "heldout.txt")
        heldout.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
        variants = {"fp32": args.model, "bf16": f"{tmp}/bf16", "int8": f"{tmp}/int8", "int4": f"{tmp}/int4"}
        tokenizer, model = load_for_inference(args.model)
        model.to(torch.bfloat16).save_pretrained(variants["bf16"])
        tokenizer.save_pretrained(variants["bf16"])
        assert huayu(["quantize", args.model, "--bits", "8", "--out", variants["int8"]]) == 0
        assert huayu(["quantize", args.model, "--bits", "4", "--group-size", "32", "--out", variants["int4"]]) == 0
        print(f"{args.model}; {len(texts)} held-out texts of {args.heldout}; {args.new_tokens} new tokens per "
              f"prompt; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        rows = {}
        for name, path in variants.items():
            child = subprocess.run([sys.executable, __file__, "--model", args.model, "--measure", path,
                                    "--heldout-txt", str(heldout), "--new-tokens", str(args.new_tokens),
                                    "--rounds", str(args.rounds)], capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"{name}: {child.stderr[-2000:]}")
            rows[name] = json.loads(child.stdout.strip().splitlines()[-1])
            rows[name]["size_mb"] = sum(f.stat().st_size for f in Path(path).glob("model*.safetensors")) / 2**20
    reference = rows["fp32"]["outputs"]
    print("| | size on disk | peak RSS | decode tok/s b1 (compiled) | decode tok/s b8 (compiled) | held-out ppl | "
          "greedy tokens = fp32 (b8) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ours, ref = r["outputs"]["8"], reference["8"]
        agree = sum(a == b for x, y in zip(ours, ref) for a, b in zip(x, y)) / max(1, sum(map(len, ref)))
        print(f"| {name} | {r['size_mb']:.1f} MB | {r['peak_rss_mb']:.0f} MB | {r['tokens_s_b1']:.0f} "
              f"({r['tokens_s_b1_compiled']:.0f}) | {r['tokens_s_b8']:.0f} ({r['tokens_s_b8_compiled']:.0f}) | "
              f"{r['ppl']:.2f} | {agree:.1%} |")


if __name__ == "__main__":
    main()
