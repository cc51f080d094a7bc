"""The optimizer core: LoRA methods as transformations of (A, B) factor pairs around any torch optimizer.

    from reflora_diffusion.core import Refactorer, find_lora_pairs, METHODS

Imports torch and peft only.
"""

from .linalg import geometric_mean
from .methods import METHODS, Method
from .options import MethodOptions
from .pairs import LoraPair, find_lora_pairs, unwrap_model
from .refactorer import Refactorer

__all__ = ["METHODS", "Method", "MethodOptions", "LoraPair", "Refactorer", "find_lora_pairs", "geometric_mean", "unwrap_model"]
