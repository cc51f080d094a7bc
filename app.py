"""reflora-diffusion web app: train LoRA / RefLoRA on Stable Diffusion, watch runs live, compare, export.

    python app.py                      # http://127.0.0.1:7860, runs in ./runs, the offline tiny-emoji base by default
    python app.py --runs_dir /data/runs --port 8000 --auth me:secret --max_concurrent_jobs 2

Wiring only: the page is reflora_diffusion.app.page (one function per tab), the logic the rest of
reflora_diffusion.app (jobs, run folders, comparisons, exports). Runs are
plain run folders started with `accelerate launch train/sd.py --config <run>/config.json`, so they
survive an app restart and runs started from a terminal show up here too.
"""

from __future__ import annotations

import argparse
import os

from reflora_diffusion.app.auth import login_required_middleware
from reflora_diffusion.app.jobs import MAX_UPLOAD_BYTES
from reflora_diffusion.app.page import build_demo
from reflora_diffusion.app.serve import quiet_idle_queue

__all__ = ["build_demo", "main"]

def parse_auth(value: str | None):
    """'user:pass' -> (user, pass); empty -> no login."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth must look like user:password (or set REFLORA_APP_AUTH)")
    return (user, password)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("REFLORA_APP_HOST", "127.0.0.1"),
                        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("REFLORA_APP_PORT", 7860)))
    parser.add_argument("--runs_dir", default=os.environ.get("REFLORA_RUNS_DIR", "runs"),
                        help="folder holding the run folders (created if missing)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--auth", default=os.environ.get("REFLORA_APP_AUTH"),
                        help="user:password for a login page (or env REFLORA_APP_AUTH)")
    parser.add_argument("--max_concurrent_jobs", type=int, default=os.environ.get("REFLORA_MAX_CONCURRENT_JOBS"),
                        help="training jobs running at once; the others wait in a queue (default: one per CUDA "
                             "GPU, 1 on a CPU; or env REFLORA_MAX_CONCURRENT_JOBS)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    if (args.share or args.host not in ("127.0.0.1", "localhost", "::1")) and not auth:
        print("warning: the app is reachable from other machines without a login; anyone who can open it can "
              "start jobs on this machine. Add --auth user:password.")
    runs_dir = os.path.abspath(args.runs_dir)
    os.makedirs(runs_dir, exist_ok=True)
    if args.max_concurrent_jobs is not None and args.max_concurrent_jobs < 1:
        raise SystemExit("--max_concurrent_jobs must be >= 1")
    demo = build_demo(runs_dir, args.max_concurrent_jobs)
    quiet_idle_queue(demo.queue(default_concurrency_limit=2)).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        allowed_paths=[runs_dir],  # the only folder whose files can be served
        max_file_size=MAX_UPLOAD_BYTES, footer_links=["api"],
        app_kwargs={"middleware": [login_required_middleware()]} if auth else None)


if __name__ == "__main__":
    main()
