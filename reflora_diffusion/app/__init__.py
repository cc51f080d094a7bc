"""What app.py needs beyond layout: run folders (runs), training jobs (jobs), comparisons (compare)
and downloads (export). Everything here is usable and tested without a browser."""
