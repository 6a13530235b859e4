"""Image-text models (data.format=image_text) through every stage.

    shapes    the builtin synthetic dataset: shape scenes drawn with Pillow, seeded
    images    reading and checking image files, content and perceptual hashes
    data      prepare's image_text path: rows -> checked, deduplicated, split, encoded
    model     a LLaVA-style model from scratch, or a pretrained AutoModelForImageTextToText
    infer     encoding prompts with images and decoding on the one inference core
    evaluate  eval's image_text path: caption perplexity, exact match/BLEU against baselines

The stages call into this package when `data.format` is image_text; it imports no stage.
"""
