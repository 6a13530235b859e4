"""Export formats. Each `write(model, tok, out_dir, cfg) -> dict` writes one format into
`out_dir`; each `verify(out_dir, reference, batch, cfg) -> float` reloads it and returns the
largest absolute logit difference against the trained model."""
