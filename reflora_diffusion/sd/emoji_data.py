"""Moved to reflora_diffusion.emoji.data, the tiny-emoji base's own package;
`python -m reflora_diffusion.sd.emoji_data` still runs it."""

from reflora_diffusion.emoji.data import main

if __name__ == "__main__":
    main()
