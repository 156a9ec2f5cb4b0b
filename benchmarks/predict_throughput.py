"""Classifier inference throughput: `huayu predict --backend onnx` vs `--backend torch`.

One classifier (--model, e.g. `huayu finetune-cls` output; default: a randomly initialised
ernie-3.0-nano classifier with a char tokenizer, which runs exactly as fast as a trained one) is
exported with `huayu export onnx`; both backends then classify the same texts (the first --texts
of ChnSentiCorp's dev set, cut to --max-length tokens) at batch 1 and 32 through huayu's own
prediction path (length-sorted batches, softmax). sequences/s = texts / wall time of the whole
pass, after one untimed warm-up pass of a few batches. torch runs fp32 under inference_mode;
ONNX Runtime uses its CPU execution provider with its default threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/classify/chnsenticorp/dev.tsv"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="classifier directory (default: a random ernie-3.0-nano one)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="TSV/CSV of texts (ChnSentiCorp dev by default)")
    p.add_argument("--texts", type=int, default=320, help="texts per pass")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    return p.parse_args(argv)


def random_classifier(texts: list[str], out: str) -> str:
    from huayu.models.loading import load_model
    from huayu.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, kind="char", vocab_size=7000)
    model = load_model("ernie-3.0-nano", tokenizer, classes=["negative", "positive"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> None:
    import torch

    from huayu.data.classification import classification_collate, predict_probabilities, read_labelled, text_examples
    from huayu.deploy import OnnxConfig, export_onnx, load_backend
    from huayu.models.loading import load_tokenizer

    args = parse_args(argv)
    texts = read_labelled(args.data, label_column=None).texts[:args.texts]
    print(f"{len(texts)} texts of {args.data}, max {args.max_length} tokens; {os.cpu_count()} cores, torch "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_classifier(texts, f"{tmp}/model")
        exported, diff = export_onnx(OnnxConfig(model=model, out=f"{tmp}/onnx"))
        print(f"exported {exported}: max |logit difference| vs PyTorch {diff:.1e}")
        tokenizer = load_tokenizer(str(exported))
        collate = classification_collate(tokenizer.pad_token_id)
        rates = {}
        for backend in ("torch", "onnx"):
            logits = load_backend(str(exported), backend)
            for batch in args.batch_sizes:
                warm_up = text_examples(tokenizer, texts[:4 * batch], args.max_length)
                predict_probabilities(logits, warm_up, collate, 2, batch)
                t0 = time.perf_counter()  # tokenizing is part of predicting
                predict_probabilities(logits, text_examples(tokenizer, texts, args.max_length), collate, 2, batch)
                rates[backend, batch] = len(texts) / (time.perf_counter() - t0)
    print("\n| batch | torch seqs/s | onnx seqs/s | onnx / torch |")
    print("|---|---|---|---|")
    for batch in args.batch_sizes:
        torch_rate, onnx_rate = rates["torch", batch], rates["onnx", batch]
        print(f"| {batch} | {torch_rate:,.1f} | {onnx_rate:,.1f} | {onnx_rate / torch_rate:.2f}x |")


if __name__ == "__main__":
    main()
