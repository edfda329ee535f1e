"""Training: fine-tuning with a skip pattern (finetune.py, low-rank in lora.py) and Kangaroo's
adapter (kangaroo.py). They import the methods; no method imports them."""
