"""The one inference core: everything in llmctl that decodes (generate, serve's engine, eval's
generations, explain, the export report's decode timing, distill's speed check) goes through
these modules, one idea each:

- `sampling`: the next token of each row from its logits (transformers' logits processors);
- `stops`: where a stop string cuts the text, and how much to hold back while streaming;
- `detok`: incremental detokenization (text as tokens arrive) and tokens' text offsets;
- `logprobs`: logprobs under the raw logits, the top-k alternatives, entropy;
- `context`: the model's context limit, prompts as the model sees them (BOS by
  `llmctl.tokenizer`'s rule), truncation and the new-token budget;
- `lean`, `kvcache`, `lean_ort`: the fast decode path for Llama-family models, checked against
  `model.forward` where it is built.

Heavy libraries (torch, transformers) are imported by the modules that need them, not here.
"""
