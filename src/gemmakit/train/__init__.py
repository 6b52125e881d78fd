"""Adapting models: LoRA adapters in PEFT's format (lora.py). Fine-tuning loops come with issue 6."""
