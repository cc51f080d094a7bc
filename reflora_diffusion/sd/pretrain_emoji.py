"""Moved to reflora_diffusion.emoji.pretrain, the tiny-emoji base's own package;
`python -m reflora_diffusion.sd.pretrain_emoji` still runs it."""

from reflora_diffusion.emoji.pretrain import main

if __name__ == "__main__":
    main()
