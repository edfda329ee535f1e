from .cache import CacheError, KVCache
from .config import Config, UnsupportedConfig, from_hf, layer_window, load_config
from .decoder import Decoder, attention_mask, positions
from .generate import (beam_search, check_eos, check_length, check_prompts, check_sampling, filter_logits, generate,
                       left_pad, next_token)
from .loader import LoadError, add_load_args, load_model, save_model
from .queue import boundary, check_batch_size, first_rows, generate_queue

__all__ = ["add_load_args", "beam_search", "boundary", "CacheError", "check_batch_size", "Config", "Decoder",
           "KVCache", "LoadError", "UnsupportedConfig", "attention_mask", "check_eos", "check_length", "check_prompts",
           "check_sampling", "filter_logits", "first_rows", "from_hf", "generate", "generate_queue", "layer_window",
           "left_pad", "load_config", "load_model", "next_token", "positions", "save_model"]
