"""The tiny-emoji base: its data (the Noto and Twemoji sets from npm, captioned) and its pretraining recipe.

Not used by any training run: ``data`` prepares the emoji folders the benchmarks and the pretraining read,
``pretrain`` made the shipped ``assets/tiny-emoji`` pipeline (docs/sd.md, "the tiny-emoji base").

    python -m reflora_diffusion.emoji.data                                   # npm pack + sha256 check + captions
    python -m reflora_diffusion.emoji.pretrain --output_dir runs/tiny-emoji --seed 0    # the shipped recipe
"""
