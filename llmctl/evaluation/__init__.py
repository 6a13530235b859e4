"""What `llmctl eval` measures beyond perplexity and BLEU: ROUGE, exact match and token F1
(textmetrics), lm-eval benchmark tasks (tasks), pass@k in a sandbox (codeexec), and a bias
probe on the model (bias). The eval stage imports these; none imports a stage."""
