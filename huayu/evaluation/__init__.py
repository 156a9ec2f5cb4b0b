"""Evaluation: static dialogue metrics (BLEU-4, Dist-n, F1, ROUGE-L) and the commands that report them."""
