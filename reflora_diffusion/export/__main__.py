"""python -m reflora_diffusion.export <run or checkpoint> --format diffusers|kohya --output <folder> [--overwrite]"""

import argparse
import sys

from .factors import ExportError
from .run import FORMATS, export_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflora_diffusion.export",
                                     description="Export a run's LoRA in diffusers or kohya (A1111/ComfyUI) format.")
    parser.add_argument("source", help="run folder, checkpoint folder (checkpoints/checkpoint-N) or weight file")
    parser.add_argument("--format", choices=FORMATS, default="diffusers")
    parser.add_argument("--output", help="output folder (default: the source folder)")
    parser.add_argument("--name", help="kohya file name without .safetensors (default: the run folder's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different adapter already there")
    args = parser.parse_args(argv)
    try:
        path = export_run(args.source, args.format, args.output, overwrite=args.overwrite, name=args.name)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
