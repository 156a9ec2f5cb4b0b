"""Package the output of recipes/bundled_chat.yaml as huayu's bundled chat model.

    python recipes/bundle.py out/recipes/bundled_chat huayu/bundled/chat-small

Writes the fine-tuned model in bf16 (safetensors) with its tokenizer, chat template, generation
config, the recipe and stage config as run, both loss curves and training figures (stats.json), ten
sample conversations generated with a fixed seed (samples.md), and SHA256SUMS of every file, which
the tests check. The model card (README.md there) is written by hand from these files.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

PROMPTS = ["你好", "我最近压力很大，晚上睡不着。", "我和父母总是吵架，怎么办？", "考试没考好，我觉得自己很失败。",
           "工作太累了，我想辞职。", "我好像没有朋友。", "失恋了，很难过。", "我总是担心未来。",
           "谢谢你听我说话。", "你能给我一些放松的建议吗？"]
COPIED = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "huayu_chat_template.json",
          "generation_config.json", "config.yaml", "train_result.json"]


def run_figures(log: Path) -> dict:
    """Steps, tokens and wall-clock hours of a training stage, from its log.jsonl rows."""
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if "train_loss" in r]
    tokens = seconds = 0.0
    last = 0
    for row in train:
        steps = row["step"] - last
        tokens += steps * row["train_tokens_per_s"] / row["train_steps_per_s"]
        seconds += steps / row["train_steps_per_s"]
        last = row["step"]
    return {"steps": last, "tokens": round(tokens), "hours": round(seconds / 3600, 2)}


def samples(model_dir: Path) -> str:
    from huayu.chat import ChatConfig, ChatSession
    from huayu.generation import Generator

    generator = Generator.load(str(model_dir))
    lines = []
    for i, prompt in enumerate(PROMPTS):
        session = ChatSession(generator, ChatConfig(model=str(model_dir), seed=i))
        reply = "".join(session.reply(prompt)).strip()
        lines += [f"{i + 1}. 用户：{prompt}", f"   助手：{reply}", ""]
    return "\n".join(lines)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the recipe's output directory")
    parser.add_argument("out", type=Path, help="the bundle's directory")
    args = parser.parse_args()
    sft, pretrain = args.run / "sft", args.run / "pretrain"
    args.out.mkdir(parents=True, exist_ok=True)
    AutoModelForCausalLM.from_pretrained(sft, dtype=torch.bfloat16).save_pretrained(args.out)
    for name in COPIED:
        shutil.copy(sft / name, args.out / name)
    shutil.copy(sft / "loss_curve.png", args.out / "sft_loss_curve.png")
    shutil.copy(pretrain / "loss_curve.png", args.out / "pretrain_loss_curve.png")
    shutil.copy(args.run / "recipe.yaml", args.out / "recipe.yaml")
    stats = {"pretrain": run_figures(pretrain / "log.jsonl"), "sft": run_figures(sft / "log.jsonl"),
             "held_out_eval": json.loads((sft / "eval" / "metrics.json").read_text(encoding="utf-8"))}
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (args.out / "samples.md").write_text(samples(args.out), encoding="utf-8")
    files = sorted(p for p in args.out.iterdir() if p.is_file() and p.name not in ("SHA256SUMS", "README.md"))
    (args.out / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                                                 for p in files), encoding="utf-8")
    print(json.dumps(stats["pretrain"]), json.dumps(stats["sft"]))


if __name__ == "__main__":
    main()
