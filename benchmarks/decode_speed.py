"""Decode tokens/s: huayu's generation path vs plain transformers `generate()`, side by side.

One decoder (--model, e.g. a `huayu pretrain` output; default: a randomly initialised `small`
preset, ~9.8M parameters, with a char tokenizer — weights don't change the speed) decodes the
same prompts greedily with:

- `transformers` `model.generate(input_ids, attention_mask, max_new_tokens, do_sample=False)`, the
  baseline;
- huayu's `Generator.new_ids` (what chat, eval, generate and huayu.load use), eager: its own loop
  over a static cache;
- the same with `compile=True` (torch.compile of the decode step, cpp wrapper), after one untimed
  call that compiles it (its time is printed);
- `huayu serve`'s continuous-batching engine, eager and with `--compile` (static cache rebuilt when
  the batch changes, dynamic-shape compiled step), all prompts submitted at once.

Each configuration decodes --new-tokens per prompt at each batch size; tokens/s = generated tokens
(up to each row's end, the same for all: outputs must be identical and are checked) / wall time,
best of --rounds. Ratios are against `generate()` measured in the same run. fp32 (or --dtype bf16),
torch's default threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/classify/chnsenticorp/dev.tsv"
PROMPTS = ["今天天气很好，", "我最近总是睡不好，", "中国的首都是", "这家酒店的服务", "他说：", "学习中文最难的是",
           "春天来了，", "请问怎么去火车站？"]


ARGS: argparse.Namespace | None = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="decoder model directory (default: a random `small` preset)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3, help="timed repetitions; the best counts")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and activations")
    return p.parse_args(argv)


def random_model(out: str) -> str:
    from huayu.data.classification import read_labelled
    from huayu.models.loading import load_model
    from huayu.tokenizer import train_tokenizer

    texts = read_labelled(str(DEFAULT_DATA), label_column=None).texts if DEFAULT_DATA.exists() else PROMPTS
    tokenizer = train_tokenizer(texts, kind="char", vocab_size=7000)
    load_model("small", tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def timed(fn, rounds: int):
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> None:
    import torch

    from huayu.generation import DecodingArgs, Generator
    from huayu.models.loading import count_parameters
    from huayu.serve.engine import Engine

    global ARGS
    args = ARGS = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        gen = Generator.load(args.model or random_model(f"{tmp}/model"), dtype=dtype)
        print(f"{gen.model.config.model_type}, {count_parameters(gen.model)[1]:,} parameters, {args.dtype}; {args.new_tokens} new "
              f"tokens per prompt; {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, load average "
              f"{os.getloadavg()[0]:.2f}")
        for batch in args.batch_sizes:
            prompts = [gen.encode_text(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
            inputs = gen._inputs(prompts, DecodingArgs(max_new_tokens=args.new_tokens))
            ends = set(gen.eos_ids)

            def transformers_generate():
                with torch.inference_mode():
                    out = gen.model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                                             pad_token_id=gen.tokenizer.pad_token_id, eos_token_id=gen.eos_ids)
                rows = out[:, inputs["input_ids"].shape[1]:].tolist()
                return [r[:next((i for i, t in enumerate(r) if t in ends), len(r))] for r in rows]

            eager, compiled = (DecodingArgs(max_new_tokens=args.new_tokens, compile=c) for c in (False, True))
            start = time.perf_counter()
            gen.new_ids(prompts, compiled)
            compile_s = time.perf_counter() - start
            baseline_s, reference = timed(transformers_generate, args.rounds)
            tokens = sum(len(r) for r in reference)
            print(f"batch {batch}: {tokens} tokens per pass; compiling huayu's decode step took {compile_s:.1f} s")
            print(f"  transformers generate()   {tokens / baseline_s:7.1f} tokens/s   1.00x")
            runs = [("huayu (eager)", lambda: gen.new_ids(prompts, eager)),
                    ("huayu --compile", lambda: gen.new_ids(prompts, compiled))]
            for flag in (False, True):
                engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions, compile=flag)
                runs.append((f"serve engine{' --compile' if flag else ''}", lambda e=engine: serve(e, prompts)))
                runs[-1][1]()  # compiles the server's (dynamic-shape) step
            for name, fn in runs:
                seconds, out = timed(fn, args.rounds)
                same = "identical greedy outputs" if out == reference else "OUTPUTS DIFFER"
                print(f"  {name:<25} {tokens / seconds:7.1f} tokens/s   {baseline_s / seconds:.2f}x   {same}")


def serve(engine, prompts) -> list[list[int]]:
    """The prompts through `huayu serve`'s continuous-batching engine, all submitted at once, greedy."""
    from huayu.serve.engine import Request
    from huayu.serve.sampling import SamplingParams

    requests = [Request(p, SamplingParams(max_tokens=ARGS.new_tokens, temperature=0), lambda e: None) for p in prompts]
    engine.submit(*requests)
    while engine.step():
        pass
    return [[t for t in r.out if t not in engine.eos_ids] for r in requests]


if __name__ == "__main__":
    main()
