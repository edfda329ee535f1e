"""Real checkpoints: converted models, fine-tuned checkpoints and adapters live in weights/<name>/
(git-ignored, but for the committed Kangaroo adapter); `python -m weights` converts GGUF files."""
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent
DEFAULT_MODEL = WEIGHTS / "smollm2-135m-instruct"  # what `make weights` converts
